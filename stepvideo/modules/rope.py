"""3-D rotary position embedding of the DiT self-attention.

Each video token has an integer position (frame, row, col). The head dimension
is cut into consecutive chunks (`ch_split`, [64, 32, 32] in the DiT); chunk 0 is
rotated by the frame index, chunk 1 by the row, chunk 2 by the column. Inside a
chunk of size D, channel i pairs with channel i + D/2 ("rotate half"):

    angle_i   = pos * freq^(-2i/D),                    i < D/2
    out_i     = x_i cos(angle_i) - x_{i+D/2} sin(angle_i)
    out_{i+D/2} = x_{i+D/2} cos(angle_i) + x_i sin(angle_i)

Token n of an (f, h, w) grid sits at (n // (h*w), (n // w) % h, n % w), i.e. the
tokens are frame-major, then row-major inside a frame.

The positions travel as an explicit integer grid (n, 3) so that a sequence-
parallel caller can slice tokens and grid alike; `__call__(tokens, [f, h, w])`
builds the grid itself. Nothing depends on the batch size. `F0` and
`scaling_factor` are accepted and unused, as in the checkpoint's code.

The angles are computed in fp32 and then cast to the tokens'
dtype *before* cos/sin, as the original does. In fp32 this is exact; in bf16
(Ascend) it rounds angles of tens of radians to steps of ~0.25 rad, which is
what the published model was run with.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops


class RoPE3D:
    def __init__(self, freq: float = 1e4, F0: float = 1.0, scaling_factor: float = 1.0):
        self.base = freq
        self.F0 = F0
        self.scaling_factor = scaling_factor
        self._inv_freq: Dict[int, Tensor] = {}  # chunk size D -> (D/2,) fp32

    @staticmethod
    def position_grid(frames: int, height: int, width: int) -> Tensor:
        """(frames*height*width, 3) int32 positions (frame, row, col), frame-major token order."""
        f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
        grid = np.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], axis=-1).astype(np.int32)
        return Tensor.from_numpy(grid)

    def inv_freq(self, dim: int) -> Tensor:
        """freq^(-2i/dim) for i < dim/2, in fp32 as the original computes it."""
        if dim not in self._inv_freq:
            exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
            inv = (1.0 / np.power(np.float32(self.base), exponents, dtype=np.float32)).astype(np.float32)
            self._inv_freq[dim] = Tensor.from_numpy(inv)
        return self._inv_freq[dim]

    def cos_sin(self, positions: Tensor, dim: int, dtype: ms.dtype) -> Tuple[Tensor, Tensor]:
        """positions (...,) integers -> cos, sin of shape (..., dim), halves repeated (rotate-half layout)."""
        angles = positions.astype(ms.float32).expand_dims(-1) * self.inv_freq(dim)  # (..., dim/2)
        angles = ops.cat((angles, angles), -1).astype(dtype)
        return ops.cos(angles), ops.sin(angles)

    @staticmethod
    def rotate_half(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return ops.cat((-x[..., half:], x[..., :half]), -1)

    def tables(self, grid: Tensor, ch_split: Sequence[int], dtype: ms.dtype) -> Tuple[Tensor, Tensor]:
        """Whole-head tables for `rotate`: grid (n, 3) or (b, n, 3) -> cos, sin of shape (n, d) or (b, n, d).

        Chunk c of the head uses axis c of the grid. `sin` carries the sign of the
        rotate-half pairing (negative on the first half of each chunk), so that
        `rotate` needs one channel permutation instead of a negation per chunk.
        Computing these once per forward (not per block and per q/k) is what makes
        RoPE cheap: the tables depend only on the token positions.
        """
        _check_split(ch_split)
        if grid.ndim not in (2, 3) or grid.shape[-1] != 3:
            raise ValueError(f"grid: expected (n, 3) or (b, n, 3) positions, got {tuple(grid.shape)}")
        cos, sin = [], []
        for axis, dim in enumerate(ch_split):
            c, s = self.cos_sin(grid[..., axis], dim, dtype)
            cos.append(c)
            sin.append(ops.cat((-s[..., :dim // 2], s[..., dim // 2:]), -1))
        return ops.cat(cos, -1), ops.cat(sin, -1)

    @staticmethod
    def swap_halves(x: Tensor, ch_split: Sequence[int]) -> Tensor:
        """Exchange the two halves of every chunk of the last axis (the rotate-half pairing, without signs).

        Done as one gather of equal-sized channel blocks (a block is the largest size
        dividing every half), which moves whole runs of memory instead of single channels.
        """
        block = math.gcd(*(d // 2 for d in ch_split))
        order, start = [], 0
        for dim in ch_split:
            half = dim // 2 // block
            order += list(range(start + half, start + 2 * half)) + list(range(start, start + half))
            start += 2 * half
        blocks = x.reshape(x.shape[:-1] + (start, block))
        return ops.gather(blocks, Tensor(np.array(order, np.int32)), blocks.ndim - 2).reshape(x.shape)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor, ch_split: Sequence[int]) -> Tensor:
        """x (..., d) rotated by `tables` output broadcast to x: x cos + swap_halves(x) sin."""
        return x * cos + RoPE3D.swap_halves(x, ch_split) * sin

    def apply(self, tokens: Tensor, grid: Tensor, ch_split: Sequence[int]) -> Tensor:
        """Rotate `tokens` (b, n, heads, d) by the positions `grid` (n, 3), (1, n, 3) or (b, n, 3)."""
        if sum(ch_split) != tokens.shape[-1]:
            raise ValueError(f"ch_split {list(ch_split)} sums to {sum(ch_split)}; expected the head dim "
                             f"{tokens.shape[-1]} of tokens {tuple(tokens.shape)}")
        _check_split(ch_split)
        if grid.ndim not in (2, 3) or grid.shape[-1] != 3 or grid.shape[-2] != tokens.shape[1]:
            raise ValueError(f"grid: expected ({tokens.shape[1]}, 3) or (b, {tokens.shape[1]}, 3) positions for "
                             f"tokens {tuple(tokens.shape)}, got {tuple(grid.shape)}")
        cos, sin = self.tables(grid, ch_split, tokens.dtype)  # (1|b, n, d) after the next line
        if grid.ndim == 2:
            cos, sin = cos.expand_dims(0), sin.expand_dims(0)
        return self.rotate(tokens, cos.expand_dims(2), sin.expand_dims(2), ch_split)  # broadcast over heads

    def __call__(self, tokens: Tensor, rope_positions: Sequence[int], ch_split: Sequence[int]) -> Tensor:
        """tokens (b, f*h*w, heads, d) with rope_positions = [f, h, w] -> rotated tokens, same shape."""
        if len(rope_positions) != 3:
            raise ValueError(f"rope_positions: expected [f, h, w], got {rope_positions}")
        f, h, w = (int(v) for v in rope_positions)
        if f * h * w != tokens.shape[1]:
            raise ValueError(f"rope_positions {[f, h, w]} give {f * h * w} positions but tokens "
                             f"{tuple(tokens.shape)} have {tokens.shape[1]}")
        return self.apply(tokens, self.position_grid(f, h, w), ch_split)


def _check_split(ch_split: Sequence[int]) -> None:
    if len(ch_split) != 3 or any(d % 2 for d in ch_split):
        raise ValueError(f"ch_split {list(ch_split)}: expected three even chunk sizes (frame, row, col)")
