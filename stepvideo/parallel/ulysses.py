"""Ulysses sequence parallelism for the DiT self-attention.

Inside a pipeline stage the video tokens are cut into `u` equal shards, one per
rank of the stage's SP group. Everything in a block is per token except the
self-attention, which needs every token: there the SP group trades sequence
shards for head shards (one all-to-all), attends over the whole sequence with
H/u heads per rank, and trades back (a second all-to-all):

    q, k, v (b, n/u, H, d)  --all-to-all-->  (b, n, H/u, d)  --attention-->
    (b, n, H/u, d)          --all-to-all-->  (b, n/u, H, d)

q, k and v travel in one all-to-all (stacked on a new axis) to pay the latency once.

Token counts that the degree does not divide are padded at the end to the next
multiple; the padded positions are masked out as keys, so every real token's
result equals the unsplit model's, and the padded queries are dropped when the
shards are gathered. (The published 544x992x204 size has 36*34*62 = 75888
tokens, which every degree that divides the 48 heads also divides: no padding
there.)

`UlyssesAttention` replaces `SelfAttention.core_attention` on the blocks a rank
owns (`install`); the model file knows nothing about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from stepvideo import backend
from stepvideo.parallel.collectives import Collectives


@dataclass(frozen=True)
class SequenceSplit:
    """`tokens` positions cut into `degree` equal contiguous shards, the end zero-padded."""

    tokens: int
    degree: int

    def __post_init__(self):
        if self.tokens < 1 or self.degree < 1:
            raise ValueError(f"SequenceSplit: expected tokens >= 1 and degree >= 1, got {self.tokens}, {self.degree}")

    @property
    def padded(self) -> int:
        return -(-self.tokens // self.degree) * self.degree

    @property
    def local(self) -> int:
        """Positions per shard (padding included)."""
        return self.padded // self.degree

    @property
    def padding(self) -> int:
        return self.padded - self.tokens

    def shard(self, x: Tensor, index: int, axis: int = 1) -> Tensor:
        """Shard `index` of `x` along `axis` (which must have `tokens` entries), contiguous."""
        if x.shape[axis] != self.tokens:
            raise ValueError(f"shard: axis {axis} of {tuple(x.shape)} should have {self.tokens} tokens")
        if not 0 <= index < self.degree:
            raise ValueError(f"shard: index {index} outside 0..{self.degree - 1}")
        if self.padding:
            pad_shape = list(x.shape)
            pad_shape[axis] = self.padding
            # fp32 zeros cast to x's dtype: there is no bf16 `zeros` kernel on CPU
            x = ops.cat((x, ops.zeros(tuple(pad_shape), ms.float32).astype(x.dtype)), axis)
        start = index * self.local
        return ops.narrow(x, axis, start, self.local).contiguous()

    def unpad(self, x: Tensor, axis: int = 1) -> Tensor:
        """The first `tokens` positions of a gathered (padded) tensor."""
        if x.shape[axis] != self.padded:
            raise ValueError(f"unpad: axis {axis} of {tuple(x.shape)} should have {self.padded} positions")
        return ops.narrow(x, axis, 0, self.tokens).contiguous() if self.padding else x

    def key_mask(self) -> Optional[Tensor]:
        """(1, 1, padded) bool, True for real tokens; None when nothing is padded."""
        if not self.padding:
            return None
        return Tensor.from_numpy((np.arange(self.padded) < self.tokens).reshape(1, 1, -1))


class UlyssesAttention:
    """`core_attention` for one SP group: (b, n/u, H, d) shards in and out, full attention inside."""

    def __init__(self, collectives: Collectives, split: SequenceSplit,
                 attention: Callable[..., Tensor] = backend.attention):
        if split.degree != collectives.mesh.ulysses_degree:
            raise ValueError(f"UlyssesAttention: split degree {split.degree} != Ulysses degree "
                             f"{collectives.mesh.ulysses_degree}")
        self.collectives = collectives
        self.split = split
        self.attention = attention
        self.key_mask = split.key_mask()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (b, n/u, H, d) -> (b, n/u, H, d)."""
        heads = q.shape[2]
        if q.shape[1] != self.split.local or heads % self.split.degree:
            raise ValueError(f"UlyssesAttention: expected (b, {self.split.local}, H, d) shards with H divisible by "
                             f"{self.split.degree}, got {tuple(q.shape)}")
        qkv = ops.stack((q, k, v), axis=2)  # (b, n/u, 3, H, d)
        qkv = self.collectives.sp_all_to_all(qkv, scatter_dim=3, gather_dim=1)  # (b, n, 3, H/u, d)
        q, k, v = (qkv[:, :, i].contiguous() for i in range(3))
        out = self.attention(q, k, v, mask=self.key_mask)  # (b, n, H/u, d)
        return self.collectives.sp_all_to_all(out.contiguous(), scatter_dim=1, gather_dim=2)


def install(model, blocks: range, core_attention: Callable[..., Tensor]) -> None:
    """Make the self-attention of `model.transformer_blocks[i]`, i in `blocks`, use `core_attention`."""
    for i in blocks:
        model.transformer_blocks[i].attn1.core_attention = core_attention
