"""The distributed DiT: pipeline stages x CFG x tensor x Ulysses parallelism around an unchanged model.

    dit = DistributedDiT.from_pretrained(model_dir / "transformer", mesh, collectives, layer_split=[20, 28])
    noise_pred = dit(hidden_states=..., timestep=..., encoder_hidden_states=...,
                     encoder_attention_mask=..., encoder_hidden_states_2=..., return_dict=False)

`DistributedDiT` has the call signature, `.dtype` and `.config` of
`StepVideoModel`, so `StepVideoPipeline` runs it unchanged on every rank, and
every rank gets the same noise prediction back.

What each rank does (rank = ((stage * C + cfg) * T + tp) * U + sp, see `mesh.py`):
- every rank builds the whole `StepVideoModel` lazily (no memory) and loads only
  its stage's parameters: its contiguous block range, plus the input embeddings
  on the first stage and the output layer on the last (`StagePlan.owns`); with
  tensor parallelism only its slice of each block projection (`tensor.py`);
- with CFG parallelism each CFG group takes its share of the batch rows (the
  conditional rows on group 0, the unconditional ones on group 1);
- the rows are cut into micro-batches of one row, so while stage s works on
  row 1, stage s+1 already works on row 0;
- the first stage runs `embed` and cuts the tokens and their RoPE grid into the
  SP group's shards (`SequenceSplit`, padded when u does not divide the tokens);
- each stage runs its blocks on its shard, its self-attention exchanging shards
  for heads (`ulysses.UlyssesAttention`), and hands the shard, the text tokens,
  the modulation and what the output layer needs to the same SP position of the
  next stage;
- the last stage gathers the shards, drops the padding, runs `final_layer` on
  its first rank and broadcasts its rows' prediction to all ranks; every rank
  puts the CFG groups' rows back together for the guidance step.

Idle time: `DistributedDiT.timing` splits each call into pipeline waiting
(recv, send, waiting for the output broadcast), communication inside a stage
(Ulysses all-to-alls and gather, tensor-parallel all-reduces when eager), and
computing; with M micro-batches and P equal stages the pipeline bubble is
(P-1)/(M+P-1) of a step. `step_traffic` gives the bytes one
rank of each stage moves per denoising step, from the same shapes (a test checks
it against the counted traffic of a real run).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import mindspore as ms
import numpy as np
import psutil
from mindspore import Tensor, ops

from stepvideo.checkpoint import load_weights, read_config
from stepvideo.modules.model import Embedded, StepVideoModel
from stepvideo.parallel import ulysses
from stepvideo.parallel.collectives import Collectives, OpStats
from stepvideo.parallel.mesh import Mesh, split_layers
from stepvideo.parallel.tensor import TensorParallel
from stepvideo.streaming import dit_streaming
from stepvideo.parallel.ulysses import SequenceSplit

log = logging.getLogger(__name__)

# Parameters outside the blocks, by the stage that uses them.
FIRST_STAGE_MODULES = ("pos_embed.", "adaln_single.", "caption_norm.", "caption_projection.", "clip_projection.")
LAST_STAGE_MODULES = ("norm_out.", "proj_out.")
LAST_STAGE_PARAMETERS = ("scale_shift_table",)
SP_COLLECTIVES = ("sp_all_to_all", "sp_all_gather")
TP_COLLECTIVES = ("tp_all_reduce",)


@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage computes and therefore loads."""

    stage: int
    blocks: range
    first: bool
    last: bool

    def owns(self, name: str) -> bool:
        """Key filter: does this stage hold parameter `name`?"""
        if name.startswith("transformer_blocks."):
            return int(name.split(".", 2)[1]) in self.blocks
        if name.startswith(FIRST_STAGE_MODULES):
            return self.first
        if name.startswith(LAST_STAGE_MODULES) or name in LAST_STAGE_PARAMETERS:
            return self.last
        raise ValueError(f"parameter {name!r} belongs to no pipeline stage: add its module to "
                         "FIRST_STAGE_MODULES or LAST_STAGE_MODULES")

    def describe(self) -> str:
        parts = [f"blocks {self.blocks.start}-{self.blocks.stop - 1}"]
        if self.first:
            parts.insert(0, "input embeddings")
        if self.last:
            parts.append("output layer")
        return " + ".join(parts)


