"""Which rank does what: the (pipeline stage x Ulysses) layout of a DiT job.

Ranks are laid out as `rank = stage * ulysses_degree + sp_rank`, as in the
earlier MindSpore deployment: the ranks of one stage form its sequence-parallel
(SP) group, and rank r hands activations to rank r + ulysses_degree (the same
SP position in the next stage). A `Mesh` is a plain value; nothing here talks
to the network, so layouts can be validated before any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


def possible_layouts(world_size: int, num_heads: int) -> List[Tuple[int, int]]:
    """(ulysses_degree, pp_degree) pairs that fit `world_size` ranks for a model with `num_heads`."""
    return [(u, world_size // u) for u in range(1, world_size + 1)
            if world_size % u == 0 and num_heads % u == 0]


def check_layout(world_size: int, ulysses_degree: int, pp_degree: int, num_heads: int, num_layers: int) -> None:
    """Raise ValueError with the possible layouts if this one cannot work."""
    problems = []
    if ulysses_degree < 1 or pp_degree < 1:
        problems.append("ulysses_degree and pp_degree must be >= 1")
    elif ulysses_degree * pp_degree != world_size:
        problems.append(f"ulysses_degree x pp_degree = {ulysses_degree} x {pp_degree} = "
                        f"{ulysses_degree * pp_degree}, but the job has {world_size} rank(s)")
    if ulysses_degree >= 1 and num_heads % ulysses_degree:
        problems.append(f"ulysses_degree {ulysses_degree} does not divide the {num_heads} attention heads")
    if pp_degree > num_layers:
        problems.append(f"pp_degree {pp_degree} exceeds the {num_layers} transformer blocks")
    if problems:
        options = ", ".join(f"--ulysses_degree {u} --pp_degree {p}" for u, p in possible_layouts(world_size, num_heads)
                            if p <= num_layers)
        raise ValueError("invalid parallel layout: " + "; ".join(problems) +
                         f". With {world_size} rank(s) and {num_heads} heads the possible layouts are: {options}")


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
    """The parallel position of one rank."""

    rank: int
    world_size: int
    ulysses_degree: int
    pp_degree: int

    def __post_init__(self):
        if self.ulysses_degree * self.pp_degree != self.world_size or not 0 <= self.rank < self.world_size:
            raise ValueError(f"inconsistent mesh: rank {self.rank} of {self.world_size}, "
                             f"ulysses {self.ulysses_degree} x pp {self.pp_degree}")

    @property
    def stage(self) -> int:
        return self.rank // self.ulysses_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses_degree

    @property
    def sp_ranks(self) -> List[int]:
        """The ranks of this rank's SP group (its stage), in SP order."""
        first = self.stage * self.ulysses_degree
        return list(range(first, first + self.ulysses_degree))

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_degree - 1

    @property
    def prev_rank(self) -> Optional[int]:
        """The rank that sends this rank its input activations (same SP position, previous stage)."""
        return None if self.is_first_stage else self.rank - self.ulysses_degree

    @property
    def next_rank(self) -> Optional[int]:
        return None if self.is_last_stage else self.rank + self.ulysses_degree

    @property
    def last_stage_root(self) -> int:
        """The rank that publishes the model output (first rank of the last stage)."""
        return (self.pp_degree - 1) * self.ulysses_degree

    def sp_groups(self) -> List[List[int]]:
        """All SP groups of the job, in a fixed global order."""
        u = self.ulysses_degree
        return [list(range(s * u, (s + 1) * u)) for s in range(self.pp_degree)]

    def link_groups(self) -> List[List[int]]:
        """All stage-to-stage links [r, r + u] of the job, in a fixed global order."""
        u = self.ulysses_degree
        return [[s * u + i, (s + 1) * u + i] for s in range(self.pp_degree - 1) for i in range(u)]
