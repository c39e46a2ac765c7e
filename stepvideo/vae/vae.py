"""`AutoencoderKL` version 2: Step-Video's deep-compression video VAE (16x space, 8x time).

    vae = AutoencoderKL(z_channels=64, model_path="<ckpt>/vae/vae_v2.safetensors", version=2)
    video = vae.decode(z)        # z (b, T, 64, h, w) -> (b, frames, 3, 16h, 16w), unclamped
    z = vae.encode(x, generator=np.random.default_rng(0))   # x (b, frames, 3, H, W) in [-1, 1]

Time is cut into independent chunks: 3 latents <-> 17 frames (the last chunk may be
shorter: n latents <-> 8n - 7 frames). Each chunk is decoded alone, with causal
padding at its start; the decoded chunks are written into one output buffer and
each boundary is then blended (`mix`). Only one chunk's activations exist at a
time.

All tensors inside the networks are (b, c, t, h, w). The math:
- "causal" 3-D convolutions pad time with zero frames at the front only (k - 1
  frames for a kernel of k; the resnet blocks insert those two zero frames after
  norm + SiLU, which is the same thing) and space symmetrically;
- GroupNorm is applied per frame: statistics over H, W and the group's channels of
  one frame (`FrameGroupNorm`);
- the mid-block attention is single-head over all (t, h, w) positions in raster
  order with a causal mask;
- pixel (un)shuffle in 3-D moves 2x2x2 blocks to channels and back, padding /
  dropping one frame at the front; the shortcuts beside those convolutions
  duplicate channels (up) or average groups of channels (down);
- the temporal up-sampling resblock adds its input twice (before and after the
  final SiLU).

Widths, level counts and the GroupNorm group count come from `VaeConfig` (defaults:
the published v2 values); posterior noise comes from a numpy generator or an
explicit array. The mid-block attention goes through `AttnBlock.core_attention`.
Where this differs from the original (none of it changes a number): docs/porting.md.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from stepvideo import backend
from stepvideo.checkpoint import CheckpointError, load_weights, read_config
from stepvideo.contracts import check_latent_shape
from stepvideo.layers import Conv3d, lazy_parameter

CHECKPOINT_FILE = "vae_v2.safetensors"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VaeConfig:
    """Widths and level layout of the v2 encoder and decoder (defaults: the published VAE).

    Level i of the encoder has `encoder_ch * encoder_ch_mult[i]` channels and halves
    time too when i is in `down_sampling_layer`; decoder level i has
    `decoder_ch * decoder_ch_mult[i]` channels and doubles time when i is in
    `temporal_up_layers`. Exactly two temporal levels on each side (and the decoder's
    trim of `temporal_downsample - 1` leading frames) are what make 3 latents <-> 17
    frames, so those are checked.

    `patch_channels` is the width of the 2x2x2-patch layer between the latents and the
    mid-block width (the original fixes it to 4 * z_channels * 2^3 = 2048 for z = 64;
    None means that). A tiny VAE needs a smaller one: the parameter-free shortcuts need
    it to be a multiple of 2 * z_channels and to divide 8 * (top-level width).
    """

    encoder_ch: int = 32
    encoder_ch_mult: Tuple[int, ...] = (4, 8, 16, 16)
    down_sampling_layer: Tuple[int, ...] = (1, 2)
    decoder_ch: int = 128
    decoder_ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    temporal_up_layers: Tuple[int, ...] = (2, 3)
    temporal_downsample: int = 4
    num_groups: int = 32
    patch_channels: Optional[int] = None

    def __post_init__(self):
        for name in ("encoder_ch_mult", "down_sampling_layer", "decoder_ch_mult", "temporal_up_layers"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        enc_levels, dec_levels = len(self.encoder_ch_mult), len(self.decoder_ch_mult)
        if len(set(self.down_sampling_layer)) != 2 or not all(0 <= i < enc_levels - 1 for i in self.down_sampling_layer):
            raise ValueError(f"down_sampling_layer={self.down_sampling_layer}: the 17-frame/3-latent chunking needs "
                             f"two distinct encoder levels in [0, {enc_levels - 1})")
        if len(set(self.temporal_up_layers)) != 2 or not all(0 < i < dec_levels for i in self.temporal_up_layers):
            raise ValueError(f"temporal_up_layers={self.temporal_up_layers}: the 17-frame/3-latent chunking needs "
                             f"two distinct decoder levels in [1, {dec_levels})")
        if self.temporal_downsample != 4:
            raise ValueError(f"temporal_downsample={self.temporal_downsample}: must be 4 (2 temporal doublings)")
        widths = [self.encoder_ch] + [self.encoder_ch * m for m in self.encoder_ch_mult] + \
                 [self.decoder_ch * m for m in self.decoder_ch_mult]
        bad = sorted({w for w in widths if w <= 0 or w % self.num_groups})
        if bad:
            raise ValueError(f"num_groups={self.num_groups} must divide every block width; it does not divide {bad}")

    def patch_width(self, z_channels: int) -> int:
        return self.patch_channels if self.patch_channels is not None else 4 * z_channels * 2 ** 3

    @classmethod
    def tiny(cls) -> "VaeConfig":
        """A VAE of ~2.6M parameters with the real structure (for z = 64), for demos and fast tests."""
        return cls(encoder_ch=8, encoder_ch_mult=(1, 2, 4, 4), decoder_ch=8, decoder_ch_mult=(1, 2, 4, 4),
                   num_groups=4, patch_channels=128)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> "VaeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"VaeConfig: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)


# --------------------------------------------------------------------------- small pieces


def causal_pad(x: Tensor, frames: int) -> Tensor:
    """(b, c, t, h, w) -> (b, c, frames + t, h, w) with zero frames in front."""
    return ops.pad(x, (0, 0, 0, 0, frames, 0)) if frames else x


class FrameGroupNorm(nn.Cell):
    """GroupNorm of each frame on its own (v2): statistics over H, W and the group's channels."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = lazy_parameter((num_channels,), fill="ones")
        self.bias = lazy_parameter((num_channels,), fill="zeros")

    def construct(self, x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> same shape."""
        b, c, t, h, w = x.shape
        # Frames folded into the batch; the temporary is dropped as soon as the norm returns.
        out = backend.group_norm(x.transpose(0, 2, 1, 3, 4).contiguous().reshape(b * t, c, h, w),
                                 self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(b, t, c, h, w).transpose(0, 2, 1, 3, 4).contiguous()


class CausalConv(nn.Cell):
    """3-D convolution padded causally in time (front only) and symmetrically in space.

    Kernel k (int or (kt, kh, kw)), stride s (int = time stride, or a triple): time is
    padded with kt - 1 zero frames in front, height/width with kh // 2 / kw // 2.
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size, stride=1):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
        self.time_pad = kt - 1  # the original's extra max(1 - stride_t, 0) is 0 for every stride used
        self.conv = Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))

    def construct(self, x: Tensor) -> Tensor:
        """(b, c_in, t, h, w) -> (b, c_out, t', h', w')."""
        return self.conv(causal_pad(x, self.time_pad))


