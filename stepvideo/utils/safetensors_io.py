"""Reading and writing the safetensors format with numpy only.

Why our own reader: loading must stream tensor by tensor into freshly allocated
arrays (no memory map, whose touched pages count against the process until the
file is closed), must read bfloat16 without `ml_dtypes`, and must reject damaged
files with a message that names the file and the tensor. The format is simple:
8 bytes little-endian header length, a JSON header, then the raw tensor bytes.

The same code serialises tensors to bytes for the HTTP services, so the wire
format is exactly a safetensors file: no pickle anywhere.

bfloat16 is represented in numpy as ``uint16`` bit patterns (see `BF16`), and
converted to float32 exactly by shifting into the high half of a uint32.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np

# numpy has no bfloat16; bf16 tensors travel as their uint16 bit patterns.
BF16 = "BF16"

# safetensors dtype string -> numpy dtype of the stored bytes (bf16 as uint16 bits).
NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    BF16: np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
SAFETENSORS_DTYPES = {v: k for k, v in NUMPY_DTYPES.items() if k != BF16}

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file or buffer is malformed."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact bfloat16 -> float32: the bf16 bits are the high half of the float32."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def parse_header(raw: bytes, total_size: int, source: str) -> Dict[str, TensorInfo]:
    """Validate a header (the JSON after the 8 length bytes) against the data size."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{source}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: header must be a JSON object")
    data_start = 8 + len(raw)
    data_size = total_size - data_start
    infos: Dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise SafetensorsError(f"{source}: entry {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in NUMPY_DTYPES:
            raise SafetensorsError(
                f"{source}: tensor {name!r} has unsupported dtype {dtype!r}; "
                f"expected one of {sorted(NUMPY_DTYPES)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{source}: tensor {name!r} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{source}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize  # Python ints: no overflow
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise SafetensorsError(
                f"{source}: tensor {name!r} (dtype {dtype}, shape {shape}) needs {expected} bytes "
                f"at offsets {offsets}, but the data section has {data_size} bytes "
                "(file truncated or corrupted?)")
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)
    return infos


def _read_header_from(fh: BinaryIO, total_size: int, source: str) -> Dict[str, TensorInfo]:
    head = fh.read(8)
    if len(head) != 8:
        raise SafetensorsError(f"{source}: too short to be a safetensors file ({total_size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > total_size:
        raise SafetensorsError(
            f"{source}: header length {n} does not fit in {total_size} bytes "
            "(not a safetensors file, or truncated)")
    return parse_header(fh.read(n), total_size, source)


class SafetensorsFile:
    """A safetensors file opened for streaming reads, one tensor at a time."""

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self._fh = open(self.path, "rb")
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self.tensors = _read_header_from(self._fh, size, self.path)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor as stored: bf16 comes back as uint16 bit patterns."""
        info = self.tensors[name]
        arr = np.empty(info.shape, dtype=NUMPY_DTYPES[info.dtype])
        self._fh.seek(info.start)
        got = self._fh.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        if got != info.nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r} truncated ({got} of {info.nbytes} bytes)")
        return arr

    def read(self, name: str, dtype: Optional[np.dtype] = None) -> np.ndarray:
        """The tensor as a numpy array; bf16 is widened exactly to float32.

        With `dtype`, floating tensors are cast to it (one extra copy at most).
        """
        info = self.tensors[name]
        arr = self.read_raw(name)
        if info.dtype == BF16:
            arr = bf16_bits_to_f32(arr)
        if dtype is not None and arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)
        return arr


def _layout(tensors: Mapping[str, Tuple[np.ndarray, str]], metadata: Optional[Mapping[str, str]]):
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = sorted(tensors)
    for name in order:
        arr, dt = tensors[name]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
    return raw, order


def _normalise(tensors: Mapping[str, np.ndarray], bf16: Iterable[str]) -> Dict[str, Tuple[np.ndarray, str]]:
    bf16 = set(bf16)
    out = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
        if name in bf16:
            bits = arr if arr.dtype == np.uint16 else f32_to_bf16_bits(arr)
            out[name] = (bits, BF16)
        else:
            dt = SAFETENSORS_DTYPES.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
            if dt is None:
                raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
            out[name] = (arr.astype(arr.dtype.newbyteorder("<"), copy=False), dt)
    return out


def write_stream(fh: BinaryIO, tensors: Mapping[str, np.ndarray], *, bf16: Iterable[str] = (),
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` in safetensors format; names in `bf16` are stored as bfloat16.

    A bf16 tensor may be given as float32 (rounded to nearest even) or as uint16 bits.
    """
    prepared = _normalise(tensors, bf16)
    raw, order = _layout(prepared, metadata)
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for name in order:
        fh.write(prepared[name][0].tobytes())


def new_file_mode() -> int:
    """The permissions `open(path, "w")` would give a new file (0o666 less the umask);
    `tempfile.mkstemp` makes its files 0o600, which would hide model files from other users."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def fsync_file(path: os.PathLike | str) -> None:
    """Flush a written file's data to the disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: os.PathLike | str) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` complete or not at all.

    Written to a uniquely named temporary file beside `path` (two writers never share
    one), flushed and fsynced, then renamed over `path`; on any error it is removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_file(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], *, bf16: Iterable[str] = (),
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file atomically (`atomic_output`)."""
    with atomic_output(path) as fh:
        write_stream(fh, tensors, bf16=bf16, metadata=metadata)


def to_bytes(tensors: Mapping[str, np.ndarray], *, bf16: Iterable[str] = (),
             metadata: Optional[Mapping[str, str]] = None) -> bytes:
    buf = io.BytesIO()
    write_stream(buf, tensors, bf16=bf16, metadata=metadata)
    return buf.getvalue()


def header_from_bytes(data: bytes, source: str = "payload") -> Dict[str, TensorInfo]:
    """Validate the header of an in-memory safetensors buffer without touching tensor data."""
    fh = io.BytesIO(data)
    return _read_header_from(fh, len(data), source)


def from_bytes(data: bytes, source: str = "payload") -> Dict[str, Tuple[np.ndarray, str]]:
    """Parse an in-memory safetensors buffer: name -> (array as stored, safetensors dtype).

    bf16 tensors come back as uint16 bit patterns together with the dtype "BF16",
    so a caller can keep them exact or widen them with `bf16_bits_to_f32`.
    """
    infos = header_from_bytes(data, source)
    out = {}
    for name, info in infos.items():
        arr = np.frombuffer(data, dtype=NUMPY_DTYPES[info.dtype], count=math.prod(info.shape),
                            offset=info.start).reshape(info.shape).copy()
        out[name] = (arr, info.dtype)
    return out


def iter_file(path: os.PathLike | str, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, array) for a file, bf16 widened to float32; only `names` if given."""
    with SafetensorsFile(path) as f:
        for name in (list(names) if names is not None else sorted(f.keys())):
            yield name, f.read(name)


def load_file(path: os.PathLike | str) -> Dict[str, np.ndarray]:
    """All tensors of a file (small files only; bf16 widened to float32)."""
    return dict(iter_file(path))
