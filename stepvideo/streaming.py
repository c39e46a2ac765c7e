"""Block streaming (`--offload blocks`): a model's identical blocks live in the mapped checkpoint, not in memory.

    report, streamer = dit_streaming(model, folder, blocks)   # installs model.block_hook = streamer.block
    # the model then runs block i as:  with model.block_hook(i) as cell: x = cell(x, ...)

The DiT is 48 identical blocks used strictly in order, so only the block that runs
and the next one need their weights in place. Everything outside the blocks is
loaded as usual (`load_weights`); the blocks' tensors stay in the memory-mapped
safetensors shards (`MappedCheckpoint`, pages shared by every process on the machine
through the page cache) and are copied into one of two slots just before use:

- slot s holds the weights of the blocks at positions s, s + 2, s + 4, ... of the
  streamed order: every block's parameters are bound to their slot's buffers once, at
  install, and a fill writes the block's tensors into those buffers in place; every
  block of a slot is computed by the slot's first block cell, so a compiled model has
  2 block graphs, not one per block;
- entering block k waits for its fill, then starts the fill of the next block in the
  order (cyclically: after the last block comes the first, for the next micro-batch or
  step) into the other slot, which block k - 1 has finished with; the fill overlaps
  block k's compute;
- after a tensor is copied, its mapped pages are released from the process (they stay
  in the page cache for the next step).

Why slots instead of `Parameter.set_data` per block: a compiled graph (`mindspore.jit`,
the default) keeps the memory its parameters had at its first call, and a later
`set_data` is not seen by it (measured: the second block computed with the first
block's weights), while an in-place write into that memory is. In-place writes also
keep the memory fixed: non-block weights + 2 slots, whatever the number of blocks.

A fill on each device (the only device-specific part, chosen by
`backend.weight_copy_stream()`):
- CPU (`HostSlots`): the parameters live in host memory, so the slot is a host buffer
  and the "transfer" is the read from the mapped file, bf16 widened to fp32 on the way
  (bit-exact, as `load_weights` does). It runs on one background thread while the
  block computes; the main thread waits for it only when a block's fill is not done.
- Ascend (`DeviceSlots`): the slot is device memory; the fill is an asynchronous
  host-to-device copy straight from the mapped bf16 pages on a separate stream, ordered
  by events (the copy into a slot waits for the block that used it; the block waits
  for its copy). Written against MindSpore 2.7's documented `mindspore.runtime.Stream` /
  `Event` / `StreamCtx` / `Tensor.copy_(non_blocking=True)`; run on CPU kernels through a
  stand-in of the stream API (tests/unit/test_streaming.py: same bits, event order), never
  on an NPU (see docs/performance.md, "Block streaming").

Where it lives: beside `checkpoint.py`, as a way of loading weights. Both the DiT (single
process and `parallel/pipeline.py`) and Step-LLM (`Step1Model.from_pretrained_streaming`) use
it, so it sits below them in the dependency order rather than in `parallel/`.

Requirements: every block has the same parameter names, shapes and dtypes (checked);
parameters are floating point; the blocks are safetensors tensors (`MappedCheckpoint`
says why another format cannot be mapped).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import mindspore as ms
import numpy as np
import psutil
from mindspore import Parameter, Tensor, nn

from stepvideo import backend
from stepvideo.checkpoint import (CheckpointError, KeyFilter, LoadReport, MappedCheckpoint, numpy_dtype,
                                  check_host_memory, load_weights, named_parameters)
from stepvideo.utils import safetensors_io as st

log = logging.getLogger(__name__)

SLOTS = 2  # the block that runs + the next one being filled

# (stored safetensors dtype, parameter dtype) pairs a fill can write without rounding.
_FILLS = {("F32", ms.float32), ("BF16", ms.float32), ("F16", ms.float32), ("BF16", ms.bfloat16),
          ("F16", ms.float16)}


@dataclass
class StreamStats:
    """What streaming cost on one process, accumulated over its calls."""

    fills: int = 0
    bytes_read: int = 0  # bytes of the mapped files read
    fill_seconds: float = 0.0  # time spent filling slots (overlapped with compute when prefetched)
    wait_seconds: float = 0.0  # time the compute waited for a fill: the part that was not overlapped

    def as_dict(self) -> Dict[str, float]:
        return {"fills": self.fills, "bytes_read": self.bytes_read, "fill_s": self.fill_seconds,
                "wait_s": self.wait_seconds}


# ------------------------------------------------------------------------------ fills per device


def _write_into(dst: np.ndarray, stored: np.ndarray, dtype: str) -> None:
    """Copy the stored bytes of one tensor into a parameter buffer, converting exactly."""
    if dtype == st.BF16 and dst.dtype == np.float32:
        # bf16 -> fp32: the bf16 bits are the high half of the fp32 (as `bf16_bits_to_f32`).
        np.left_shift(stored, 16, out=dst.view(np.uint32), dtype=np.uint32)
    elif dtype == st.BF16:
        np.copyto(dst.view(np.uint16), stored)  # bf16 parameter: the bits as they are
    else:
        np.copyto(dst, stored, casting="safe")  # F32 -> fp32, F16 -> fp32 or fp16: exact


class HostSlots:
    """Slots in host memory (CPU): a fill writes the mapped tensors into the slot's numpy buffers.

    The parameters alias those buffers (`Tensor.from_numpy` + `set_data` share memory on
    CPU), so a compiled graph sees each fill. Fills run on one background thread.
    """

    def __init__(self, shapes: Mapping[str, Tuple[Tuple[int, ...], ms.dtype]]):
        self.buffers = [{name: np.empty(shape, numpy_dtype(dtype)) for name, (shape, dtype) in shapes.items()}
                        for _ in range(SLOTS)]
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-fill")

    def bind(self, slot: int, name: str, param: Parameter) -> None:
        param.set_data(Tensor.from_numpy(self.buffers[slot][name]))

    def start(self, slot: int, mapped: MappedCheckpoint, keys: Mapping[str, str]) -> concurrent.futures.Future:
        """Fill `slot` with the tensors `keys` (parameter suffix -> checkpoint key) in the background."""
        return self._worker.submit(self._fill, slot, mapped, keys)

    def _fill(self, slot: int, mapped: MappedCheckpoint, keys: Mapping[str, str]) -> float:
        t0 = time.perf_counter()
        for name, key in keys.items():
            stored, dtype = mapped.view(key)
            _write_into(self.buffers[slot][name], stored, dtype)
            del stored
            mapped.release(key)
        return time.perf_counter() - t0

    def ready(self, slot: int, pending: concurrent.futures.Future) -> float:
        """Block until the fill of `slot` is done; returns its duration."""
        return pending.result()

    def done_with(self, slot: int) -> None:
        """The block using `slot` has returned. On CPU its kernels have run by then (`backend.init`
        makes CPU execution synchronous), so the slot may be refilled at once."""

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class DeviceSlots:
    """Slots in device memory (Ascend), filled by asynchronous copies on a separate stream.

    Not run on an NPU (none here); on CPU it runs through a stand-in of the stream API
    (tests/unit/test_streaming.py), which checks the bits and the order of the stream calls, not
    real asynchrony. The first thing to verify on an NPU: that a compiled graph reads a Parameter bound to a slot
    tensor (`set_data(slot)`) from the slot's device memory, as it reads the numpy buffer on CPU.
    Order per slot: copy stream waits for `freed[slot]` (recorded on the compute stream when
    the block that used the slot returned), copies, records `filled[slot]`; the compute stream
    waits for `filled[slot]` before the block runs. The mapped host pages are kept referenced
    until the copy is known to be complete, then released.
    """

    def __init__(self, shapes: Mapping[str, Tuple[Tuple[int, ...], ms.dtype]], stream):
        from mindspore import ops

        self.stream = stream
        self.buffers = [{name: ops.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
                        for _ in range(SLOTS)]
        self.freed: List[Optional[object]] = [None] * SLOTS
        self.filled: List[Optional[object]] = [None] * SLOTS
        self._in_flight: List[List[Tuple[MappedCheckpoint, str, Tensor]]] = [[] for _ in range(SLOTS)]

    def bind(self, slot: int, name: str, param: Parameter) -> None:
        param.set_data(self.buffers[slot][name])

    def start(self, slot: int, mapped: MappedCheckpoint, keys: Mapping[str, str]) -> float:
        t0 = time.perf_counter()
        self._release_host(slot)
        with ms.runtime.StreamCtx(self.stream):
            if self.freed[slot] is not None:
                self.stream.wait_event(self.freed[slot])
            for name, key in keys.items():
                stored, dtype = mapped.view(key)
                dst = self.buffers[slot][name]
                if (dtype, dst.dtype) not in (("BF16", ms.bfloat16), ("F16", ms.float16), ("F32", ms.float32)):
                    raise CheckpointError(f"{key}: stored as {dtype}, parameter {dst.dtype}: streaming to the "
                                          "device copies the stored bytes as they are; expected the same dtype")
                host = Tensor.from_numpy(stored.view(numpy_dtype(dst.dtype)))
                dst.copy_(host, non_blocking=True)
                self._in_flight[slot].append((mapped, key, host))
            self.filled[slot] = self.stream.record_event()
        return time.perf_counter() - t0

    def ready(self, slot: int, pending: float) -> float:
        ms.runtime.current_stream().wait_event(self.filled[slot])
        return pending

    def done_with(self, slot: int) -> None:
        self.freed[slot] = ms.runtime.current_stream().record_event()

    def _release_host(self, slot: int) -> None:
        if self._in_flight[slot]:
            self.filled[slot].synchronize()
            for mapped, key, _ in self._in_flight[slot]:
                mapped.release(key)
            self._in_flight[slot] = []

    def close(self) -> None:
        self.stream.synchronize()
        for slot in range(SLOTS):
            self._release_host(slot)


# ------------------------------------------------------------------------------ the streamer


class BlockStreamer:
    """Streams the parameters under each of `prefixes` (block index -> parameter name prefix) from `mapped`.

    `block(i)` is the per-block hook: entered around block i, it puts block i's weights in
    place (waiting for its fill if needed), starts filling the next block of the order, and
    gives the cell to compute block i with: the first block of its slot (`cells`), whose
    parameters are bound to the slot. Every block of a slot thus runs through one cell, so a
    compiled model compiles 2 blocks instead of all of them (on CPU each compiled block keeps
    ~430 MiB of intermediates at 2 x 512 tokens, D = 1024; see docs/performance.md). The
    order is that of `prefixes` (ascending block indices); blocks run in another order are
    still correct, only not prefetched.
    """

    def __init__(self, net: nn.Cell, mapped: MappedCheckpoint, prefixes: Mapping[int, str],
                 cells: Mapping[int, nn.Cell], stream=None):
        """cells: block index -> the block's cell; stream: `backend.weight_copy_stream()` (None: the
        parameters live in host memory)."""
        if not prefixes:
            raise ValueError("BlockStreamer: no blocks to stream")
        self.mapped = mapped
        self.order = sorted(prefixes)
        self._position = {index: pos for pos, index in enumerate(self.order)}
        params = named_parameters(net)
        first = prefixes[self.order[0]]
        self.shapes = {n[len(first):]: (tuple(p.shape), p.dtype) for n, p in params.items() if n.startswith(first)}
        self.keys: Dict[int, Dict[str, str]] = {}  # block -> {suffix: checkpoint key}
        for index in self.order:
            prefix = prefixes[index]
            mine = {n[len(prefix):]: (tuple(p.shape), p.dtype) for n, p in params.items() if n.startswith(prefix)}
            if mine != self.shapes:
                raise ValueError(f"block {index} ({prefix}*) does not have the parameters of block {self.order[0]} "
                                 f"({first}*): streamed blocks must be identical")
            self.keys[index] = {name: prefix + name for name in mine}
        for index in self.order:
            for name, key in self.keys[index].items():
                info = mapped.tensors[key]
                shape, dtype = self.shapes[name]
                if tuple(info.shape) != shape:
                    raise CheckpointError(f"{mapped.path}: {key}: file {list(info.shape)} vs parameter {list(shape)}")
                if (info.dtype, dtype) not in _FILLS:
                    raise CheckpointError(f"{mapped.path}: {key} is stored as {info.dtype}; a {dtype} parameter "
                                          "can only be streamed from a floating type it holds exactly")
        self.slots = HostSlots(self.shapes) if stream is None else DeviceSlots(self.shapes, stream)
        for index in self.order:
            for name in self.shapes:
                self.slots.bind(self._slot(index), name, params[prefixes[index] + name])
        self._cells = {slot: cells[self.order[slot]] for slot in range(min(SLOTS, len(self.order)))}
        self._holds: List[Optional[int]] = [None] * SLOTS  # block whose fill was started in each slot
        self._pending: List[object] = [None] * SLOTS
        self.stats = StreamStats()

    def slot_bytes(self) -> int:
        """Memory of one slot (one block's parameters in their dtype)."""
        return sum(int(np.prod(shape)) * numpy_dtype(dtype).itemsize for shape, dtype in self.shapes.values())

    def _slot(self, index: int) -> int:
        return self._position[index] % SLOTS

    def _start(self, index: int) -> None:
        slot = self._slot(index)
        if self._pending[slot] is not None and self._holds[slot] != index:
            self._wait(slot)  # a fill of another block into this slot is still running
        self._holds[slot] = index
        self._pending[slot] = self.slots.start(slot, self.mapped, self.keys[index])
        self.stats.fills += 1
        self.stats.bytes_read += sum(self.mapped.tensors[k].nbytes for k in self.keys[index].values())

    def _wait(self, slot: int) -> None:
        t0 = time.perf_counter()
        self.stats.fill_seconds += self.slots.ready(slot, self._pending[slot])
        self.stats.wait_seconds += time.perf_counter() - t0
        self._pending[slot] = None

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Cell]:
        """Around block `index`: its weights are in place in the cell it gives, and the next block is being
        filled."""
        if index not in self._position:
            raise KeyError(f"block {index} is not streamed here (streamed: {self.order})")
        slot = self._slot(index)
        if self._holds[slot] != index:
            self._start(index)
        if self._pending[slot] is not None:
            self._wait(slot)
        following = self.order[(self._position[index] + 1) % len(self.order)]
        # With an odd count the wrap-around lands in this slot: that fill waits for the next entry.
        if self._slot(following) != slot and self._holds[self._slot(following)] != following:
            self._start(following)
        try:
            yield self._cells[slot]
        finally:
            self.slots.done_with(slot)

    def close(self) -> None:
        for slot in range(SLOTS):
            if self._pending[slot] is not None:
                self._wait(slot)
        self.slots.close()
        self.mapped.close()


