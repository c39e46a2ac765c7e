"""Checkpoint folders -> lazily built networks, streamed tensor by tensor.

A checkpoint is a folder with `config.json` and either one `*.safetensors` file
or shards plus a `*.safetensors.index.json` (the layout of the published
`transformer/` and `step_llm/` folders), bf16 or fp32 on disk.

Loading is strict: the keys a network expects (optionally narrowed by a key
filter, e.g. one pipeline stage's blocks) must all be present with the right
shapes, and no key of the file may be left over. Everything wrong is reported
in one `CheckpointError`. Renames exist only where the reference itself remaps
(the VAE's `decoder.conv_out`), passed in by the caller.

Memory: each tensor is read into a fresh numpy array, converted to the
parameter's dtype and handed to the parameter without a further copy, so the
peak is the loaded weights plus one tensor in flight.

Streaming (`--offload blocks`, see stepvideo/streaming.py) reads the
blocks through `MappedCheckpoint` instead: the shards are memory-mapped
read-only, so their pages live in the kernel's page cache, shared by every
process on the machine that maps the same files, and a tensor's pages are
handed back (`release`) once it has been copied where it is used.
`check_host_memory` refuses a load that cannot fit before anything is read.
"""
from __future__ import annotations

import inspect
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import mindspore as ms
import numpy as np
import psutil
from mindspore import Tensor, nn

from stepvideo import dtypes
from stepvideo.utils import safetensors_io as st

log = logging.getLogger(__name__)

KeyFilter = Callable[[str], bool]
Rename = Callable[[str], str]


class Slice(NamedTuple):
    """The part of a stored tensor one rank loads: positions [start, stop) of axis `axis`."""

    axis: int
    start: int
    stop: int

    def shape(self, full: Tuple[int, ...]) -> Tuple[int, ...]:
        return full[:self.axis] + (self.stop - self.start,) + full[self.axis + 1:]


class CheckpointError(ValueError):
    """A checkpoint does not match the network it is loaded into, or is unreadable."""


@dataclass
class LoadReport:
    tensors: int
    bytes: int  # bytes of the loaded parameters in their (compute) dtype
    seconds: float


def _index_files(folder: Path) -> List[Path]:
    return sorted(folder.glob("*.safetensors.index.json"))


def weight_map(path: os.PathLike | str) -> Dict[str, Path]:
    """Checkpoint key -> file that holds it, for a file, a folder, or a sharded folder."""
    path = Path(path)
    if path.is_file():
        with st.SafetensorsFile(path) as f:
            return {k: path for k in f.keys()}
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    indexes = _index_files(path)
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; expected one")
    if indexes:
        try:
            mapping = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]}: not a valid index file ({e})") from None
        files = {name: path / _shard_name(name, indexes[0]) for name in set(mapping.values())}
        missing = sorted(n for n, p in files.items() if not p.is_file())
        if missing:
            raise CheckpointError(f"{indexes[0]} names shard(s) that do not exist: {missing}")
        return {k: files[v] for k, v in mapping.items()}
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) != 1:
        raise CheckpointError(
            f"{path}: expected one *.safetensors file or an *.safetensors.index.json, found "
            f"{[p.name for p in singles] or 'none'}")
    return weight_map(singles[0])


def _shard_name(name, index: Path) -> str:
    """A shard file name from an index, which must stay inside the checkpoint folder.

    Checked on the name itself (no absolute path, no '..'), not on where symlinks lead: a
    downloaded snapshot's files are often symlinks into a cache, which the folder's owner made.
    """
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointError(f"{index} names shard {name!r}; expected a file name inside {index.parent} "
                              "(relative, without '..')")
    return name


def numpy_dtype(dtype: ms.dtype) -> np.dtype:
    """The numpy dtype a parameter of `dtype` holds its values in (bf16: MindSpore's numpy bfloat16)."""
    try:
        row = dtypes.of_mindspore(dtype)
    except TypeError:
        raise CheckpointError(f"cannot load into a parameter of dtype {dtype}") from None
    return dtypes.mindspore_bf16(np.zeros(0, np.uint16)).dtype if row is dtypes.BF16 else row.numpy