class CausalConvAfterNorm(CausalConv):
    """A `CausalConv` whose input already carries its `time_pad` zero frames (see `norm_silu_pad`).

    Padding where the normalised activation is made lets the unpadded copy be freed
    before the convolution runs: one full-size tensor less at the decoder's peak.
    """

    def construct(self, x_padded: Tensor) -> Tensor:
        """(b, c_in, time_pad + t, h, w) -> (b, c_out, t, h', w')."""
        return self.conv(x_padded)


def norm_silu_pad(norm: nn.Cell, x: Tensor, frames: int) -> Tensor:
    """silu(norm(x)) with `frames` zero frames in front: the input of a `CausalConvAfterNorm`."""
    return causal_pad(backend.silu(norm(x)), frames)


class FrameConv2d(nn.Cell):
    """A 2-D convolution applied to every frame; weight (out, in, kh, kw) as a torch Conv2d.

    Run as a 3-D convolution with a depth-1 kernel, so frames need not be folded into
    the batch (no layout copies of the largest activations).
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride = (1, stride, stride)
        self.padding = (0, padding, padding)
        self.weight = lazy_parameter((chan_out, chan_in, kernel_size, kernel_size))
        self.bias = lazy_parameter((chan_out,))

    def construct(self, x: Tensor) -> Tensor:
        """(b, c_in, t, h, w) -> (b, c_out, t, h', w')."""
        pad_mode = "pad" if any(self.padding) else "valid"
        return ops.conv3d(x, self.weight.expand_dims(2), self.bias, stride=self.stride, pad_mode=pad_mode,
                          padding=self.padding if any(self.padding) else 0)


def nearest_upsample(x: Tensor, scale: Tuple[float, float, float]) -> Tensor:
    """Nearest-neighbour up-sampling of (b, c, t, h, w) by integer factors (t, h, w)."""
    return ops.interpolate(x, scale_factor=scale, mode="nearest")


# --------------------------------------------------------------------------- pixel (un)shuffle 3-D


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(b, c*f^3, t, h, w) -> (b, c, f*t - (f-1), f*h, f*w): channel blocks to space-time, first f-1 frames dropped."""
    b, c, t, h, w = x.shape
    new_c = c // factor ** 3
    x = x.reshape(b, new_c, factor, factor, factor, t, h, w).transpose(0, 1, 5, 2, 6, 3, 7, 4).contiguous()
    x = x.reshape(b, new_c, t * factor, h * factor, w * factor)
    return x[:, :, factor - 1:].contiguous() if factor > 1 else x


