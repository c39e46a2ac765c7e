"""Which rank does what: the (pipeline stage x CFG x tensor x Ulysses) layout of a DiT job.

Four axes, P x C x T x U = the number of msrun workers:
- pipeline (P, `--pp_degree`): contiguous block ranges, activations handed stage to stage;
- CFG (C, `--cfg_parallel_degree`, 1 or 2): the conditional and unconditional batch rows on
  different rank groups, each a complete pipeline; the predictions meet for the guidance step;
- tensor (T, `--tensor_parallel_degree`): the heads of every attention and the FFN's inner
  width cut into T slices, partial outputs summed by an all-reduce (`tensor.py`);
- Ulysses (U, `--ulysses_degree`): the video tokens cut into U shards, exchanged for heads
  around the self-attention (`ulysses.py`).

Rank order, innermost axis first:

    rank = ((stage * C + cfg) * T + tp) * U + sp

The heaviest traffic stays between neighbouring ranks, i.e. inside one machine when a node
holds T x U consecutive ranks: the Ulysses all-to-all (every block, the whole activations)
is innermost, then the tensor-parallel all-reduce (three per block). The CFG rows never talk
until the output, and the pipeline hand-off (one activation per micro-batch and stage) is
outermost. With two 8-NPU nodes (node k holds ranks 8k .. 8k+7) and C = 2, T x U = 8 only the
predictions cross the network; with P = 2 only the stage hand-off does.

A `Mesh` is a plain value; nothing here talks to the network, so layouts can be validated
before any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple


class Layout(NamedTuple):
    """Degrees of the four axes."""

    pp: int
    cfg: int
    tp: int
    ulysses: int

    def flags(self) -> str:
        return (f"--pp_degree {self.pp} --cfg_parallel_degree {self.cfg} --tensor_parallel_degree {self.tp} "
                f"--ulysses_degree {self.ulysses}")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def possible_layouts(world_size: int, num_heads: int, num_layers: Optional[int] = None) -> List[Layout]:
    """Every layout of `world_size` ranks for a model with `num_heads` heads (and `num_layers` blocks)."""
    out = []
    for cfg in (1, 2):
        for tp in _divisors(world_size):
            for u in _divisors(world_size):
                if world_size % (cfg * tp * u) or num_heads % (tp * u):
                    continue
                pp = world_size // (cfg * tp * u)
                if num_layers is None or pp <= num_layers:
                    out.append(Layout(pp, cfg, tp, u))
    return sorted(out)


def check_layout(world_size: int, ulysses_degree: int, pp_degree: int, num_heads: int, num_layers: int,
                 tp_degree: int = 1, cfg_degree: int = 1) -> None:
    """Raise ValueError listing the possible layouts if this one cannot work."""
    degrees = {"pp_degree": pp_degree, "cfg_parallel_degree": cfg_degree, "tensor_parallel_degree": tp_degree,
               "ulysses_degree": ulysses_degree}
    problems = [f"{name} must be >= 1, got {v}" for name, v in degrees.items() if v < 1]
    if cfg_degree > 2:
        problems.append(f"cfg_parallel_degree must be 1 or 2 (two CFG rows), got {cfg_degree}")
    if not problems:
        product = pp_degree * cfg_degree * tp_degree * ulysses_degree
        if product != world_size:
            problems.append(f"pp x cfg x tensor x ulysses = {pp_degree} x {cfg_degree} x {tp_degree} x "
                            f"{ulysses_degree} = {product}, but the job has {world_size} rank(s)")
        if num_heads % (tp_degree * ulysses_degree):
            problems.append(f"heads / tensor_parallel_degree / ulysses_degree = {num_heads} / {tp_degree} / "
                            f"{ulysses_degree} is not whole")
        if pp_degree > num_layers:
            problems.append(f"pp_degree {pp_degree} exceeds the {num_layers} transformer blocks")
    if problems:
        options = "; ".join(layout.flags() for layout in possible_layouts(world_size, num_heads, num_layers))
        raise ValueError("invalid parallel layout: " + "; ".join(problems) +
                         f". With {world_size} rank(s), {num_heads} heads and {num_layers} blocks the possible "
                         f"layouts are: {options}")


def split_layers(num_layers: int, pp_degree: int, explicit: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """Contiguous [start, end) block ranges per stage.

    Balanced by default (when the blocks do not divide evenly, the earlier stages
    take one more each). `explicit` gives the number of blocks per stage, e.g. [20, 28].
    """
    if explicit is None:
        base, extra = divmod(num_layers, pp_degree)
        sizes = [base + (1 if s < extra else 0) for s in range(pp_degree)]
    else:
        sizes = list(explicit)
        if len(sizes) != pp_degree or any(n < 1 for n in sizes) or sum(sizes) != num_layers:
            raise ValueError(f"layer split {sizes} must have {pp_degree} positive entries summing to {num_layers}")
    ranges, start = [], 0
    for n in sizes:
        ranges.append((start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class Mesh:
    """The parallel position of one rank: rank = ((stage * C + cfg) * T + tp) * U + sp."""

    rank: int
    world_size: int
    ulysses_degree: int
    pp_degree: int
    tp_degree: int = 1
    cfg_degree: int = 1

    def __post_init__(self):
        product = self.ulysses_degree * self.pp_degree * self.tp_degree * self.cfg_degree
        if product != self.world_size or not 0 <= self.rank < self.world_size:
            raise ValueError(f"inconsistent mesh: rank {self.rank} of {self.world_size}, pp {self.pp_degree} x "
                             f"cfg {self.cfg_degree} x tensor {self.tp_degree} x ulysses {self.ulysses_degree}")

    def rank_of(self, stage: int, cfg: int, tp: int, sp: int) -> int:
        return ((stage * self.cfg_degree + cfg) * self.tp_degree + tp) * self.ulysses_degree + sp

    # ----- this rank's coordinates

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses_degree

    @property
    def tp_rank(self) -> int:
        return self.rank // self.ulysses_degree % self.tp_degree

    @property
    def cfg_rank(self) -> int:
        return self.rank // (self.ulysses_degree * self.tp_degree) % self.cfg_degree

    @property
    def stage(self) -> int:
        return self.rank // (self.ulysses_degree * self.tp_degree * self.cfg_degree)

    @property
    def sp_ranks(self) -> List[int]:
        """The ranks of this rank's Ulysses group, in SP order."""
        return [self.rank_of(self.stage, self.cfg_rank, self.tp_rank, s) for s in range(self.ulysses_degree)]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_degree - 1

    @property
    def prev_rank(self) -> Optional[int]:
        """The rank that sends this rank its input activations (same position, previous stage)."""
        return None if self.is_first_stage else self.rank_of(self.stage - 1, self.cfg_rank, self.tp_rank, self.sp_rank)

    @property
    def next_rank(self) -> Optional[int]:
        return None if self.is_last_stage else self.rank_of(self.stage + 1, self.cfg_rank, self.tp_rank, self.sp_rank)

    def output_root(self, cfg: int) -> int:
        """The rank that publishes the model output of CFG group `cfg` (its last stage's first rank)."""
        return self.rank_of(self.pp_degree - 1, cfg, 0, 0)

    @property
    def last_stage_root(self) -> int:
        """The rank that publishes this rank's CFG group's output."""
        return self.output_root(self.cfg_rank)

    def cfg_rows(self, batch: int, cfg: Optional[int] = None) -> range:
        """The rows of a batch of `batch` that CFG group `cfg` (default: this rank's) computes.

        Contiguous shares, so with C = 2 the conditional rows (first half) go to group 0.
        """
        return _share(batch, self.cfg_degree, self.cfg_rank if cfg is None else cfg)

    # ----- every group of the job, in one fixed global order (groups are created in that order)

    def _groups(self, axis: str) -> List[List[int]]:
        ranges = {"stage": range(self.pp_degree), "cfg": range(self.cfg_degree), "tp": range(self.tp_degree),
                  "sp": range(self.ulysses_degree)}
        others = [a for a in ("stage", "cfg", "tp", "sp") if a != axis]
        groups = []
        for i in ranges[others[0]]:
            for j in ranges[others[1]]:
                for k in ranges[others[2]]:
                    coords = dict(zip(others, (i, j, k)))
                    groups.append([self.rank_of(**{**coords, axis: v}) for v in ranges[axis]])
        return groups

    def sp_groups(self) -> List[List[int]]:
        """All Ulysses groups of the job."""
        return self._groups("sp")

    def tp_groups(self) -> List[List[int]]:
        """All tensor-parallel groups of the job."""
        return self._groups("tp")

    def link_groups(self) -> List[List[int]]:
        """All stage-to-stage links [r, next(r)] of the job."""
        return [[g[s], g[s + 1]] for s in range(self.pp_degree - 1) for g in self._groups("stage")]


def _share(n: int, parts: int, index: int) -> range:
    """Part `index` of `n` items cut into `parts` contiguous parts (the first ones one larger)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))
