"""Tensor parallelism for the DiT blocks, applied from outside the model.

The T ranks of a tensor-parallel group hold the same tokens and each computes 1/T of every
block's heads and of its FFN's inner width (Megatron's column/row split, as xDiT applies it to
the original):

    self-attention   wqkv  column split by heads: rank t keeps heads [t H/T, (t+1) H/T); the
                           rows are laid out (heads, [q | k | v]), so a head range is one
                           contiguous block of 3 d rows per head
                     wo    row split (its input columns by the same heads), then all-reduce
    cross-attention  wq    column split by heads (rows (heads, d))
                     wkv   column split by heads (rows (heads, [k | v]))
                     wo    row split, then all-reduce
    feed-forward     net.0.proj column split (4D/T inner channels), GELU local
                     net.2      row split, then all-reduce

QK-norm (one weight over a head's channels, shared by all heads), RoPE (per head), the adaLN
modulation and LayerNorms stay whole on every rank: they act per head or per token. With
Ulysses inside a TP rank, the all-to-all trades the rank's H/T heads, so H / T / U must be whole.

`shard_blocks` replaces the projections of the owned blocks by layers of the slice's shape
(lazy, no memory) and returns the `Slice` of the stored tensor each parameter holds, so
`load_weights` reads only that part of every weight from the shards. The model file is not
changed: the replaced layers have the parameter names of the checkpoint, and `n_heads` of
each attention becomes the local head count.

The all-reduce after a row-split projection is a plain call inside the block: with compiled
blocks it is `ops.AllReduce` in the block's graph (its time is part of the compute then);
eagerly it goes through `Collectives.tp_all_reduce`, which times and counts it.
"""
from __future__ import annotations

from typing import Callable, Dict

from mindspore import Tensor, mint, nn, ops

from stepvideo.checkpoint import Slice
from stepvideo.layers import Linear, lazy_parameter
from stepvideo.parallel.collectives import Collectives


class RowParallelLinear(nn.Cell):
    """y = sum over the group of x_t W_t^T: this rank's input features in, the whole output out.

    weight (out, in / T) as the checkpoint's (out, in) cut along its columns; `reduce` sums
    the partial products over the tensor-parallel group.
    """

    def __init__(self, local_in_features: int, out_features: int, reduce: Callable[[Tensor], Tensor]):
        super().__init__()
        self.weight = lazy_parameter((out_features, local_in_features))
        self.reduce = reduce

    def construct(self, x: Tensor) -> Tensor:
        return self.reduce(mint.nn.functional.linear(x, self.weight))


def _heads(total: int, degree: int, index: int, width: int) -> Slice:
    """Rows of head range `index` of `degree` when each of `total` heads owns `width` consecutive rows."""
    per = total // degree * width
    return Slice(0, index * per, (index + 1) * per)


class TensorParallel:
    """The tensor-parallel split of one rank: T, its index t, and how partial outputs are summed."""

    def __init__(self, collectives: Collectives):
        mesh = collectives.mesh
        self.degree, self.index = mesh.tp_degree, mesh.tp_rank
        self.collectives = collectives
        self.layers: list = []  # every RowParallelLinear made here (their `reduce` follows set_jit)
        self.graph_reduce = ops.AllReduce(ops.ReduceOp.SUM, collectives.tp_group) if self.degree > 1 else None

    def shard_blocks(self, model, blocks: range) -> Dict[str, Slice]:
        """Cut the projections of `model.transformer_blocks[i]`, i in `blocks`; returns name -> Slice."""
        slices: Dict[str, Slice] = {}
        for i in blocks:
            for name, part in self.shard_block(model.transformer_blocks[i]).items():
                slices[f"transformer_blocks.{i}.{name}"] = part
        # Replaced layers carry partial parameter names; compiled graphs need the full, unique ones.
        for name, param in model.parameters_and_names():
            if name in slices:
                param.name = name
        return slices

    def shard_block(self, block) -> Dict[str, Slice]:
        """Replace one block's projections by this rank's slices; returns their names in the block."""
        t, T = self.index, self.degree
        attn1, attn2, ff = block.attn1, block.attn2, block.ff
        heads, d, dim = attn1.n_heads, attn1.head_dim, block.dim
        if heads % T:
            raise ValueError(f"tensor_parallel_degree {T} does not divide the {heads} attention heads")
        inner = ff.net[0].proj.out_features
        for layer, label in ((attn1.wqkv, "attn1.wqkv"), (attn1.wo, "attn1.wo"), (attn2.wq, "attn2.wq"),
                             (attn2.wkv, "attn2.wkv"), (attn2.wo, "attn2.wo"), (ff.net[0].proj, "ff.net.0.proj"),
                             (ff.net[2], "ff.net.2")):
            if layer.bias is not None:
                raise ValueError(f"{label} has a bias; the tensor-parallel split expects bias-free projections")
        local = heads // T
        attn1.wqkv = Linear(dim, 3 * local * d, bias=False)
        attn1.n_heads = local
        attn1.wo = self._row(local * d, dim)
        attn2.wq = Linear(dim, local * d, bias=False)
        attn2.wkv = Linear(dim, 2 * local * d, bias=False)
        attn2.n_heads = local
        attn2.wo = self._row(local * d, dim)
        ff.net[0].proj = Linear(dim, inner // T, bias=False)
        ff.net[2] = self._row(inner // T, dim)
        columns = Slice(1, t * local * d, (t + 1) * local * d)
        return {
            "attn1.wqkv.weight": _heads(heads, T, t, 3 * d),  # rows (heads, [q | k | v])
            "attn1.wo.weight": columns,
            "attn2.wq.weight": _heads(heads, T, t, d),
            "attn2.wkv.weight": _heads(heads, T, t, 2 * d),  # rows (heads, [k | v])
            "attn2.wo.weight": columns,
            "ff.net.0.proj.weight": Slice(0, t * inner // T, (t + 1) * inner // T),
            "ff.net.2.weight": Slice(1, t * inner // T, (t + 1) * inner // T),
        }

    def _row(self, local_in: int, out: int) -> RowParallelLinear:
        layer = RowParallelLinear(local_in, out, self.collectives.tp_all_reduce)
        self.layers.append(layer)
        return layer

    def set_jit(self, enabled: bool) -> None:
        """Compiled blocks sum with `ops.AllReduce` inside their graph; eager ones through the timed collectives."""
        for layer in self.layers:
            layer.reduce = self.graph_reduce if enabled else self.collectives.tp_all_reduce