def _to_parameter_tensor(arr: np.ndarray, stored: str, dtype: ms.dtype) -> Tensor:
    """Convert one stored tensor to `dtype` with at most one copy."""
    if stored == st.BF16 and dtype == ms.bfloat16:
        return Tensor.from_numpy(dtypes.mindspore_bf16(arr))
    if stored == st.BF16:
        arr = dtypes.bf16_bits_to_f32(arr)
    if dtype == ms.bfloat16:
        return Tensor.from_numpy(np.ascontiguousarray(arr, np.float32)).astype(ms.bfloat16)
    try:
        row = dtypes.of_mindspore(dtype)
    except TypeError:
        raise CheckpointError(f"cannot load into a parameter of dtype {dtype}") from None
    return Tensor.from_numpy(np.ascontiguousarray(arr.astype(row.numpy, copy=False)))


def named_parameters(net: nn.Cell) -> Dict[str, ms.Parameter]:
    return {name: p for name, p in net.parameters_and_names()}


def read_slice(path: os.PathLike | str, info: st.TensorInfo, part: Slice) -> np.ndarray:
    """Read only `part` of the stored tensor `info` of file `path` (as stored: bf16 as uint16 bits).

    The slice is `outer` runs of contiguous bytes (one run when it cuts the first axis), each read
    into its place in the result: the rest of the tensor is never read.
    """
    shape = tuple(info.shape)
    if not 0 <= part.axis < len(shape) or not 0 <= part.start < part.stop <= shape[part.axis]:
        raise CheckpointError(f"{path}: slice {tuple(part)} does not fit tensor {info.name!r} of shape {list(shape)}")
    dtype = dtypes.BY_SAFETENSORS[info.dtype].numpy
    outer = int(np.prod(shape[:part.axis], dtype=np.int64))
    inner = int(np.prod(shape[part.axis + 1:], dtype=np.int64)) * dtype.itemsize  # bytes per index of the axis
    run = (part.stop - part.start) * inner
    out = np.empty(part.shape(shape), dtype=dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(outer):
            offset = info.start + (i * shape[part.axis] + part.start) * inner
            if os.preadv(fd, [view[i * run:(i + 1) * run]], offset) != run:
                raise CheckpointError(f"{path}: tensor {info.name!r} truncated")
    finally:
        os.close(fd)
    return out


def load_weights(net: nn.Cell, path: os.PathLike | str, *, key_filter: Optional[KeyFilter] = None,
                 rename: Optional[Rename] = None, slices: Optional[Mapping[str, Slice]] = None) -> LoadReport:
    """Stream a checkpoint into `net`, strictly.

    key_filter: applied to parameter names; only the parameters it accepts are
        expected and loaded (the others stay lazy and take no memory), and file
        keys that map to rejected names are skipped.
    rename: maps a file key to a parameter name (only for the reference's remaps).
    slices: parameter name -> the `Slice` of the stored tensor it holds (tensor parallelism);
        only that part is read from the file, and the parameter has the slice's shape.
    """
    slices = slices or {}
    t0 = time.perf_counter()
    params = named_parameters(net)
    accept = key_filter or (lambda name: True)
    expected = {n for n in params if accept(n)}
    files = weight_map(path)
    rename = rename or (lambda k: k)

    wanted: Dict[Path, List[Tuple[str, str]]] = {}  # file -> [(file key, param name)]
    unexpected, seen = [], set()
    for key, file in files.items():
        name = rename(key)
        if not accept(name):
            continue
        if name not in params:
            unexpected.append(key)
            continue
        seen.add(name)
        wanted.setdefault(file, []).append((key, name))
    missing = sorted(expected - seen)
    check_host_memory(sum(int(np.prod(params[n].shape)) * np.dtype(numpy_dtype(params[n].dtype)).itemsize
                          for n in seen), f"loading {path} into {type(net).__name__}")

    wrong_shape = []
    opened: Dict[Path, st.SafetensorsFile] = {}
    try:
        for file, pairs in wanted.items():
            opened[file] = st.SafetensorsFile(file)
            for key, name in pairs:
                if key not in opened[file].tensors:
                    missing.append(f"{name} (listed in the index but absent from {file.name})")
                    continue
                shape = tuple(opened[file].tensors[key].shape)
                if name in slices:
                    shape = slices[name].shape(shape)  # (an axis the tensor lacks gives a wrong shape)
                if tuple(shape) != tuple(params[name].shape):
                    wrong_shape.append(f"{key}: file {list(shape)} vs parameter {list(params[name].shape)}")
        if missing or unexpected or wrong_shape:
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {missing}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
            if wrong_shape:
                parts.append(f"wrong shapes ({len(wrong_shape)}): {wrong_shape}")
            raise CheckpointError(f"checkpoint {path} does not match {type(net).__name__}: " + "; ".join(parts))

        total = 0
        count = 0
        for file, pairs in wanted.items():
            f = opened[file]
            for key, name in pairs:
                param = params[name]
                raw = read_slice(file, f.tensors[key], slices[name]) if name in slices else f.read_raw(key)
                tensor = _to_parameter_tensor(raw, f.tensors[key].dtype, param.dtype)
                param.set_data(tensor)
                total += tensor.nbytes
                count += 1
    finally:
        for f in opened.values():
            f.close()
    return LoadReport(tensors=count, bytes=total, seconds=time.perf_counter() - t0)


# Files a user may have instead of safetensors: none of them has raw tensor bytes at known offsets.
_UNMAPPABLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")


class MappedCheckpoint:
    """The tensors of a checkpoint's safetensors files, memory-mapped read-only.

        mapped = MappedCheckpoint(folder, keys)        # maps the shards holding `keys`
        stored, dtype = mapped.view(key)                # numpy view of the file bytes (bf16: uint16 bits)
        ...copy or convert `stored` where it is used...
        mapped.release(key)                             # its pages leave this process's RSS

    The pages of a read-only file mapping are the page cache's: every process that maps
    the same shard shares one copy, and after `release` (madvise DONTNEED) they count for
    no process while staying cached for the next read.
    """

    def __init__(self, path: os.PathLike | str, keys: Iterable[str]):
        self.path = Path(path)
        files = _mappable_weight_map(self.path)
        keys = list(keys)
        absent = sorted(k for k in keys if k not in files)
        if absent:
            raise CheckpointError(f"checkpoint {path}: missing keys ({len(absent)}): {absent}")
        self.tensors: Dict[str, st.TensorInfo] = {}
        self._file_of: Dict[str, Path] = {}
        self._maps: Dict[Path, mmap.mmap] = {}
        try:
            for file in sorted({files[k] for k in keys}):
                with st.SafetensorsFile(file) as f:
                    header = f.tensors
                for k in keys:
                    if files[k] == file:
                        if k not in header:
                            raise CheckpointError(f"{file}: tensor {k!r} is listed in the index but absent")
                        self.tensors[k] = header[k]
                        self._file_of[k] = file
                with open(file, "rb") as fh:
                    try:
                        self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    except (OSError, ValueError) as e:
                        raise CheckpointError(f"{file}: cannot be memory-mapped ({e}); streaming needs the "
                                              "checkpoint on a local file system") from None
        except BaseException:
            self.close()
            raise

    def view(self, key: str) -> Tuple[np.ndarray, str]:
        """(the stored bytes of `key` as a read-only numpy array, its safetensors dtype); no copy."""
        info = self.tensors[key]
        arr = np.frombuffer(self._maps[self._file_of[key]], dtype=dtypes.BY_SAFETENSORS[info.dtype].numpy,
                            count=int(np.prod(info.shape)), offset=info.start)
        return arr.reshape(info.shape), info.dtype

    def release(self, key: str) -> None:
        """Drop the pages of `key` from this process's resident set (they stay in the page cache).

        Whole pages are dropped, also ones shared with a neighbouring tensor: a later read of
        the neighbour simply maps them again, from the cache.
        """
        info = self.tensors[key]
        start = info.start - info.start % mmap.PAGESIZE
        self._maps[self._file_of[key]].madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def _mappable_weight_map(path: Path) -> Dict[str, Path]:
    """`weight_map`, with an error that says why streaming cannot use other formats."""
    if path.is_dir() and not _index_files(path) and not list(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.iterdir() if p.suffix in _UNMAPPABLE_SUFFIXES)
        if others:
            raise CheckpointError(
                f"{path}: {others} cannot be memory-mapped for streaming (--offload); streaming needs "
                "safetensors files (raw tensor bytes at offsets the header gives), e.g. the published "
                "*.safetensors shards + index")
    return weight_map(path)


def check_host_memory(needed: int, what: str, available: Optional[int] = None) -> None:
    """Refuse, before loading, a load whose resident bytes exceed the host's available memory.

    available: defaults to MemAvailable (free memory plus reclaimable page cache). Processes
    that start together each see the same figure, so several ranks on one machine are each
    checked against all of it.
    """
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise CheckpointError(f"{what} needs {needed / 2**30:.2f} GiB of host memory, but only "
                              f"{available / 2**30:.2f} GiB is available")


def save_sharded(tensors: Mapping[str, np.ndarray], folder: os.PathLike | str, prefix: str,
                 max_shard_bytes: int, bf16: bool = False) -> List[Path]:
    """Write `tensors` as `<prefix>-0000k-of-0000n.safetensors` shards plus an index.

    The layout and names are those of the published checkpoints (and of
    diffusers/transformers `save_pretrained`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * (2 if bf16 else tensors[name].dtype.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    n = len(shards)
    paths, mapping = [], {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        st.save_file(folder / fname, shard, bf16=shard.keys() if bf16 else ())
        paths.append(folder / fname)
        for name, arr in shard.items():
            mapping[name] = fname
            total += arr.size * (2 if bf16 else arr.dtype.itemsize)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def read_config(folder: os.PathLike | str, name: str = "config.json") -> Dict:
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model folder needs its {name}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def init_kwargs(cls: type, config: Mapping) -> Dict:
    """The entries of `config` that `cls.__init__` accepts (others, like `_class_name`, are dropped)."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ignored = sorted(k for k in config if k not in accepted and not k.startswith("_"))
    if ignored:
        log.debug("%s ignores config fields %s", cls.__name__, ignored)
    return {k: v for k, v in config.items() if k in accepted}


class PretrainedMixin:
    """`from_pretrained(folder)` for networks built from a `config.json`.

    The network is built lazily (no weight memory), then the folder's weights are
    streamed in strictly. `key_filter` loads a subset (a pipeline stage).
    """

    @classmethod
    def from_config_dict(cls, config: Mapping):
        return cls(**init_kwargs(cls, config))

    @classmethod
    def from_pretrained(cls, folder: os.PathLike | str, *, key_filter: Optional[KeyFilter] = None, **overrides):
        config = dict(read_config(folder))
        config.update(overrides)
        net = cls.from_config_dict(config)
        report = load_weights(net, folder, key_filter=key_filter)
        log.info("%s: loaded %d tensors (%.1f MiB) from %s in %.2fs", cls.__name__, report.tensors,
                 report.bytes / 2**20, folder, report.seconds)
        net.set_train(False)
        return net


def parameter_count(net: nn.Cell, names: Optional[Iterable[str]] = None) -> int:
    params = named_parameters(net)
    keys = params.keys() if names is None else names
    return sum(int(np.prod(params[k].shape)) for k in keys)