def plan_stages(num_layers: int, pp_degree: int, layer_split: Optional[Sequence[int]] = None) -> List[StagePlan]:
    """One StagePlan per stage: contiguous block ranges (balanced unless `layer_split` gives the sizes)."""
    ranges = split_layers(num_layers, pp_degree, layer_split)
    return [StagePlan(stage=s, blocks=range(a, b), first=s == 0, last=s == pp_degree - 1)
            for s, (a, b) in enumerate(ranges)]


@dataclass
class Timing:
    """Seconds accumulated over the calls of a DistributedDiT on one rank."""

    calls: int = 0
    total: float = 0.0
    pipeline_wait: float = 0.0  # recv, send and the output broadcast: bubbles and hand-offs
    sp_comm: float = 0.0  # Ulysses all-to-alls and the final all-gather
    tp_comm: float = 0.0  # tensor-parallel all-reduces (eager only: compiled, they are part of compute)
    per_call: List[Dict[str, float]] = field(default_factory=list)  # the same split for each call

    def add(self, total: float, pipeline_wait: float, sp_comm: float, tp_comm: float) -> None:
        self.calls += 1
        self.total += total
        self.pipeline_wait += pipeline_wait
        self.sp_comm += sp_comm
        self.tp_comm += tp_comm
        self.per_call.append({"total_s": total, "pipeline_wait_s": pipeline_wait, "sp_comm_s": sp_comm,
                              "tp_comm_s": tp_comm, "compute_s": total - pipeline_wait - sp_comm - tp_comm})

    @property
    def compute(self) -> float:
        return self.total - self.pipeline_wait - self.sp_comm - self.tp_comm

    @property
    def idle_fraction(self) -> float:
        return self.pipeline_wait / self.total if self.total else 0.0

    def as_dict(self) -> Dict[str, float]:
        return {"calls": self.calls, "total_s": self.total, "pipeline_wait_s": self.pipeline_wait,
                "sp_comm_s": self.sp_comm, "tp_comm_s": self.tp_comm, "compute_s": self.compute,
                "idle_fraction": self.idle_fraction, "per_call": self.per_call}


def _difference(after: Mapping[str, OpStats], before: Mapping[str, OpStats]) -> Dict[str, OpStats]:
    out = {}
    for op, a in after.items():
        b = before.get(op, OpStats())
        out[op] = OpStats(a.calls - b.calls, a.bytes - b.bytes, a.seconds - b.seconds)
    return out


