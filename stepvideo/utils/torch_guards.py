"""Bounds on what a PyTorch checkpoint file can make its reader (`torch_format`) allocate.

A hostile `.bin` of a few bytes can ask for gigabytes in ways a state dict never does;
each guard refuses one of them before anything large is allocated:

* a pickle: more than `MAX_PICKLE_OPS` opcodes, memo indices past the objects memoised
  so far, lines longer than `_MAX_PICKLE_LINE`, reads past the pickle's end (`prescan_pickle`,
  `BoundedReader`);
* a tensor view: outside its storage, or addressing an element twice (stride 0,
  interleaved strides) (`check_view`);
* all tensors together holding more bytes than their storages (`check_total_bytes`);
* a zip archive: a compressed member, or a member claiming more than the archive holds
  (`check_zip_members`).

Refusals are `CheckpointBombError`s; damaged input is a `TorchFormatError`.
"""
from __future__ import annotations

import os
import pickletools
import zipfile
from typing import BinaryIO, Mapping, Tuple

from stepvideo import dtypes

# A state dict's pickle takes ~25 opcodes per tensor (the published CLIP: ~400 tensors,
# ~10k opcodes); more than this many is not a weights file, and each opcode costs memory.
MAX_PICKLE_OPS = 1_000_000
# A text line inside a pickle (GLOBAL module/name, protocol-0 numbers) is short.
_MAX_PICKLE_LINE = 4096


class TorchFormatError(ValueError):
    """A file is not a readable PyTorch checkpoint (wrong format, truncated, inconsistent)."""


class UnsafeCheckpointError(TorchFormatError):
    """A checkpoint's pickle names a global outside the tensor/state-dict allow list."""


class CheckpointBombError(TorchFormatError):
    """A checkpoint would make the reader allocate far more than the file holds."""


class BoundedReader:
    """A file seen only up to `end`: no read asks the OS for more than is left (a pickle's
    declared lengths are not trusted), and a line is at most `_MAX_PICKLE_LINE` bytes."""

    def __init__(self, fh: BinaryIO, end: int):
        self._fh, self._end = fh, end

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._end - self._fh.tell())
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        left = max(0, self._end - self._fh.tell())
        return self._fh.readline(min(left, _MAX_PICKLE_LINE))

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, pos: int) -> int:
        return self._fh.seek(pos)


def prescan_pickle(fh: BinaryIO, what: str) -> None:
    """Walk one pickle's opcodes without executing any, from fh's position to its STOP.

    Refuses what would make the unpickler allocate far more than the file holds: more
    than MAX_PICKLE_OPS opcodes, and memo indices beyond the number of objects memoised
    so far (the unpickler sizes its memo table by the largest index: a 9-byte pickle can
    ask for gigabytes). Lengths of strings and frames are checked against the bytes
    actually present by `pickletools` itself.
    """
    ops = puts = 0
    try:
        for opcode, arg, pos in pickletools.genops(fh):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise CheckpointBombError(f"{what}: more than {MAX_PICKLE_OPS} pickle opcodes; "
                                          "not a state dict (a bound against memory exhaustion)")
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                index = int(arg)
                if not 0 <= index <= puts:
                    raise CheckpointBombError(f"{what}: pickle memo index {index} at byte {pos}, but only {puts} "
                                              "objects were memoised before it (a pickler numbers them in order)")
                puts += 1
            elif opcode.name == "MEMOIZE":
                puts += 1
    except TorchFormatError:
        raise
    except Exception as e:  # pickletools raises ValueError and friends on damaged input
        raise TorchFormatError(f"{what} is not a readable pickle ({type(e).__name__}: {e})") from None


def check_view(offset: int, shape: Tuple[int, ...], stride: Tuple[int, ...], key: str, numel: int) -> None:
    """A (offset, shape, stride) view into storage `key` of `numel` elements stays inside it and
    addresses each element at most once. An empty view (a 0 in its shape) reads nothing."""
    if not all(d > 0 for d in shape):
        return
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if last >= numel:
        raise TorchFormatError(
            f"tensor view (offset {offset}, size {shape}, stride {stride}) reaches element "
            f"{last} of storage {key!r}, which has {numel} elements")
    _check_no_overlap(shape, stride, key)


def _check_no_overlap(shape: Tuple[int, ...], stride: Tuple[int, ...], key: str) -> None:
    """Refuse views that address an element twice (stride 0, or strides that interleave).

    Such a view makes a tiny storage a huge array (a stride-0 view of one element
    can claim a GiB); `torch.save` of a state dict never writes one. Sorted by
    stride, each axis must step over everything the smaller axes span.
    """
    span = 0  # elements spanned by the axes seen so far, minus one
    for d, s in sorted(((d, s) for d, s in zip(shape, stride) if d > 1), key=lambda ds: ds[1]):
        if s <= span:
            raise CheckpointBombError(
                f"tensor view (size {shape}, stride {stride}) of storage {key!r} addresses some elements more "
                "than once (a stride-0 or overlapping view); a state dict holds only non-overlapping views")
        span += (d - 1) * s


def check_total_bytes(tensors: Mapping, storages: Mapping, source: str) -> None:
    """The tensors (`TensorRef`s) together may not hold more bytes than the storages (`StorageRef`s) they view.

    Each view is checked to stay inside its storage without overlap; this stops many
    tensors that each view all of one storage (a small file read as a huge output).
    """
    out = sum(ref.nbytes for ref in tensors.values())
    stored = sum(ref.numel * dtypes.BY_NAME[ref.dtype].itemsize for ref in storages.values())
    if out > stored:
        raise CheckpointBombError(f"{source}: the tensors hold {out} bytes in all but their storages only {stored}; "
                                  "several tensors view the same elements, which a state dict does not do")


def check_zip_members(archive: zipfile.ZipFile, path: str) -> None:
    """Every member stored uncompressed and no larger than the archive itself.

    torch never compresses; a deflated member (or a size field that claims more than
    the file holds) would let a small file inflate to gigabytes when read.
    """
    archive_size = os.path.getsize(path)
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointBombError(
                f"{path}: record {info.filename!r} is compressed (method {info.compress_type}); "
                "torch.save writes every record uncompressed")
        if info.file_size != info.compress_size or info.file_size > archive_size:
            raise CheckpointBombError(
                f"{path}: record {info.filename!r} claims {info.file_size} bytes "
                f"({info.compress_size} stored) in an archive of {archive_size} bytes")
