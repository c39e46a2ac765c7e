"""Write a flat state dict as a `torch.save` zip checkpoint, without torch (test and demo tooling).

    save_state_dict("pytorch_model.bin", {"w": array, ...}, bf16=["w"])

The files are what `torch.save` writes, opcode for opcode and byte for byte in their layout,
so `stepvideo.utils.torch_format.TorchCheckpoint` (and torch) read them; the tiny demo
checkpoint's CLIP `pytorch_model.bin` and the reader's tests are made with this.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from typing import BinaryIO, Callable, Dict, Iterable, List, Mapping, Tuple

import numpy as np

from stepvideo import dtypes
from stepvideo.utils.safetensors_io import atomic_path
from stepvideo.utils.torch_format import TorchFormatError

# What `torch.save` writes into every zip archive besides the pickle and storages.
ZIP_ALIGNMENT = 64
ZIP_FORMAT_VERSION = b"1"
ZIP_RECORD_VERSION = b"3\n"


class _StateDictPickle:
    """Protocol-2 pickle of a flat state dict, opcode for opcode as torch.save's pickler.

    Written by hand because the real pickler would have to import torch to emit
    `torch._utils._rebuild_tensor_v2`. The memo (BINPUT/BINGET) follows Python's
    pickler: every string, tuple, global and reduced object is memoised once.
    """

    def __init__(self):
        self.out = io.BytesIO()
        self._memo_size = 0
        self._memo: Dict[Tuple[str, str], int] = {}  # shared objects: ('str'|'global', value)

    def _put(self) -> None:
        index = self._memo_size
        self._memo_size += 1
        self.out.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def _get(self, index: int) -> None:
        self.out.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))

    def _shared(self, kind: str, value: str, emit: Callable[[], None]) -> None:
        """Emit a shared object once (then memoise it), afterwards fetch it from the memo."""
        if (kind, value) in self._memo:
            self._get(self._memo[(kind, value)])
        else:
            emit()
            self._memo[(kind, value)] = self._memo_size
            self._put()

    def _binunicode(self, value: str) -> None:
        data = value.encode("utf-8")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def string(self, value: str) -> None:
        self._binunicode(value)
        self._put()

    def shared_string(self, value: str) -> None:
        """A string torch passes as one object every time ('storage', 'cpu')."""
        self._shared("str", value, lambda: self._binunicode(value))

    def global_(self, module: str, name: str) -> None:
        self._shared("global", f"{module}\n{name}\n",
                     lambda: self.out.write(b"c" + f"{module}\n{name}\n".encode("utf-8")))

    def int_(self, value: int) -> None:
        if 0 <= value < 0x100:
            self.out.write(b"K" + bytes([value]))
        elif 0 <= value < 0x10000:
            self.out.write(b"M" + struct.pack("<H", value))
        elif -0x80000000 <= value < 0x80000000:
            self.out.write(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(data)]) + data)

    def int_tuple(self, values: Tuple[int, ...]) -> None:
        if not values:
            self.out.write(b")")
            return
        if len(values) > 3:
            self.out.write(b"(")
        for v in values:
            self.int_(v)
        self.out.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t"))
        self._put()

    def tensor(self, storage_key: str, dtype: str, shape: Tuple[int, ...]) -> None:
        """`_rebuild_tensor_v2(storage, 0, shape, contiguous strides, False, OrderedDict())`."""
        numel = int(np.prod(shape, dtype=np.int64))
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"((")
        self.shared_string("storage")
        self.global_("torch", dtypes.BY_NAME[dtype].torch_storage)
        self.string(storage_key)
        self.shared_string("cpu")
        self.int_(numel)
        self.out.write(b"t")
        self._put()
        self.out.write(b"Q")  # BINPERSID
        self.int_(0)
        self.int_tuple(shape)
        self.int_tuple(strides)
        self.out.write(b"\x89")  # NEWFALSE: requires_grad
        self.global_("collections", "OrderedDict")
        self.out.write(b")R")  # OrderedDict(): backward hooks
        self._put()
        self.out.write(b"t")
        self._put()
        self.out.write(b"R")
        self._put()

    @classmethod
    def of(cls, entries: List[Tuple[str, str, Tuple[int, ...]]]) -> bytes:
        """entries: (name, dtype, shape) in order; storage keys are "0", "1", ... in that order."""
        p = cls()
        p.out.write(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
        p._put()
        batch = 1000  # the pickler's SETITEMS batch size
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]
            if len(chunk) > 1:
                p.out.write(b"(")
            for i, (name, dtype, shape) in enumerate(chunk, start):
                p.string(name)
                p.tensor(str(i), dtype, shape)
            p.out.write(b"u" if len(chunk) > 1 else b"s")
        p.out.write(b".")
        return p.out.getvalue()


def _zip_records(archive: str, records: List[Tuple[str, bytes]], out: BinaryIO) -> None:
    """Write an uncompressed zip laid out as torch's writer does.

    Local headers carry no sizes (flag 0x0808: sizes in a trailing data descriptor,
    UTF-8 names), an 'FB' extra field pads each member's data to a 64-byte boundary,
    and the archive ends with a zip64 end record, its locator and the classic end record.
    """
    central = io.BytesIO()
    pos = 0
    for name, data in records:
        full = f"{archive}/{name}".encode("utf-8")
        start = pos + 30 + len(full) + 4
        pad = -start % ZIP_ALIGNMENT
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data)
        if pos + 30 + len(full) + len(extra) + len(data) + 16 >= 0xFFFFFFFF:
            raise TorchFormatError("checkpoint writer supports archives below 4 GiB only")
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(full), len(extra)))
        out.write(full + extra + data)
        out.write(struct.pack("<IIII", 0x08074B50, crc, len(data), len(data)))
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc, len(data),
                                  len(data), len(full), 0, 0, 0, 0, 0, pos))
        central.write(full)
        pos += 30 + len(full) + len(extra) + len(data) + 16
    directory = central.getvalue()
    count = len(records)
    out.write(directory)
    zip64_end = pos + len(directory)
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, count, count, len(directory), pos))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), pos, 0))


def _numpy_dtype_name(arr: np.ndarray, name: str) -> str:
    row = dtypes.of_array(arr)
    if row is None or row is dtypes.BF16:
        raise TorchFormatError(f"tensor {name!r}: dtype {arr.dtype} has no torch storage type here; "
                               f"expected one of {sorted(dtypes.BY_NAME)}")
    return row.name


def archive_name(path: os.PathLike | str) -> str:
    """The folder name torch puts inside the zip: the file name without its last extension."""
    base = os.path.basename(os.fspath(path))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem or "archive"


def save_state_dict(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], *,
                    bf16: Iterable[str] = ()) -> None:
    """Write `tensors` (in mapping order) as a torch.save zip checkpoint, atomically.

    Names in `bf16` are stored as bfloat16 (given as float32, rounded to nearest
    even, or as uint16 bits). Each tensor gets its own contiguous storage.
    """
    path = os.fspath(path)
    bf16 = set(bf16)
    unknown = bf16 - set(tensors)
    if unknown:
        raise TorchFormatError(f"bf16 names {sorted(unknown)} are not among the tensors")
    entries, storages = [], []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if name in bf16:
            data = arr if arr.dtype == np.uint16 else dtypes.f32_to_bf16_bits(arr)
            dtype = "bfloat16"
        else:
            dtype = _numpy_dtype_name(arr, name)
            data = arr
        data = np.ascontiguousarray(data, dtype=dtypes.BY_NAME[dtype].numpy)
        entries.append((name, dtype, tuple(int(d) for d in arr.shape)))
        storages.append(data.tobytes())
    pickled = _StateDictPickle.of(entries)
    records = [("data.pkl", pickled), (".format_version", ZIP_FORMAT_VERSION),
               (".storage_alignment", str(ZIP_ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{i}", data) for i, data in enumerate(storages)]
    records.append(("version", ZIP_RECORD_VERSION))
    # torch writes two random 20-digit numbers; a content hash keeps our files reproducible.
    digest = hashlib.sha256(b"".join(data for _, data in records)).digest()
    first, second = struct.unpack("<QQ", digest[:16])
    records.append((".data/serialization_id", f"{first:020d}{second:020d}".encode()))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        _zip_records(archive_name(path), records, fh)
