"""PyTorch checkpoint files (what `torch.save` writes), read and written without torch.

Why: the HunyuanCLIP text encoder ships as `pytorch_model.bin`, and the tiny demo
checkpoint must contain one too. Unpickling such a file with plain `pickle` (or
torch.load without weights_only) runs whatever callables the file names, so a
checkpoint from an untrusted source can execute code. Here every pickle goes
through `RestrictedTorchUnpickler`, whose `find_class` hands out only our own
stand-ins for the few names a state dict needs (the tensor rebuild functions,
typed storage classes, `OrderedDict`); any other global is refused by name and
never imported or called.

Two on-disk layouts exist:

* zip (default since torch 1.6): an uncompressed zip archive whose members live
  under one folder `<archive>/`: `data.pkl` (the object pickle, protocol 2),
  `data/<key>` (raw bytes of each storage), `byteorder`, `version` and a few
  bookkeeping records. Each member's data starts 64-byte aligned.
* legacy: five concatenated pickles -- magic number, protocol version, system
  info, the object, the sorted list of storage keys -- followed, per key, by the
  storage's element count (int64) and its raw bytes.

In both, a tensor is pickled as `torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks)` where `storage` is
a persistent id naming a storage by key. Tensors are therefore (storage,
offset, shape, stride) views: several may share one storage, start at an
offset into it, or be non-contiguous; `TensorRef.read` materialises exactly the
elements the view addresses.

What a hostile file could make this reader allocate is bounded by `stepvideo.utils.torch_guards`
(pickle opcodes and memo, views, total bytes, zip members), checked before any data is read.
bfloat16 has no numpy dtype: it travels as uint16 bit patterns (`stepvideo.dtypes`).
Writing such files (for tests and the tiny demo checkpoint) is `scripts/torch_checkpoint_writer.py`.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from stepvideo import dtypes
from stepvideo.utils.torch_guards import (BoundedReader, CheckpointBombError, TorchFormatError, UnsafeCheckpointError,
                                          check_total_bytes, check_view, check_zip_members, prescan_pickle)

# First pickle of a legacy file, and the protocol version that follows it.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# --------------------------------------------------------------------------- stand-ins
# Objects the restricted unpickler hands out instead of torch's; frozen and slotted
# so a pickle cannot mutate them with BUILD.


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for a typed storage class such as `torch.FloatStorage`."""

    name: str
    dtype: str


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage named by a persistent id: `numel` elements of `dtype` under `key`."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as a strided view into a storage; element strides, element offset."""

    storage: StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtypes.BY_NAME[self.dtype].itemsize


def _int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int for v in value):
        raise TorchFormatError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return value