def pixel_unshuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(b, c, t, h, w) -> (b, c*f^3, (t+f-1)/f, h/f, w/f): f-1 zero frames in front, then f^3 blocks to channels."""
    x = causal_pad(x, factor - 1)
    b, c, t, h, w = x.shape
    if t % factor or h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle_3d: (frames + {factor - 1}, h, w) = {(t, h, w)} must be divisible "
                         f"by {factor}")
    x = x.reshape(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).contiguous()
    return x.reshape(b, c * factor ** 3, t // factor, h // factor, w // factor)


class ConvPixelShuffleUpSampleLayer3D(nn.Cell):
    """Causal conv to out*f^3 channels, then `pixel_shuffle_3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels * factor ** 3, kernel_size)

    def construct(self, x: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.conv(x), self.factor)


class ConvPixelUnshuffleDownSampleLayer3D(nn.Cell):
    """Causal conv to out/f^3 channels, then `pixel_unshuffle_3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, factor: int):
        super().__init__()
        if out_channels % factor ** 3:
            raise ValueError(f"out_channels={out_channels} must be a multiple of factor^3={factor ** 3}")
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels // factor ** 3, kernel_size)

    def construct(self, x: Tensor) -> Tensor:
        return pixel_unshuffle_3d(self.conv(x), self.factor)


class ChannelDuplicatingPixelUnshuffleUpSampleLayer3D(nn.Cell):
    """Parameter-free shortcut of the up-shuffle: repeat each channel, then `pixel_shuffle_3d`."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        if out_channels * factor ** 3 % in_channels:
            raise ValueError(f"{out_channels} * {factor}^3 must be a multiple of in_channels={in_channels}")
        self.factor = factor
        self.repeats = out_channels * factor ** 3 // in_channels

    def construct(self, x: Tensor) -> Tensor:
        """(b, in, t, h, w) -> (b, out, f*t - (f-1), f*h, f*w)."""
        return pixel_shuffle_3d(x.repeat_interleave(self.repeats, 1), self.factor)


class PixelUnshuffleChannelAveragingDownSampleLayer3D(nn.Cell):
    """Parameter-free shortcut of the down-shuffle: `pixel_unshuffle_3d`, then average groups of channels."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        if in_channels * factor ** 3 % out_channels:
            raise ValueError(f"in_channels={in_channels} * {factor}^3 must be a multiple of {out_channels}")
        self.factor = factor
        self.out_channels = out_channels
        self.group_size = in_channels * factor ** 3 // out_channels

    def construct(self, x: Tensor) -> Tensor:
        """(b, in, t, h, w) -> (b, out, (t+f-1)/f, h/f, w/f); output channel j = mean of unshuffled j*g .. j*g+g-1."""
        x = pixel_unshuffle_3d(x, self.factor)
        b, _, t, h, w = x.shape
        return ops.mean(x.reshape(b, self.out_channels, self.group_size, t, h, w), 2)