def load_streaming(net: nn.Cell, folder: os.PathLike | str, prefixes: Mapping[int, str], cells: Mapping[int, nn.Cell],
                   *, key_filter: Optional[KeyFilter] = None, what: str = "") -> Tuple[LoadReport, BlockStreamer]:
    """Load the parameters outside `prefixes` (and accepted by `key_filter`) resident; stream the rest.

    Checked before anything is read: the checkpoint can be mapped, and the host has room for
    the resident parameters plus the slots (`check_host_memory`). The mapped block bytes are
    page cache: if they do not fit in memory as well, each pass over the blocks re-reads them
    from disk (a warning says so).
    """
    streamed = tuple(prefixes.values())
    accept = key_filter or (lambda name: True)
    params = named_parameters(net)
    resident_names = [n for n in params if accept(n) and not n.startswith(streamed)]
    streamed_names = [n for n in params if n.startswith(streamed)]
    mapped = MappedCheckpoint(folder, streamed_names)
    try:
        stream = backend.weight_copy_stream()
        resident = _bytes(params, resident_names)
        # The slots take host memory only where the parameters live there (no copy stream).
        first = next(iter(prefixes.values()))
        slots = SLOTS * _bytes(params, [n for n in params if n.startswith(first)]) if stream is None else 0
        label = what or type(net).__name__
        check_host_memory(resident + slots, f"{label} with streamed blocks (resident weights "
                                            f"{resident / 2**30:.2f} GiB + {SLOTS} block slots "
                                            f"{slots / 2**30:.2f} GiB)")
        if resident + slots + mapped.nbytes() > psutil.virtual_memory().available:
            log.warning("%s: the %.2f GiB of streamed block files do not fit in the page cache next to the "
                        "weights: every pass over the blocks will read them from disk", label,
                        mapped.nbytes() / 2**30)
        report = load_weights(net, folder, key_filter=lambda n: accept(n) and not n.startswith(streamed))
        streamer = BlockStreamer(net, mapped, prefixes, cells, stream)
    except BaseException:
        mapped.close()
        raise
    return report, streamer


def _bytes(params: Mapping[str, Parameter], names) -> int:
    return sum(int(np.prod(params[n].shape)) * numpy_dtype(params[n].dtype).itemsize for n in names)


# ------------------------------------------------------------------------------ the DiT


def dit_streaming(model: nn.Cell, folder: os.PathLike | str, blocks: range, *,
                  key_filter: Optional[KeyFilter] = None, what: str = "") -> Tuple[LoadReport, BlockStreamer]:
    """Load a lazily built `StepVideoModel` with its blocks `blocks` streamed; installs `model.block_hook`."""
    report, streamer = load_streaming(model, folder, {i: f"transformer_blocks.{i}." for i in blocks},
                                      {i: model.transformer_blocks[i] for i in blocks}, key_filter=key_filter,
                                      what=what)
    model.block_hook = streamer.block
    return report, streamer