def _tensor_ref(storage, storage_offset, size, stride) -> TensorRef:
    """Validate a (storage, offset, size, stride) view so reading it stays inside the storage."""
    if not isinstance(storage, StorageRef):
        raise TorchFormatError(f"tensor storage must come from a persistent id, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise TorchFormatError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    shape, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(stride) or any(d < 0 for d in shape) or any(s < 0 for s in stride):
        raise TorchFormatError(f"tensor has invalid size {shape} / stride {stride}")
    check_view(storage_offset, shape, stride, storage.key, storage.numel)
    return TensorRef(storage, storage_offset, shape, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRef:
    """Our `torch._utils._rebuild_tensor_v2`: autograd flags, hooks and metadata do not matter here."""
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> TensorRef:
    """Our `torch._utils._rebuild_tensor` (pickles of torch < 1.0)."""
    return _tensor_ref(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS: Dict[Tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", d.torch_storage): StorageType(d.torch_storage, d.name) for d in dtypes.TABLE},
}


class RestrictedTorchUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's state dict while refusing every global outside the allow list.

    `resolve_storage` turns a persistent id (the tuple after `'storage'`) into a
    `StorageRef`; without it, persistent ids are refused (the legacy header pickles).
    """

    def __init__(self, file: BinaryIO, resolve_storage: Optional[Callable[[tuple], StorageRef]] = None):
        super().__init__(file)
        self._resolve_storage = resolve_storage

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to unpickle global '{module}.{name}': a weights checkpoint may only reference "
                "torch tensor rebuild functions, typed storages and collections.OrderedDict") from None

    def persistent_load(self, pid):
        if self._resolve_storage is None:
            raise TorchFormatError(f"unexpected persistent id {pid!r} outside the object pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFormatError(f"unsupported persistent id {pid!r}; expected ('storage', ...)")
        return self._resolve_storage(pid[1:])


def _unpickle(fh: BinaryIO, what: str, resolve_storage=None):
    """Pre-scan the pickle at fh's position (`prescan_pickle`), then unpickle it restrictedly."""
    start = fh.tell()
    prescan_pickle(fh, what)
    fh.seek(start)
    try:
        return RestrictedTorchUnpickler(fh, resolve_storage).load()
    except TorchFormatError as e:
        raise type(e)(f"{what}: {e}") from None
    except Exception as e:  # a damaged or hostile pickle can fail in any of the unpickler's ways
        raise TorchFormatError(f"{what} is not a readable pickle ({type(e).__name__}: {e})") from None


class _StorageTable:
    """Storages met while unpickling, checked for consistent dtype and size per key."""

    def __init__(self, with_view_metadata: bool):
        self.storages: Dict[str, StorageRef] = {}
        self._fields = 5 if with_view_metadata else 4

    def resolve(self, fields: tuple) -> StorageRef:
        if len(fields) != self._fields:
            raise TorchFormatError(f"storage persistent id has {len(fields) + 1} fields, "
                                   f"expected {self._fields + 1}: {('storage',) + fields!r}")
        storage_type, key, location, numel = fields[:4]
        if not isinstance(storage_type, StorageType):
            raise TorchFormatError(f"storage {key!r}: type {storage_type!r} is not a typed storage class")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise TorchFormatError(f"malformed storage persistent id {('storage',) + fields!r}")
        if self._fields == 5 and fields[4] is not None:
            raise TorchFormatError(f"storage {key!r} is a storage view (pre-1.0 torch), which is not supported")
        ref = StorageRef(key, storage_type.dtype, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise TorchFormatError(f"storage {key!r} is referenced as {known} and as {ref}")
        return known


def _state_dict(obj, source: str) -> Dict[str, TensorRef]:
    if not isinstance(obj, dict):
        raise TorchFormatError(f"{source}: holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise TorchFormatError(
                f"{source}: entry {name!r} is a {type(value).__name__}, expected a tensor in a flat state dict")
    return dict(obj)


# --------------------------------------------------------------------------- reading


class TorchCheckpoint:
    """A `torch.save`d state dict opened for reading, tensor by tensor.

    `tensors` maps names (in file order) to `TensorRef`s: dtype and shape are known
    before any data is read. `read(name)` returns a fresh C-contiguous array in
    native byte order (bfloat16 as uint16 bits).
    """

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self._zip: Optional[zipfile.ZipFile] = None
        self._file: Optional[BinaryIO] = None
        self._storage_members: Dict[str, str] = {}  # zip: storage key -> member name
        self._storage_offsets: Dict[str, int] = {}  # legacy: storage key -> byte offset of its data
        self._big_endian = False
        with open(self.path, "rb") as fh:
            head = fh.read(4)
        try:
            if head == b"PK\x03\x04":
                self.format = "zip"
                self.tensors = self._open_zip()
            else:
                self.format = "legacy"
                self.tensors = self._open_legacy()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "TorchCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._file is not None:
            self._file.close()

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    # zip ---------------------------------------------------------------------------

    def _open_zip(self) -> Dict[str, TensorRef]:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise TorchFormatError(
                f"{self.path}: zip checkpoint is truncated or corrupted ({e})") from None
        check_zip_members(self._zip, self.path)
        names = set(self._zip.namelist())
        pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if len(pickles) != 1:
            raise TorchFormatError(
                f"{self.path}: expected exactly one '<archive>/data.pkl' in the zip, found {pickles or 'none'}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            order = self._read_member(prefix + "byteorder").decode("ascii", "replace")
            if order not in ("little", "big"):
                raise TorchFormatError(f"{self.path}: byteorder record says {order!r}, expected little or big")
            self._big_endian = order == "big"
        table = _StorageTable(with_view_metadata=False)
        obj = _unpickle(io.BytesIO(self._read_member(pickles[0])), f"{self.path}: {pickles[0]}", table.resolve)
        tensors = _state_dict(obj, self.path)
        for key, ref in table.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise TorchFormatError(f"{self.path}: storage {key!r} has no record {member!r}")
            size = self._zip.getinfo(member).file_size
            expected = ref.numel * dtypes.BY_NAME[ref.dtype].itemsize
            if size != expected:
                raise TorchFormatError(
                    f"{self.path}: storage {key!r} holds {size} bytes, expected {expected} "
                    f"({ref.numel} x {ref.dtype})")
            self._storage_members[key] = member
        check_total_bytes(tensors, table.storages, self.path)
        return tensors

    def _read_member(self, member: str) -> bytes:
        try:
            return self._zip.read(member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise TorchFormatError(f"{self.path}: record {member!r} is unreadable ({e})") from None

    # legacy ------------------------------------------------------------------------

    def _open_legacy(self) -> Dict[str, TensorRef]:
        self._file = open(self.path, "rb")
        fh, src = BoundedReader(self._file, os.fstat(self._file.fileno()).st_size), self.path
        not_a_checkpoint = f"{src}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch pickle)"
        try:
            magic = _unpickle(fh, f"{src}: first pickle")
        except (UnsafeCheckpointError, CheckpointBombError):
            raise
        except TorchFormatError:
            raise TorchFormatError(not_a_checkpoint) from None
        if magic != LEGACY_MAGIC_NUMBER:
            raise TorchFormatError(not_a_checkpoint)
        version = _unpickle(fh, f"{src}: protocol version")
        if version != LEGACY_PROTOCOL_VERSION:
            raise TorchFormatError(f"{src}: legacy protocol version {version!r}, expected {LEGACY_PROTOCOL_VERSION}")
        sys_info = _unpickle(fh, f"{src}: system info")
        if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
            raise TorchFormatError(f"{src}: system info {sys_info!r} lacks little_endian")
        self._big_endian = not sys_info["little_endian"]
        table = _StorageTable(with_view_metadata=True)
        tensors = _state_dict(_unpickle(fh, f"{src}: object pickle", table.resolve), src)
        keys = _unpickle(fh, f"{src}: storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchFormatError(f"{src}: storage key list is {type(keys).__name__}, expected a list of str")
        if set(keys) != set(table.storages) or len(keys) != len(table.storages):
            raise TorchFormatError(
                f"{src}: storage key list {sorted(keys)} does not match the storages the tensors use "
                f"{sorted(table.storages)}")
        # Storages follow in list order, each as int64 element count + raw bytes.
        file_size = os.fstat(self._file.fileno()).st_size
        pos = fh.tell()
        count_format = ">q" if self._big_endian else "<q"
        for key in keys:
            ref = table.storages[key]
            fh.seek(pos)
            raw = fh.read(8)
            if len(raw) != 8:
                raise TorchFormatError(f"{src}: truncated before storage {key!r}")
            (numel,) = struct.unpack(count_format, raw)
            if numel != ref.numel:
                raise TorchFormatError(f"{src}: storage {key!r} has {numel} elements on disk, "
                                       f"the pickle says {ref.numel}")
            self._storage_offsets[key] = pos + 8
            pos += 8 + numel * dtypes.BY_NAME[ref.dtype].itemsize
            if pos > file_size:
                raise TorchFormatError(f"{src}: truncated inside storage {key!r} "
                                       f"(needs {pos} bytes, file has {file_size})")
        check_total_bytes(tensors, table.storages, src)
        return tensors

    # data --------------------------------------------------------------------------

    def _read_storage(self, ref: StorageRef) -> np.ndarray:
        dtype = dtypes.BY_NAME[ref.dtype].numpy
        if self._big_endian:
            dtype = dtype.newbyteorder(">")
        nbytes = ref.numel * dtype.itemsize
        if self.format == "zip":
            raw = self._read_member(self._storage_members[ref.key])
        else:
            self._file.seek(self._storage_offsets[ref.key])
            raw = self._file.read(nbytes)
        if len(raw) != nbytes:
            raise TorchFormatError(f"{self.path}: storage {ref.key!r} truncated ({len(raw)} of {nbytes} bytes)")
        return np.frombuffer(raw, dtype=dtype)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new C-contiguous array (bfloat16 as uint16 bits)."""
        try:
            ref = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None
        storage = self._read_storage(ref.storage)
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset:], shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride),
            writeable=False)
        return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C")

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.read(name)


def load_state_dict(path: os.PathLike | str) -> Dict[str, Tuple[np.ndarray, str]]:
    """All tensors of a checkpoint: name -> (array, dtype name); bfloat16 as uint16 bits."""
    with TorchCheckpoint(path) as ckpt:
        return {name: (ckpt.read(name), ckpt.tensors[name].dtype) for name in ckpt.tensors}
