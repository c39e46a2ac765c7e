"""The few collectives the distributed DiT needs, behind one small interface.

Two implementations, chosen by the backend:
- `NativeCollectives` (Ascend): true all-to-all for Ulysses and point-to-point
  send/recv for the pipeline hand-off.
- `CpuCollectives`: MindSpore's CPU backend has no all-to-all and its `send`
  trips over a default group bound at import time, so it uses the emulations
  verified in ../shared/notes/mindspore-cpu.md §4.3: all-gather-then-slice for
  Ulysses (K x memory for the gathered tensor, fine at test sizes) and a
  broadcast inside a two-rank link group for the hand-off.
Both sum the tensor-parallel partial outputs with MindSpore's all-reduce (`tp_all_reduce`
eagerly; `ops.AllReduce` inside compiled blocks, see tensor.py), which CPU has for subgroups.

Groups are created once, in one global order, by their members only (a rank
that asks for a group it is not in dies in WaitCommInitDone on MindSpore).
Everything is passed explicitly through a `Collectives` object: no module-level
parallel state.

Every call is accounted in `Collectives.stats` (calls, payload bytes, seconds
per operation), so the pipeline can report its idle time and the traffic of a
denoising step. Payload bytes are the bytes of the tensors this rank hands to
(or, for recv and for broadcast receivers, gets from) the operation; headers are
not counted, and an all-to-all moves (u-1)/u of its payload over the wire.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, communication, mint, ops
from mindspore.mint import distributed as md

from stepvideo import backend, dtypes
from stepvideo.parallel.mesh import Mesh


def init_process_group() -> Mesh:
    """Join the job started by msrun; returns a Mesh with only rank/world filled in (degrees 1 x world)."""
    # communication.init picks the backend of the device (hccl on Ascend, mccl on CPU);
    # mint.distributed.init_process_group only accepts hccl.
    communication.init()
    world, rank = communication.get_group_size(), communication.get_rank()
    return Mesh(rank=rank, world_size=world, ulysses_degree=1, pp_degree=world)


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


def payload_bytes(tensors) -> int:
    """Bytes of a tensor or of the values of a dict of tensors."""
    if isinstance(tensors, dict):
        return sum(payload_bytes(v) for v in tensors.values())
    return int(np.prod(tensors.shape, dtype=np.int64)) * tensors.itemsize


class Collectives:
    """Communication for one rank of a `Mesh`. Subclasses provide the device-specific transport.

    comm: the module whose functions are called (`mindspore.mint.distributed`'s API; the backend's
    kernel table names it, so a table can supply another implementation of the same API).
    """

    def __init__(self, mesh: Mesh, comm=md):
        self.mesh = mesh
        self.comm = comm
        self.stats: Dict[str, OpStats] = {}
        self.sp_group: Optional[str] = None
        self.tp_group: Optional[str] = None
        self.link_groups: Dict[int, str] = {}  # peer rank -> group name
        for ranks in mesh.sp_groups():
            if mesh.ulysses_degree > 1 and mesh.rank in ranks:
                self.sp_group = self._new_group(ranks)
        for ranks in mesh.tp_groups():
            if mesh.tp_degree > 1 and mesh.rank in ranks:
                self.tp_group = self._new_group(ranks)
        if self._needs_link_groups():
            for ranks in mesh.link_groups():
                if mesh.rank in ranks:
                    peer = ranks[1] if ranks[0] == mesh.rank else ranks[0]
                    self.link_groups[peer] = self._new_group(ranks)

    def _new_group(self, ranks: List[int]) -> str:
        return self.comm.new_group(ranks)

    def _needs_link_groups(self) -> bool:
        return False

    def _record(self, op: str, nbytes: int, started: float) -> None:
        entry = self.stats.setdefault(op, OpStats())
        entry.calls += 1
        entry.bytes += nbytes
        entry.seconds += time.perf_counter() - started

    def record_in_graph(self, op: str, nbytes: int, calls: int) -> None:
        """Count a collective that ran inside a compiled graph (its time is part of the graph's)."""
        entry = self.stats.setdefault(op, OpStats())
        entry.calls += calls
        entry.bytes += nbytes

    def snapshot(self) -> Dict[str, OpStats]:
        """A copy of the counters (subtract two snapshots to get the traffic of a section)."""
        return {k: OpStats(v.calls, v.bytes, v.seconds) for k, v in self.stats.items()}

    # ----- sequence parallel (inside this rank's stage)

    def sp_all_gather(self, x: Tensor, dim: int) -> Tensor:
        """Concatenate the SP group's tensors along `dim`, in SP order."""
        if self.mesh.ulysses_degree == 1:
            return x
        started = time.perf_counter()
        parts = [ops.zeros_like(x) for _ in range(self.mesh.ulysses_degree)]
        self.comm.all_gather(parts, x.contiguous(), group=self.sp_group)
        out = mint.cat(parts, dim=dim)
        self._record("sp_all_gather", payload_bytes(x), started)
        return out

    def sp_all_to_all(self, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        """Split `x` along scatter_dim across the SP group and concatenate what arrives along gather_dim.

        Rank i keeps chunk i of every rank's `x` (chunks are in SP order on both axes).
        """
        u = self.mesh.ulysses_degree
        if u == 1:
            return x
        if x.shape[scatter_dim] % u:
            raise ValueError(f"sp_all_to_all: axis {scatter_dim} of {tuple(x.shape)} is not divisible by the "
                             f"Ulysses degree {u}")
        started = time.perf_counter()
        out = self._all_to_all(x, scatter_dim, gather_dim)
        self._record("sp_all_to_all", payload_bytes(x), started)
        return out

    def _all_to_all(self, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        raise NotImplementedError

    # ----- tensor parallel (the ranks holding the other head / FFN slices of the same tokens)

    def tp_all_reduce(self, x: Tensor) -> Tensor:
        """The sum of `x` over the tensor-parallel group (every rank gets it)."""
        if self.mesh.tp_degree == 1:
            return x
        started = time.perf_counter()
        out = x.contiguous()
        md.all_reduce(out, group=self.tp_group)
        self._record("tp_all_reduce", payload_bytes(x), started)
        return out

    # ----- pipeline hand-off (to the same SP position of the next/previous stage)

    def send(self, tensors: Dict[str, Tensor], dst: int) -> None:
        started = time.perf_counter()
        self._send(tensors, dst)
        self._record("send", payload_bytes(tensors), started)

    def recv(self, src: int) -> Dict[str, Tensor]:
        started = time.perf_counter()
        out = self._recv(src)
        self._record("recv", payload_bytes(out), started)
        return out

    def _send(self, tensors: Dict[str, Tensor], dst: int) -> None:
        raise NotImplementedError

    def _recv(self, src: int) -> Dict[str, Tensor]:
        raise NotImplementedError

    # ----- whole job

    def broadcast(self, tensors: Optional[Dict[str, Tensor]], src: int) -> Dict[str, Tensor]:
        """Every rank gets `src`'s tensors (others pass None)."""
        started = time.perf_counter()
        out = self._broadcast_dict(tensors, src, group=None)
        self._record("broadcast", payload_bytes(out), started)
        return out

    def barrier(self) -> None:
        self.comm.barrier()

    # ----- helpers: a dict of tensors travels as a JSON header (names, dtypes, shapes) + payloads

    def _broadcast_dict(self, tensors, src, group):
        is_src = self.mesh.rank == src
        header = _encode_header(tensors) if is_src else None
        length = Tensor(np.array([len(header) if is_src else 0], np.int32))
        self.comm.broadcast(length, src, group=group)
        raw = Tensor(np.frombuffer(header, np.uint8).copy()) if is_src else \
            Tensor(np.zeros(int(length.asnumpy()[0]), np.uint8))
        self.comm.broadcast(raw, src, group=group)
        out = {}
        for name, dtype, shape in _decode_header(raw):
            buf = _to_wire(tensors[name]) if is_src else _empty(shape, dtype)
            self.comm.broadcast(buf, src, group=group)
            out[name] = tensors[name] if is_src else _from_wire(buf, dtype)
        return out


def _encode_header(tensors: Dict[str, Tensor]) -> bytes:
    return json.dumps([[k, dtypes.of_mindspore(v.dtype).name, list(v.shape)] for k, v in tensors.items()]).encode()


def _decode_header(raw: Tensor) -> list:
    return json.loads(bytes(raw.asnumpy().astype(np.uint8)).decode())


# The element types a broadcast carries (names of `stepvideo.dtypes` rows).
_SENT = ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")


def _to_wire(x: Tensor) -> Tensor:
    # bool payloads fail in the CPU broadcast kernel ("Broadcast failed."); uint8 works everywhere.
    return x.astype(ms.uint8) if x.dtype == ms.bool_ else x.contiguous()


def _from_wire(buf: Tensor, dtype_name: str) -> Tensor:
    return buf.astype(ms.bool_) if dtype_name == "bool" else buf


def _empty(shape, dtype_name: str) -> Tensor:
    """A receive buffer in the wire dtype of `dtype_name`."""
    if dtype_name not in _SENT:
        raise TypeError(f"cannot transfer a tensor of dtype {dtype_name}; supported: {sorted(_SENT)}")
    dtype = ms.uint8 if dtype_name == "bool" else dtypes.mindspore_dtype(dtypes.BY_NAME[dtype_name])
    # bf16 buffers are made as fp32 zeros and cast: no bf16 `zeros` kernel on CPU
    return ops.zeros(tuple(shape), ms.float32).astype(dtype)


class CpuCollectives(Collectives):
    """Emulations that use only the collectives MindSpore has on CPU."""

    def _needs_link_groups(self) -> bool:
        return self.mesh.pp_degree > 1

    def _all_to_all(self, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        u = self.mesh.ulysses_degree
        gathered = [ops.zeros_like(x) for _ in range(u)]
        self.comm.all_gather(gathered, x.contiguous(), group=self.sp_group)
        mine = [mint.chunk(part, u, dim=scatter_dim)[self.mesh.sp_rank].contiguous() for part in gathered]
        return mint.cat(mine, dim=gather_dim)

    def _send(self, tensors: Dict[str, Tensor], dst: int) -> None:
        self._broadcast_dict(tensors, self.mesh.rank, group=self.link_groups[dst])

    def _recv(self, src: int) -> Dict[str, Tensor]:
        return self._broadcast_dict(None, src, group=self.link_groups[src])


class NativeCollectives(Collectives):
    """Ascend: HCCL all-to-all and point-to-point transfers."""

    def _all_to_all(self, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        u = self.mesh.ulysses_degree
        inputs = [part.contiguous() for part in mint.chunk(x, u, dim=scatter_dim)]
        outputs = [ops.zeros_like(inputs[0]) for _ in range(u)]
        self.comm.all_to_all(outputs, inputs, group=self.sp_group)
        return mint.cat(outputs, dim=gather_dim)

    def _send(self, tensors: Dict[str, Tensor], dst: int) -> None:
        header = _encode_header(tensors)
        self.comm.send(Tensor(np.array([len(header)], np.int32)), dst)
        self.comm.send(Tensor(np.frombuffer(header, np.uint8).copy()), dst)
        for value in tensors.values():
            self.comm.send(_to_wire(value), dst)

    def _recv(self, src: int) -> Dict[str, Tensor]:
        length = Tensor(np.zeros(1, np.int32))
        self.comm.recv(length, src)
        raw = Tensor(np.zeros(int(length.asnumpy()[0]), np.uint8))
        self.comm.recv(raw, src)
        out = {}
        for name, dtype, shape in _decode_header(raw):
            buf = _empty(shape, dtype)
            self.comm.recv(buf, src)
            out[name] = _from_wire(buf, dtype)
        return out


def make_collectives(mesh: Mesh) -> Collectives:
    """The collectives of the active kernel table (`backend.Kernels.native_collectives` and `.comm`)."""
    table = backend.kernels()
    return NativeCollectives(mesh, table.comm) if table.native_collectives else CpuCollectives(mesh, table.comm)