# --------------------------------------------------------------------------- blocks


class Resnet3DBlock(nn.Cell):
    """conv2(pad(silu(norm2(conv1(pad(silu(norm1(x)))))))) + shortcut(x); 1x1x1 `nin_shortcut` if widths differ.

    pad = two zero frames in front (the causal padding of the 3x3x3 convs).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = FrameGroupNorm(num_groups, in_channels)
        self.conv1 = CausalConvAfterNorm(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(num_groups, out_channels)
        self.conv2 = CausalConvAfterNorm(out_channels, out_channels, 3)
        self.nin_shortcut = CausalConv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x: Tensor) -> Tensor:
        """(b, in, t, h, w) -> (b, out, t, h, w)."""
        # One nested expression and the shortcut last: every intermediate is freed as soon
        # as the next one exists (this block at full resolution is the decoder's peak).
        h = self.conv2(norm_silu_pad(self.norm2, self.conv1(norm_silu_pad(self.norm1, x, self.conv1.time_pad)),
                                     self.conv2.time_pad))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Cell):
    """x + proj_out(causal single-head attention of the per-frame-normed x over all (t, h, w) positions)."""

    def __init__(self, in_channels: int, num_groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(num_groups, in_channels)
        self.q = CausalConv(in_channels, in_channels, 1)
        self.k = CausalConv(in_channels, in_channels, 1)
        self.v = CausalConv(in_channels, in_channels, 1)
        self.proj_out = CausalConv(in_channels, in_channels, 1)
        # Called as core_attention(q, k, v, causal=True), each (b, t*h*w, 1, c); replaceable.
        self.core_attention = backend.attention

    @staticmethod
    def _tokens(x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> (b, t*h*w, 1, c), positions in raster order (time, row, column)."""
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(0, 2, 1).contiguous().reshape(b, -1, 1, c)

    def construct(self, x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> same shape."""
        b, c, t, h, w = x.shape
        normed = self.norm(x)
        out = self.core_attention(self._tokens(self.q(normed)), self._tokens(self.k(normed)),
                                  self._tokens(self.v(normed)), causal=True)  # (b, t*h*w, 1, c)
        out = out.reshape(b, t * h * w, c).transpose(0, 2, 1).contiguous().reshape(b, c, t, h, w)
        return self.proj_out(out) + x


class MidBlock(nn.Cell):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.block_1 = Resnet3DBlock(channels, channels, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = Resnet3DBlock(channels, channels, num_groups)

    def construct(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample2D(nn.Cell):
    """Per frame: zero-pad one row at the bottom and one column at the right, 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> (b, c, t, ceil(h/2), ceil(w/2))."""
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Downsample3D(nn.Cell):
    """Causal 3x3x3 conv with stride 2 in time and space: t -> ceil(t/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, stride=(2, 2, 2))

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Per frame: nearest x2 in space, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> (b, c, t, 2h, 2w)."""
        return self.conv(nearest_upsample(x, (1.0, 2.0, 2.0)))


class Res3DBlockUpsample(nn.Cell):
    """silu(norm2(conv2(silu(norm1(conv1(x))))) + x) + x: the input is added twice, as in the original."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv1 = CausalConv(channels, channels, 3)
        self.norm1 = FrameGroupNorm(num_groups, channels)
        self.conv2 = CausalConv(channels, channels, 3)
        self.norm2 = FrameGroupNorm(num_groups, channels)

    def construct(self, x: Tensor) -> Tensor:
        h = backend.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return backend.silu(h + x) + x


class Upsample3D(nn.Cell):
    """Nearest x2 in time and space, then `Res3DBlockUpsample` (named `conv3d` as in the checkpoint)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels, num_groups)

    def construct(self, x: Tensor) -> Tensor:
        """(b, c, t, h, w) -> (b, c, 2t, 2h, 2w)."""
        return self.conv3d(nearest_upsample(x, (2.0, 2.0, 2.0)))


class EncoderLevel(nn.Cell):
    def __init__(self, blocks: Sequence[nn.Cell], downsample: Optional[nn.Cell]):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.downsample = downsample

    def construct(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class DecoderLevel(nn.Cell):
    def __init__(self, blocks: Sequence[nn.Cell], upsample: Optional[nn.Cell]):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.upsample = upsample

    def construct(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


# --------------------------------------------------------------------------- encoder / decoder


class VideoEncoder(nn.Cell):
    """(b, c_in, frames, H, W) -> moments (b, T, 2*z, H/16, W/16) for one chunk.

    Steps (each a method, so tests can compare intermediates): `down_blocks` (conv_in and
    the resolution levels) -> `mid` -> `head` (norm, SiLU, patchify to 2x2x2 blocks, conv_out,
    each with its parameter-free shortcut).
    """

    def __init__(self, in_channels: int = 3, z_channels: int = 64, num_res_blocks: int = 2, double_z: bool = True,
                 config: VaeConfig = VaeConfig()):
        super().__init__()
        ch, mult, groups = config.encoder_ch, config.encoder_ch_mult, config.num_groups
        self.conv_in = CausalConv(in_channels, ch, 3)
        in_mult = (1,) + mult
        levels = []
        for i, m in enumerate(mult):
            widths = [ch * in_mult[i]] + [ch * m] * num_res_blocks
            blocks = [Resnet3DBlock(widths[j], widths[j + 1], groups) for j in range(num_res_blocks)]
            if i == len(mult) - 1:
                downsample = None
            elif i in config.down_sampling_layer:
                downsample = Downsample3D(ch * m)
            else:
                downsample = Downsample2D(ch * m)
            levels.append(EncoderLevel(blocks, downsample))
        self.down = nn.CellList(levels)
        block_in = ch * mult[-1]
        self.mid = MidBlock(block_in, groups)
        self.norm_out = FrameGroupNorm(groups, block_in)
        channels = config.patch_width(z_channels)
        out = 2 * z_channels if double_z else z_channels
        self.conv_patchify = ConvPixelUnshuffleDownSampleLayer3D(block_in, channels, kernel_size=3, factor=2)
        self.shortcut_pathify = PixelUnshuffleChannelAveragingDownSampleLayer3D(block_in, channels, 2)
        self.shortcut_out = PixelUnshuffleChannelAveragingDownSampleLayer3D(channels, out, 1)
        self.conv_out = CausalConv(channels, out, 3)

    def down_blocks(self, x: Tensor) -> Tensor:
        """(b, c_in, frames, H, W) -> mid-block input (b, C, t, H/8, W/8)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def head(self, h: Tensor) -> Tensor:
        """mid-block output (b, C, t, H/8, W/8) -> moments (b, T, 2*z, H/16, W/16)."""
        h = backend.silu(self.norm_out(h))
        h = self.conv_patchify(h) + self.shortcut_pathify(h)
        h = self.conv_out(h) + self.shortcut_out(h)
        return h.transpose(0, 2, 1, 3, 4).contiguous()

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.mid(self.down_blocks(x)))