def _resident_bytes() -> int:
    """RSS after handing freed heap pages back to the OS, so that it counts live memory only.

    (glibc keeps the temporary buffers of the bf16 -> fp32 conversion otherwise: ~10% here.)
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed pages
        pass
    return psutil.Process(os.getpid()).memory_info().rss


class DistributedDiT:
    """A `StepVideoModel` split over a (pipeline x CFG x tensor x Ulysses) mesh; call it like the model."""

    def __init__(self, model: StepVideoModel, mesh: Mesh, collectives: Collectives, plan: StagePlan,
                 tensor_parallel: Optional[TensorParallel] = None):
        """`tensor_parallel`: the split that `TensorParallel.shard_blocks` applied to the model's blocks."""
        if len(plan.blocks) == 0:
            raise ValueError(f"stage {plan.stage} has no blocks")
        heads = model.config.num_attention_heads
        if heads % (mesh.tp_degree * mesh.ulysses_degree):
            raise ValueError(f"heads / tensor_parallel_degree / ulysses_degree = {heads} / {mesh.tp_degree} / "
                             f"{mesh.ulysses_degree} is not whole")
        if (mesh.tp_degree > 1) != (tensor_parallel is not None):
            raise ValueError(f"tensor_parallel_degree {mesh.tp_degree}: expected the blocks "
                             f"{'sharded by a TensorParallel' if mesh.tp_degree > 1 else 'whole'}")
        self.model = model
        self.mesh = mesh
        self.collectives = collectives
        self.plan = plan
        self.tensor_parallel = tensor_parallel
        self.timing = Timing()
        self.last_traffic: Dict[str, OpStats] = {}  # collectives of the latest call
        self.load_report: Dict[str, float] = {}
        self.streamer = None  # the BlockStreamer with --offload blocks
        self._split: Optional[SequenceSplit] = None

    @classmethod
    def from_pretrained(cls, folder: os.PathLike | str, mesh: Mesh, collectives: Collectives,
                        layer_split: Optional[Sequence[int]] = None, offload: bool = False) -> "DistributedDiT":
        """Build the model lazily and load only this rank's stage (and tensor slice) from `transformer/`.

        offload: stream the stage's blocks from the mapped shards (`streaming.dit_streaming`): only
        the embeddings / output layer stay loaded, plus two block slots. Streamed blocks are whole,
        so it cannot be combined with tensor parallelism.
        """
        if offload and mesh.tp_degree > 1:
            raise ValueError(f"--offload blocks streams whole blocks; with tensor_parallel_degree {mesh.tp_degree} "
                             "each rank holds slices: use one or the other")
        config = read_config(folder)
        plan = plan_stages(config["num_layers"], mesh.pp_degree, layer_split)[mesh.stage]
        model = StepVideoModel.from_config_dict(config)
        tensor_parallel, slices = None, {}
        if mesh.tp_degree > 1:
            tensor_parallel = TensorParallel(collectives)
            slices = tensor_parallel.shard_blocks(model, plan.blocks)
        rss_before = _resident_bytes()
        streamer = None
        if offload:
            report, streamer = dit_streaming(model, folder, plan.blocks, key_filter=plan.owns,
                                             what=f"rank {mesh.rank} ({plan.describe()})")
        else:
            report = load_weights(model, folder, key_filter=plan.owns, slices=slices)
        model.set_train(False)
        dit = cls(model, mesh, collectives, plan, tensor_parallel)
        dit.streamer = streamer
        dit.load_report = {"tensors": report.tensors, "bytes": report.bytes, "seconds": report.seconds,
                           "rss_growth": _resident_bytes() - rss_before,
                           "streamed_bytes": streamer.mapped.nbytes() if streamer else 0,
                           # block weights held in memory (streamed ones: see streamed_bytes)
                           "block_bytes": 0 if streamer else _block_bytes(model, plan.blocks),
                           "sliced_tensors": len(slices)}
        log.info("rank %d (stage %d of %d, sp rank %d of %d) holds %s: %d tensors, %.1f MiB, loaded in %.1fs%s "
                 "(cfg group %d of %d, tensor slice %d of %d: %.1f MiB of block weights)",
                 mesh.rank, mesh.stage, mesh.pp_degree, mesh.sp_rank, mesh.ulysses_degree, plan.describe(),
                 report.tensors, report.bytes / 2**20, report.seconds,
                 f"; blocks streamed from the mapped shards ({streamer.mapped.nbytes() / 2**20:.1f} MiB, "
                 f"2 slots of {streamer.slot_bytes() / 2**20:.1f} MiB)" if streamer else "",
                 mesh.cfg_rank, mesh.cfg_degree, mesh.tp_rank, mesh.tp_degree,
                 dit.load_report["block_bytes"] / 2**20)
        return dit

    def set_jit(self, enabled: bool) -> "DistributedDiT":
        """Compiled graphs for the stage's blocks and embeddings (`StepVideoModel.set_jit`); the
        Ulysses attention runs eagerly between each block's two compiled pieces."""
        self.model.set_jit(enabled)
        if self.tensor_parallel is not None:
            self.tensor_parallel.set_jit(enabled)
        return self

    @property
    def dtype(self) -> ms.dtype:
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ call

    def __call__(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 encoder_hidden_states_2: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
                 encoder_attention_mask: Optional[Tensor] = None, return_dict: bool = True):
        """Same inputs as `StepVideoModel`; every rank returns the (b, f, c_out, h, w) prediction.

        Only the first stage reads the inputs (the others take their micro-batches from the
        previous stage); every rank must call with the same batch size.
        """
        started = time.perf_counter()
        before = self.collectives.snapshot()
        wait = 0.0
        if self.plan.first:
            e = self.model.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                 encoder_hidden_states_2)
        outputs = []
        for row in self.mesh.cfg_rows(hidden_states.shape[0]):  # this CFG group's rows, one micro-batch each
            if self.plan.first:
                act = self._stage_input(e, row)
            else:
                t0 = time.perf_counter()
                act = self.collectives.recv(self.mesh.prev_rank)
                wait += time.perf_counter() - t0
            frames, height, width = (int(v) for v in act["grid_size"].asnumpy())
            split = self._split_for(frames * height * width)
            act["hidden"] = self.model.block_forward(act["hidden"], act["text"], act["modulation"],
                                                     act["rope_grid"], act["text_mask"], blocks=self.plan.blocks)
            if self.tensor_parallel is not None and self.model.jit_enabled:
                # three all-reduces of the (1, n/u, D) activations per block, inside the compiled graphs
                calls = 3 * len(self.plan.blocks)
                self.collectives.record_in_graph("tp_all_reduce", calls * act["hidden"].nbytes, calls)
            if not self.plan.last:
                t0 = time.perf_counter()
                self.collectives.send(act, self.mesh.next_rank)
                wait += time.perf_counter() - t0
                continue
            # Last stage: gather the shards and drop the padding; its first rank runs the output layer.
            hidden = split.unpad(self.collectives.sp_all_gather(act["hidden"], dim=1))
            if self.mesh.rank == self.mesh.last_stage_root:
                outputs.append(self.model.final_layer(hidden, act["embedded_timestep"], frames, height, width))

        t0 = time.perf_counter()
        prediction = self._publish(outputs, hidden_states.shape[0])
        wait += time.perf_counter() - t0

        self.last_traffic = _difference(self.collectives.snapshot(), before)
        self.timing.add(total=time.perf_counter() - started, pipeline_wait=wait,
                        sp_comm=sum(s.seconds for op, s in self.last_traffic.items() if op in SP_COLLECTIVES),
                        tp_comm=sum(s.seconds for op, s in self.last_traffic.items() if op in TP_COLLECTIVES))
        return {"x": prediction} if return_dict else prediction

    # ------------------------------------------------------------------ steps

    def _split_for(self, tokens: int) -> SequenceSplit:
        """The split of `tokens` over the SP group; (re)installs the Ulysses attention when it changes."""
        if self._split is None or self._split.tokens != tokens:
            self._split = SequenceSplit(tokens, self.mesh.ulysses_degree)
            if self.mesh.ulysses_degree > 1:
                ulysses.install(self.model, self.plan.blocks,
                                ulysses.UlyssesAttention(self.collectives, self._split))
        return self._split

    def _stage_input(self, e: Embedded, row: int) -> Dict[str, Tensor]:
        """This SP rank's share of micro-batch `row`, as it travels from stage to stage."""
        tokens = e.frames * e.height * e.width
        split = self._split_for(tokens)
        me = self.mesh.sp_rank
        take = lambda x: x[row:row + 1].contiguous()  # noqa: E731
        mask = take(e.attn_mask)
        if mask.shape[1] == tokens and tokens > 1:  # per-query mask rows: shard them like the tokens
            mask = split.shard(mask, me, axis=1)
        return {
            "hidden": split.shard(take(e.hidden_states), me, axis=1),  # (1, n/u, D)
            "rope_grid": split.shard(e.rope_grid, me, axis=0),  # (n/u, 3)
            "text": take(e.encoder_hidden_states),  # (1, L, D)
            "text_mask": mask,  # (1, 1 | n/u, L)
            "modulation": take(e.modulation),  # (1, 6D)
            "embedded_timestep": take(e.embedded_timestep),  # (1, D), for the output layer
            "grid_size": Tensor(np.array([e.frames, e.height, e.width], np.int32)),
        }

    def _publish(self, outputs: List[Tensor], batch: int) -> Tensor:
        """Each CFG group's output root sends its rows' prediction to every rank; all rows, in order."""
        if self.mesh.world_size == 1:
            return ops.cat(outputs, 0)
        parts = []
        for cfg in range(self.mesh.cfg_degree):
            if len(self.mesh.cfg_rows(batch, cfg)) == 0:
                continue
            root = self.mesh.output_root(cfg)
            mine = {"noise_pred": ops.cat(outputs, 0)} if self.mesh.rank == root else None
            parts.append(self.collectives.broadcast(mine, root)["noise_pred"])
        return ops.cat(parts, 0) if len(parts) > 1 else parts[0]


