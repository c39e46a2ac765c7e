"""Hostile PyTorch checkpoints that cost memory, not code: each a small file that a careless reader
turns into gigabytes. Used by tests/unit/test_torch_format_bombs.py and scripts/benchmark_hostile.py.

Every builder writes one file and returns (path, what a careless reader would allocate in bytes).
The pickles are written opcode by opcode (no torch needed), in the layout `torch.save` uses.
"""
from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import List, Sequence, Tuple

import torch_checkpoint_writer as writer
from stepvideo.utils import torch_guards

GiB = 2**30


def _unicode(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _tuple(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


# (name, storage key, storage numel, offset, shape, stride), float32 storages
View = Tuple[str, str, int, int, Tuple[int, ...], Tuple[int, ...]]


def state_dict_pickle(views: Sequence[View]) -> bytes:
    """Protocol-2 pickle of {name: _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())}."""
    out = bytearray(b"\x80\x02}(")
    for name, key, numel, offset, shape, stride in views:
        out += _unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode(key) + _unicode("cpu")
        out += _int(numel) + b"tQ"
        out += _int(offset) + _tuple(shape) + _tuple(stride) + b"\x89ccollections\nOrderedDict\n)RtR"
    out += b"u."
    return bytes(out)


def write_zip(path: Path, pickled: bytes, storages: Sequence[Tuple[str, bytes]]) -> Path:
    """A torch.save-style uncompressed zip with `pickled` as data.pkl and the given storages."""
    records: List[Tuple[str, bytes]] = [("data.pkl", pickled), ("byteorder", b"little")]
    records += [(f"data/{key}", data) for key, data in storages]
    with open(path, "wb") as fh:
        writer._zip_records("archive", records, fh)
    return path


def stride_zero(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """One float32 element viewed as `nbytes / 4` elements with stride 0."""
    n = nbytes // 4
    return write_zip(path, state_dict_pickle([("w", "0", 1, 0, (n,), (0,))]), [("0", bytes(4))]), n * 4


def overlapping(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """(rows, 1024) with strides (1, 1): every row starts one element after the previous (a Hankel view)."""
    rows = nbytes // 4 // 1024
    numel = rows + 1023
    pickled = state_dict_pickle([("w", "0", numel, 0, (rows, 1024), (1, 1))])
    return write_zip(path, pickled, [("0", bytes(4 * numel))]), rows * 1024 * 4


def shared_storage(path: Path, nbytes: int = GiB, storage_bytes: int = 4 * 2**20) -> Tuple[Path, int]:
    """Many tensors, each a plain view of all of one storage."""
    numel = storage_bytes // 4
    count = nbytes // storage_bytes
    views = [(f"w{i}", "0", numel, 0, (numel,), (1,)) for i in range(count)]
    return write_zip(path, state_dict_pickle(views), [("0", bytes(storage_bytes))]), count * storage_bytes


def beyond_storage(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """A contiguous view far longer than its one-element storage."""
    n = nbytes // 4
    return write_zip(path, state_dict_pickle([("w", "0", 1, 0, (n,), (1,))]), [("0", bytes(4))]), n * 4


def _deflated_zip(path: Path, member: str, head: bytes, zeros: int, others: Sequence[Tuple[str, bytes]]) -> Path:
    """A zip whose `member` (head + `zeros` zero bytes) is deflated, written streaming (never all in memory)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in others:
            z.writestr(f"archive/{name}", data)
        info = zipfile.ZipInfo(f"archive/{member}")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as out:
            out.write(head)
            chunk = bytes(2**20)
            for _ in range(zeros // len(chunk)):
                out.write(chunk)
    return path


def deflated_pickle(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """data.pkl deflated: a valid one-tensor pickle followed by `nbytes` zeros (inflates ~1000:1)."""
    pickled = state_dict_pickle([("w", "0", 1, 0, (1,), (1,))])
    return _deflated_zip(path, "data.pkl", pickled, nbytes, [("data/0", bytes(4))]), nbytes


def deflated_storage(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """A storage record deflated: `nbytes` of zeros in a few hundred kB."""
    n = nbytes // 4
    pickled = state_dict_pickle([("w", "0", n, 0, (n,), (1,))])
    return _deflated_zip(path, "data/0", b"", nbytes, [("data.pkl", pickled)]), nbytes


def oversized_member(path: Path, nbytes: int = GiB) -> Tuple[Path, int]:
    """A stored record whose directory entry claims `nbytes` (more than the whole archive)."""
    pickled = state_dict_pickle([("w", "0", 1, 0, (1,), (1,))])
    write_zip(path, pickled, [("0", bytes(4))])
    data = bytearray(path.read_bytes())
    name = b"archive/data/0"
    entry = data.index(b"PK\x01\x02")
    while True:  # the central directory entry of the storage record
        (name_len,) = struct.unpack_from("<H", data, entry + 28)
        if bytes(data[entry + 46:entry + 46 + name_len]) == name:
            break
        entry = data.index(b"PK\x01\x02", entry + 4)
    struct.pack_into("<II", data, entry + 20, nbytes, nbytes)  # compressed and uncompressed sizes
    path.write_bytes(bytes(data))
    return path, nbytes


def legacy_memo_index(path: Path, index: int = 2**27) -> Tuple[Path, int]:
    """A legacy (non-zip) file whose first pickle memoises its object at a huge index."""
    path.write_bytes(b"\x80\x02K\x01r" + struct.pack("<I", index) + b".")
    return path, 2 * index * 8  # the unpickler grows its memo table to twice the index, 8 bytes an entry


def many_opcodes(path: Path, count: int = torch_guards.MAX_PICKLE_OPS + 10) -> Tuple[Path, int]:
    """A data.pkl of `count` opcodes (a list of Nones): more than any state dict needs."""
    pickled = b"\x80\x02(" + b"N" * count + b"l."
    return write_zip(path, pickled, []), count * 8


BOMBS = {
    "stride-0 view": stride_zero,
    "overlapping view": overlapping,
    "tensors sharing one storage": shared_storage,
    "view beyond its storage": beyond_storage,
    "deflated data.pkl": deflated_pickle,
    "deflated storage": deflated_storage,
    "record larger than the file": oversized_member,
    "legacy pickle, huge memo index": legacy_memo_index,
    "pickle with too many opcodes": many_opcodes,
}


def convert_bomb(folder: Path, vocab: int = 196_608, hidden: int = 1024) -> Tuple[Path, Path, int]:
    """(pytorch_model.bin, config.json, output bytes): every BERT tensor a stride-0 view of one element.

    With these sizes a ~3 KB .bin would convert to an 805 MB safetensors file.
    """
    import convert

    config = {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": 0, "intermediate_size": hidden,
              "vocab_size": vocab, "max_position_embeddings": 8, "type_vocab_size": 2}
    shapes = convert.bert_expected_shapes(config)
    views = [(name, "0", 1, 0, shape, (0,) * len(shape)) for name, shape in shapes.items()]
    (folder / "config.json").write_text(json.dumps(config))
    out_bytes = sum(4 * math.prod(shape) for shape in shapes.values())
    return write_zip(folder / "pytorch_model.bin", state_dict_pickle(views), [("0", bytes(4))]), \
        folder / "config.json", out_bytes



# --------------------------------------------------------------------------- measuring a reader

_CHILD = r"""
import json, resource, sys, time
root, mode, path, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
import convert
import torch_checkpoint_writer as writer
from stepvideo.utils import torch_format as tf

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def vm_size():
    return status("VmSize")

# Peak RSS from here on: reset the high-water mark (ru_maxrss would also hold the forking test
# runner's RSS, which exec keeps, and so hide a bomb smaller than the runner).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status("VmHWM")
# A hard cap on the address space: a reader that falls for the bomb gets MemoryError, not the machine.
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + cap, resource.RLIM_INFINITY))
started = time.perf_counter()
produced, error = 0, None
try:
    if mode == "read":
        with tf.TorchCheckpoint(path) as ckpt:
            for name in ckpt.keys():
                produced += ckpt.read(name).nbytes
    else:
        folder = path.rsplit("/", 1)[0]
        summary = convert.convert(path, folder + "/model.safetensors", folder + "/config.json")
        produced = summary.output_bytes
except MemoryError:
    error = "MemoryError (the address-space cap was reached)"
except Exception as e:
    error = f"{type(e).__name__}: {e}"
seconds = time.perf_counter() - started
peak = status("VmHWM")
print(json.dumps({"error": error, "seconds": seconds, "baseline": baseline, "peak": peak,
                  "peak_over_baseline": peak - baseline, "produced_bytes": produced}))
"""


def measure(root: Path, mode: str, path: Path, cap_bytes: int = 3 * GiB, timeout: float = 300) -> dict:
    """Open `path` with the reader of the checkout at `root` in a fresh process capped at `cap_bytes` more
    address space: mode "read" reads every tensor, "convert" runs convert.convert beside the file.

    Returns {error, seconds, baseline, peak, peak_over_baseline, produced_bytes} (bytes; peak = VmHWM after a reset).
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "scripts")]), "OPENBLAS_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root), mode, str(path), str(cap_bytes)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(root))
    if done.returncode != 0:
        raise RuntimeError(f"measuring child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