class VideoDecoder(nn.Cell):
    """Latents (b, T, z, h, w) -> video (b, c_out, frames, 16h, 16w) for one chunk (frames = 8T - 7).

    Steps: `unpatchify` (conv_in and the 2x2x2 pixel shuffle, each with its channel-duplicating
    shortcut) -> `mid` -> `up_blocks` (resolution levels, top to bottom) -> `head` (norm,
    SiLU, conv_out, drop the first `temporal_downsample - 1` frames).
    """

    def __init__(self, z_channels: int = 64, out_channels: int = 3, num_res_blocks: int = 2,
                 config: VaeConfig = VaeConfig()):
        super().__init__()
        ch, mult, groups = config.decoder_ch, config.decoder_ch_mult, config.num_groups
        self.temporal_downsample = config.temporal_downsample
        block_in = ch * mult[-1]
        channels = config.patch_width(z_channels)
        self.conv_in = CausalConv(z_channels, channels, 3)
        self.shortcut_in = ChannelDuplicatingPixelUnshuffleUpSampleLayer3D(z_channels, channels, 1)
        self.conv_unpatchify = ConvPixelShuffleUpSampleLayer3D(channels, block_in, kernel_size=3, factor=2)
        self.shortcut_unpathify = ChannelDuplicatingPixelUnshuffleUpSampleLayer3D(channels, block_in, 2)
        self.mid = MidBlock(block_in, groups)
        levels = []
        for i, m in enumerate(mult):
            # Level i receives the output of level i + 1 (the top level: the mid block's width).
            widths = [ch * mult[min(i + 1, len(mult) - 1)]] + [ch * m] * (num_res_blocks + 1)
            blocks = [Resnet3DBlock(widths[j], widths[j + 1], groups) for j in range(num_res_blocks + 1)]
            if i == 0:
                upsample = None
            elif i in config.temporal_up_layers:
                upsample = Upsample3D(ch * m, groups)
            else:
                upsample = Upsample2D(ch * m)
            levels.append(DecoderLevel(blocks, upsample))
        self.up = nn.CellList(levels)
        self.norm_out = FrameGroupNorm(groups, ch * mult[0])
        self.conv_out = CausalConvAfterNorm(ch * mult[0], out_channels, 3)

    def unpatchify(self, z: Tensor) -> Tensor:
        """(b, T, z, h, w) -> mid-block input (b, C, 2T - 1, 2h, 2w)."""
        z = z.transpose(0, 2, 1, 3, 4).contiguous()
        h = self.conv_in(z) + self.shortcut_in(z)
        return self.conv_unpatchify(h) + self.shortcut_unpathify(h)

    def up_blocks(self, h: Tensor) -> Tensor:
        """mid-block output (b, C, t, h, w) -> (b, ch*mult[0], 4t, 8h, 8w), top level first."""
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return h

    def head(self, h: Tensor) -> Tensor:
        """(b, c, 4t, H, W) -> (b, c_out, 4t - (temporal_downsample - 1), H, W)."""
        h = self.conv_out(norm_silu_pad(self.norm_out, h, self.conv_out.time_pad))
        return h[:, :, self.temporal_downsample - 1:].contiguous()

    def construct(self, z: Tensor) -> Tensor:
        return self.head(self.up_blocks(self.mid(self.unpatchify(z))))


