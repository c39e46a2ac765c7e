"""Conditioning layers of the DiT: timestep embedding (adaLN-single) and caption projection.

Parameter names follow the checkpoint (`adaln_single.emb.timestep_embedder.linear_1.weight`,
`caption_projection.linear_2.bias`, ...).

`RMSNorm` is re-exported from `stepvideo.layers` (normalise in fp32, cast back,
then scale).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from stepvideo import backend
from stepvideo.layers import Linear, RMSNorm

__all__ = ["RMSNorm", "get_timestep_embedding", "Timesteps", "TimestepEmbedding",
           "PixArtAlphaCombinedTimestepSizeEmbeddings", "AdaLayerNormSingle", "PixArtAlphaTextProjection"]


def _frequencies(half_dim: int, downscale_freq_shift: float, max_period: float) -> np.ndarray:
    """exp(-ln(max_period) * k / (half_dim - shift)) for k < half_dim, rounded once to fp32.

    Computed on the host in float64: the frequencies multiply timesteps up to
    1000, so a last-bit error in an fp32 `exp` kernel (relative 4e-6 on CPU)
    would move the phases by ~4e-3 rad.
    """
    k = np.arange(half_dim, dtype=np.float64)
    return np.exp(-math.log(max_period) * k / (half_dim - downscale_freq_shift)).astype(np.float32)


def get_timestep_embedding(timesteps: Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (n,) timesteps -> (n, embedding_dim) fp32: [sin, cos] or, flipped, [cos, sin]."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps: expected a 1-D tensor (n,), got shape {tuple(timesteps.shape)}")
    half_dim = embedding_dim // 2
    freqs = Tensor.from_numpy(_frequencies(half_dim, downscale_freq_shift, max_period))
    args = timesteps.astype(ms.float32).expand_dims(1) * freqs.expand_dims(0)  # (n, half_dim)
    if scale != 1:
        args = scale * args
    sin, cos = ops.sin(args), ops.cos(args)
    emb = ops.cat((cos, sin) if flip_sin_to_cos else (sin, cos), -1)
    if embedding_dim % 2 == 1:
        emb = ops.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Cell):
    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def construct(self, timesteps: Tensor) -> Tensor:
        """(n,) -> (n, num_channels) fp32."""
        return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      downscale_freq_shift=self.downscale_freq_shift)


class TimestepEmbedding(nn.Cell):
    """linear_2(silu(linear_1(x)))."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim if out_dim is None else out_dim)

    def construct(self, sample: Tensor) -> Tensor:
        return self.linear_2(backend.silu(self.linear_1(sample)))


class PixArtAlphaCombinedTimestepSizeEmbeddings(nn.Cell):
    """Timestep -> 256-channel [cos, sin] embedding -> MLP -> (n, embedding_dim)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)

    def construct(self, timestep: Tensor) -> Tensor:
        proj = self.time_proj(timestep)
        return self.timestep_embedder(proj.astype(self.timestep_embedder.linear_1.weight.dtype))


class AdaLayerNormSingle(nn.Cell):
    """adaLN-single (PixArt-alpha): one timestep embedding shared by all blocks.

    The timestep arrives in [0, 1] (the scheduler's sigma) and is rescaled by
    `time_step_rescale` (1000) before the sinusoidal embedding.
    """

    def __init__(self, embedding_dim: int, time_step_rescale: float = 1000):
        super().__init__()
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(embedding_dim)
        self.linear = Linear(embedding_dim, 6 * embedding_dim)
        self.time_step_rescale = time_step_rescale

    def construct(self, timestep: Tensor):
        """(b,) -> (modulation (b, 6D), embedded_timestep (b, D))."""
        embedded_timestep = self.emb(timestep * self.time_step_rescale)
        return self.linear(backend.silu(embedded_timestep)), embedded_timestep


class PixArtAlphaTextProjection(nn.Cell):
    """Caption features -> model width: linear_2(gelu_tanh(linear_1(x)))."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = Linear(in_features, hidden_size)
        self.linear_2 = Linear(hidden_size, hidden_size)

    def construct(self, caption: Tensor) -> Tensor:
        return self.linear_2(backend.gelu_tanh(self.linear_1(caption)))
