"""The safetensors format: the pinned `safetensors` library where it serves, numpy where it cannot.

- Files are written by the library (`save_file`); buffers and small files are parsed by it
  (`from_bytes`, `load_file`).
- Checkpoints are read by `SafetensorsFile`, by hand: loading streams tensor by tensor into freshly
  allocated arrays and must read bfloat16 without torch or `ml_dtypes`; the library's numpy reader
  has no bfloat16, and its reader names neither the file nor the tensor when a file is damaged.
- In-memory payloads are laid out by hand (`encode_parts`) so a large one (a decoded video) is sent
  from the arrays' own memory in pieces; the library's `serialize` returns one copy of all of it.

The format: 8 bytes little-endian header length, a JSON header (name -> dtype, shape,
data_offsets), then the raw little-endian tensor bytes. bfloat16 is held as uint16 bit
patterns (`stepvideo.dtypes`).
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
from typing import BinaryIO, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import safetensors

from stepvideo import dtypes
from stepvideo.dtypes import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: F401  (callers' one import)

BF16 = dtypes.BF16.safetensors

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


def parse_header(raw: bytes, total_size: int, source: str) -> Dict[str, TensorInfo]:
    """Parse and check a header (the JSON after the 8 length bytes) against the data size."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{source}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: header must be a JSON object")
    return check_header(header, 8 + len(raw), total_size, source)


def check_header(header: Mapping[str, object], data_start: int, total_size: int,
                 source: str) -> Dict[str, TensorInfo]:
    """Where each tensor of a parsed header lives, after checking dtype, shape and offsets.

    data_start: the byte where tensor data begins (8 + header length); total_size: the
    file's or buffer's size. Offsets must lie in the data section and span exactly the
    bytes the shape and dtype need.
    """
    data_size = total_size - data_start
    infos: Dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise SafetensorsError(f"{source}: entry {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in dtypes.BY_SAFETENSORS:
            raise SafetensorsError(
                f"{source}: tensor {name!r} has unsupported dtype {dtype!r}; "
                f"expected one of {sorted(dtypes.BY_SAFETENSORS)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{source}: tensor {name!r} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{source}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * dtypes.BY_SAFETENSORS[dtype].itemsize  # Python ints: no overflow
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
    """A safetensors file opened for streaming reads, one tensor at a time (by hand: see the module docstring)."""


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
        arr = np.empty(info.shape, dtype=dtypes.BY_SAFETENSORS[info.dtype].numpy)
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


def _normalise(tensors: Mapping[str, np.ndarray], bf16: Iterable[str]) -> Dict[str, Tuple[np.ndarray, str]]:
    """{name: (C-contiguous little-endian array, safetensors dtype)}; names in `bf16` as bfloat16 bits."""
    bf16 = set(bf16)
    out = {}
    for name, arr in tensors.items():
        arr = contiguous(np.asarray(arr))
        if name in bf16:
            bits = arr if arr.dtype == np.uint16 else f32_to_bf16_bits(arr)
            out[name] = (bits, BF16)
            continue
        row = dtypes.of_array(arr)
        if row is None:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        out[name] = (arr.astype(row.numpy, copy=False), row.safetensors)
    return out


def contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` C-contiguous (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode_parts(prepared: Mapping[str, Tuple[np.ndarray, str]],
                 metadata: Optional[Mapping[str, str]] = None) -> Tuple[int, List[memoryview]]:
    """(total bytes, buffers) of a safetensors payload, without copying tensor data.

    prepared: {name: (C-contiguous little-endian array, safetensors dtype)}. Tensors are laid
    out in name order after a compact JSON header padded with spaces to 8 bytes.
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = sorted(prepared)
    for name in order:
        arr, dtype = prepared[name]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    parts = [memoryview(struct.pack("<Q", len(raw))), memoryview(raw)]
    parts += [memoryview(prepared[name][0].reshape(-1)).cast("B") for name in order if prepared[name][0].nbytes]
    return 8 + len(raw) + offset, parts


def to_bytes(tensors: Mapping[str, np.ndarray], *, bf16: Iterable[str] = (),
             metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """`tensors` as one safetensors buffer; names in `bf16` stored as bfloat16 (float32 rounded, or uint16 bits)."""
    return b"".join(encode_parts(_normalise(tensors, bf16), metadata)[1])


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
def atomic_path(path: os.PathLike | str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path to write a file to, which then appears at `path` complete or not at all.

    The temporary file is uniquely named beside `path` (two writers never share one); after
    the block it is fsynced and renamed over `path`; on any error it is removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
        os.close(fd)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_file(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], *, bf16: Iterable[str] = (),
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file with the library, atomically (`atomic_path`).

    Names in `bf16` are stored as bfloat16: given as float32 (rounded to nearest even) or as uint16 bits.
    """
    prepared = _normalise(tensors, bf16)  # holds the arrays alive while the library reads their memory
    specs = {name: safetensors.TensorSpec(dtype=dtypes.BY_SAFETENSORS[code].name, shape=arr.shape,
                                          data_ptr=arr.ctypes.data, data_len=arr.nbytes)
             for name, (arr, code) in prepared.items()}
    with atomic_path(path) as tmp:
        safetensors.serialize_file(specs, tmp, metadata=dict(metadata) if metadata else None)


def header_from_bytes(data: bytes, source: str = "payload") -> Dict[str, TensorInfo]:
    """Check the header of an in-memory safetensors buffer without touching tensor data."""
    return _read_header_from(io.BytesIO(data), len(data), source)


def from_bytes(data: bytes, source: str = "payload") -> Dict[str, Tuple[np.ndarray, str]]:
    """Parse an in-memory safetensors buffer with the library: name -> (array as stored, safetensors dtype).

    bf16 tensors come back as uint16 bit patterns together with the dtype "BF16",
    so a caller can keep them exact or widen them with `bf16_bits_to_f32`.
    """
    try:
        entries = safetensors.deserialize(bytes(data))
    except safetensors.SafetensorError as e:
        raise SafetensorsError(f"{source}: {e}") from None
    out = {}
    for name, entry in entries:
        row = dtypes.BY_SAFETENSORS.get(entry["dtype"])
        if row is None:
            raise SafetensorsError(f"{source}: tensor {name!r} has unsupported dtype {entry['dtype']!r}; "
                                   f"expected one of {sorted(dtypes.BY_SAFETENSORS)}")
        out[name] = (np.frombuffer(entry["data"], dtype=row.numpy).reshape(entry["shape"]), entry["dtype"])
    return out


def load_file(path: os.PathLike | str) -> Dict[str, np.ndarray]:
    """All tensors of a small file, parsed by the library; bf16 widened to float32.

    The whole file is read at once: checkpoints are read tensor by tensor with `SafetensorsFile`.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    return {name: bf16_bits_to_f32(arr) if dtype == BF16 else arr
            for name, (arr, dtype) in from_bytes(data, path).items()}