# --------------------------------------------------------------------------- posterior


class DiagonalGaussianDistribution:
    """Posterior from encoder moments (..., 2*z, h, w): mean = first z channels, log-variance the rest."""

    def __init__(self, parameters: Tensor):
        self.mean, logvar = ops.chunk(parameters, 2, axis=-3)
        self.logvar = ops.clamp(logvar, -30.0, 20.0)
        self.std = ops.exp(0.5 * self.logvar)
        self.var = ops.exp(self.logvar)

    def sample(self, generator: Union[np.random.Generator, int, None] = None,
               noise: Union[np.ndarray, Tensor, None] = None) -> Tensor:
        """mean + std * noise; noise given, or drawn as float32 standard normals from `generator` (or a seed)."""
        if noise is None:
            if generator is None:
                raise ValueError("DiagonalGaussianDistribution.sample: give a numpy generator, a seed or the noise "
                                 "(the draw must be reproducible across devices)")
            if not isinstance(generator, np.random.Generator):
                generator = np.random.default_rng(generator)
            noise = generator.standard_normal(tuple(self.mean.shape), dtype=np.float32)
        noise = noise if isinstance(noise, Tensor) else Tensor(np.asarray(noise, np.float32))
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected the latent shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.astype(self.mean.dtype)


# --------------------------------------------------------------------------- autoencoder