def _block_bytes(model: StepVideoModel, blocks: range) -> int:
    """Bytes of the loaded parameters of the blocks `blocks` (sliced ones at their slice's size)."""
    prefixes = tuple(f"transformer_blocks.{i}." for i in blocks)
    return sum(p.nbytes for name, p in model.parameters_and_names() if name.startswith(prefixes))


# ---------------------------------------------------------------------- traffic


def step_traffic(config: Mapping, latent_shape: Sequence[int], text_tokens: int, ulysses_degree: int,
                 pp_degree: int, layer_split: Optional[Sequence[int]] = None, itemsize: int = 2,
                 batch: int = 2, tp_degree: int = 1, cfg_degree: int = 1) -> List[Dict[str, int]]:
    """Payload bytes one rank of each stage hands to each collective in one denoising step.

    config: the transformer config.json; latent_shape: (b, f, c, h, w) of the latents (b is
    ignored: `batch` rows go through the DiT, 2 with classifier-free guidance); text_tokens:
    the text length after truncation to the longest valid row (<= 77 + 320); itemsize: bytes
    per activation value (2 for bf16). A rank of CFG group 0 computes its group's share of the
    rows; the Ulysses exchange carries its tensor slice's heads (H / T). Mirrors the shapes
    DistributedDiT sends (see `_stage_input`, `UlyssesAttention`, `TensorParallel`, `__call__`,
    `_publish`), counted as in `Collectives.stats`.
    """
    _, frames, _, h, w = latent_shape
    p = config["patch_size"]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim = heads * head_dim
    c_out = config["out_channels"] or config["in_channels"]
    split = SequenceSplit(frames * (h // p) * (w // p), ulysses_degree)
    u, t = ulysses_degree, tp_degree
    rows = -(-batch // cfg_degree)  # group 0 takes the larger share
    plans = plan_stages(config["num_layers"], pp_degree, layer_split)
    world = u * pp_degree * t * cfg_degree

    handoff = (split.local * dim * itemsize  # hidden shard
               + split.local * 3 * 4  # RoPE grid shard, int32
               + text_tokens * dim * itemsize  # text tokens
               + text_tokens * 1  # text mask, bool
               + 6 * dim * itemsize + dim * itemsize  # modulation, embedded timestep
               + 3 * 4)  # grid size
    prediction = batch * frames * c_out * h * w * itemsize
    per_stage = []
    for plan in plans:
        ops_bytes: Dict[str, int] = {}
        if u > 1:
            qkv = split.local * 3 * (dim // t) * itemsize  # (1, n/u, 3, H/T, d)
            out = split.padded * (heads // t // u) * head_dim * itemsize  # (1, n, H/T/u, d)
            ops_bytes["sp_all_to_all"] = rows * len(plan.blocks) * (qkv + out)
            if plan.last:
                ops_bytes["sp_all_gather"] = rows * split.local * dim * itemsize
        if t > 1:  # attention out, cross-attention out, FFN out: (1, n/u, D) each
            ops_bytes["tp_all_reduce"] = rows * len(plan.blocks) * 3 * split.local * dim * itemsize
        if not plan.last:
            ops_bytes["send"] = rows * handoff
        if not plan.first:
            ops_bytes["recv"] = rows * handoff
        if world > 1:
            ops_bytes["broadcast"] = prediction
        per_stage.append(ops_bytes)
    return per_stage