def _checkpoint_rename(key: str) -> str:
    """The published file stores the decoder's last conv as `decoder.conv_out.*` (the original remaps it too)."""
    prefix = "decoder.conv_out."
    return "decoder.conv_out.conv." + key[len(prefix):] if key.startswith(prefix) else key


class AutoencoderKL(nn.Cell):
    """The v2 video VAE: `encode` frames to latents, `decode` latents to frames, chunk by chunk.

    model_path: a `vae_v2.safetensors` file (or a folder holding one), loaded strictly with the
    original's single rename. config: widths and levels (default: the published VAE).
    """

    frame_len = 17  # frames per chunk
    latent_len = 3  # latents per chunk

    def __init__(self, in_channels: int = 3, out_channels: int = 3, z_channels: int = 64, num_res_blocks: int = 2,
                 model_path: Optional[Union[str, os.PathLike]] = None, version: int = 2,
                 config: Optional[VaeConfig] = None):
        super().__init__()
        if version != 2:
            raise NotImplementedError(f"AutoencoderKL version={version}: only version 2 (vae_v2.safetensors, the "
                                      "one the official pipeline uses) is implemented")
        self.config = config or VaeConfig()
        self.in_channels, self.out_channels, self.z_channels = in_channels, out_channels, z_channels
        self.encoder = VideoEncoder(in_channels, z_channels, num_res_blocks, config=self.config)
        self.decoder = VideoDecoder(z_channels, out_channels, num_res_blocks, config=self.config)
        if model_path is not None:
            load_weights(self, model_path, rename=_checkpoint_rename)
        self.set_train(False)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "AutoencoderKL":
        """`<folder>/vae_v2.safetensors`, with `<folder>/config.json` if present (the published folder has none).

        config.json may hold `VaeConfig` fields and in_channels / out_channels / z_channels / num_res_blocks.
        """
        folder = Path(folder)
        path = folder / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a VAE folder needs its {CHECKPOINT_FILE}")
        values = dict(read_config(folder)) if (folder / "config.json").is_file() else {}
        kwargs = {k: values.pop(k) for k in ("in_channels", "out_channels", "z_channels", "num_res_blocks",
                                             "version") if k in values}
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        return cls(model_path=path, config=VaeConfig.from_dict(values), **kwargs)

    @property
    def dtype(self) -> ms.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    # ------------------------------------------------------------------ encode

    def _check_video(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode: x must be (b, frames, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[3] % 16 or x.shape[4] % 16:
            raise ValueError(f"AutoencoderKL.encode: H and W must be multiples of 16, got {tuple(x.shape[3:])}")
        for frames in {min(self.frame_len, x.shape[1] - s) for s in range(0, x.shape[1], self.frame_len)}:
            t = frames
            for _ in range(2):  # the two temporal down-samplings: t -> ceil(t / 2)
                t = (t + 1) // 2
            if t % 2 == 0:
                raise ValueError(f"AutoencoderKL.encode: a chunk of {frames} frames cannot be encoded (chunks are "
                                 f"{self.frame_len} frames; a shorter last chunk needs ceil(frames/4) odd, "
                                 f"e.g. 1-4 or 9-12 frames)")

    def naive_encode(self, x: Tensor) -> Tensor:
        """One chunk: (b, frames, c, H, W) -> moments (b, T, 2*z, H/16, W/16)."""
        return self.encoder(x.astype(self.dtype).transpose(0, 2, 1, 3, 4).contiguous())

    def encode_moments(self, x: Union[Tensor, np.ndarray]) -> Tensor:
        """(b, frames, c, H, W) -> moments (b, T, 2*z, H/16, W/16), chunks of `frame_len` frames encoded alone."""
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x, np.float32))
        self._check_video(x)
        chunks = [self.naive_encode(x[:, s:s + self.frame_len]) for s in range(0, x.shape[1], self.frame_len)]
        return ops.cat(chunks, 1) if len(chunks) > 1 else chunks[0]

    def encode(self, x: Union[Tensor, np.ndarray], generator: Union[np.random.Generator, int, None] = None,
               noise: Union[np.ndarray, Tensor, None] = None, only_return_mean: bool = False) -> Tensor:
        """(b, frames, c, H, W) in [-1, 1] -> latents (b, T, z, H/16, W/16).

        The posterior sample mean + std * noise, with noise given or drawn from `generator`
        (a numpy Generator or a seed); `only_return_mean=True` returns the mean.
        """
        posterior = DiagonalGaussianDistribution(self.encode_moments(x))
        if only_return_mean:
            return posterior.mean
        return posterior.sample(generator=generator, noise=noise)

    # ------------------------------------------------------------------ decode

    def _check_latents(self, z: Tensor) -> None:
        check_latent_shape(z.shape, self.z_channels, "AutoencoderKL.decode: z")

    def decode_naive(self, z: Tensor) -> Tensor:
        """One chunk: (b, T, z, h, w) -> (b, c_out, 8T - 7, 16h, 16w)."""
        return self.decoder(z.astype(self.dtype))

    def decode_chunks(self, z: Union[Tensor, np.ndarray]) -> np.ndarray:
        """(b, T, z, h, w) -> float32 (b, frames, c_out, 16h, 16w): the decoded chunks side by side, not yet mixed.

        Each chunk is decoded alone and copied into one preallocated buffer, so at most one
        chunk's activations exist at a time.
        """
        z = z if isinstance(z, Tensor) else Tensor(np.asarray(z, np.float32))
        self._check_latents(z)
        b, latents, _, h, w = z.shape
        starts = range(0, latents, self.latent_len)
        frames = sum(8 * min(self.latent_len, latents - s) - 7 for s in starts)
        out = np.empty((b, frames, self.out_channels, 16 * h, 16 * w), np.float32)
        at = 0
        for s in starts:
            chunk = self.decode_naive(z[:, s:s + self.latent_len]).astype(ms.float32).asnumpy()  # (b, c, f, H, W)
            out[:, at:at + chunk.shape[2]] = chunk.transpose(0, 2, 1, 3, 4)
            at += chunk.shape[2]
            del chunk
        return out

    @classmethod
    def mix(cls, x: np.ndarray) -> np.ndarray:
        """Blend each chunk boundary in place, in the original's order, and return x (b, frames, ...).

        With front = frame 17k + 16 and back = frame 17k + 17: back = 0.6 back + 0.4 front,
        then front = 0.6 front + 0.4 back (the updated back).
        """
        remain, blend = 0.6, 1.0 - 0.6
        front = slice(cls.frame_len - 1, x.shape[1] - 1, cls.frame_len)
        back = slice(cls.frame_len, x.shape[1], cls.frame_len)
        x[:, back] = x[:, back] * np.float32(remain) + x[:, front] * np.float32(blend)
        x[:, front] = x[:, front] * np.float32(remain) + x[:, back] * np.float32(blend)
        return x

    def decode(self, z: Union[Tensor, np.ndarray]) -> Tensor:
        """Latents (b, T, z, h, w) -> video (b, frames, c_out, 16h, 16w), float32, unclamped.

        Chunks of 3 latents (-> 17 frames; the last may be shorter: n -> 8n - 7) are decoded
        independently and blended at each boundary (`mix`).
        """
        return Tensor.from_numpy(self.mix(self.decode_chunks(z)))

