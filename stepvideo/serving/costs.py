"""What a request will cost in memory, computed from its shape before any work is done.

    vae = VaeCost.from_config(config, z_channels=64, itemsize=2, weights_bytes=..., exact_attention=False)
    estimate = vae.decode((1, 36, 64, 34, 62))      # Estimate(what, bytes, parts)
    check_budget(estimate, limit_bytes)              # raises OverBudget naming the estimate and the limit

The services refuse a request whose estimate exceeds `--max_memory_gb` before it reaches
the model (stepvideo/serving/server.py). The arithmetic follows docs/vae_memory.md: the VAE
decodes chunk by chunk, so a decode holds the weights, one chunk's largest set of live
activations, and the float32 output; the caption models hold their weights and one
forward pass of activations for all prompts at once. Each estimate names its parts, so an
error message can say where the bytes go. Pure Python on shapes and config numbers: no
MindSpore, nothing allocated.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

GB = 10**9


@dataclass(frozen=True)
class Estimate:
    """`bytes` a piece of work will hold at its peak; `parts` name -> bytes (they sum to `bytes`)."""

    what: str
    parts: Dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.parts.items())
        return f"{self.what} needs about {self.bytes / GB:.2f} GB ({parts})"


class OverBudget(ValueError):
    """An estimate exceeds the memory limit; the message names both."""

    def __init__(self, estimate: Estimate, limit_bytes: int):
        self.estimate, self.limit_bytes = estimate, limit_bytes
        super().__init__(f"{estimate.describe()}, more than this service's limit of {limit_bytes / GB:.2f} GB "
                         "(server option --max_memory_gb)")


def check_budget(estimate: Estimate, limit_bytes: int) -> None:
    """Raise OverBudget if `estimate` needs more than `limit_bytes`."""
    if estimate.bytes > limit_bytes:
        raise OverBudget(estimate, limit_bytes)


# --------------------------------------------------------------------------- VAE


def _resnet_peak(size, c_in: int, c_out: int, t: int) -> int:
    """Live bytes at the worst step of a Resnet3DBlock (c_in -> c_out) over t frames.

    size(c, t): bytes of a (b, c, t, H, W) activation. Steps, as in docs/vae_memory.md: the
    per-frame GroupNorm (x, its transposed copy, the norm output), SiLU and the two causal zero
    frames (x, silu, padded), conv1, norm2/SiLU/pad, conv2 with the shortcut; x stays alive
    throughout for the shortcut.
    """
    return max(3 * size(c_in, t),
               2 * size(c_in, t) + size(c_in, t + 2),
               size(c_in, t) + size(c_in, t + 2) + size(c_out, t),
               size(c_in, t) + 2 * size(c_out, t) + size(c_out, t + 2),
               size(c_in, t) + 3 * size(c_out, t))


@dataclass(frozen=True)
class VaeCost:
    """Memory of `AutoencoderKL.decode` (stepvideo/vae/vae.py) from the latents' shape.

    decoder_ch, decoder_ch_mult, temporal_up_layers, patch_channels: the VaeConfig numbers;
    itemsize: bytes per activation value (4 fp32 on CPU, 2 bf16 on Ascend); weights_bytes: the
    loaded VAE; on_cpu: the CPU kernels (exact attention that materialises (n x n) float32
    scores instead of flash attention; convolution workspaces and MindSpore's memory pool).

    On CPU two terms are fitted to measurements of the tiny VAE (docs/vae_memory.md, "Request
    cost"): the attention holds about 6 score-sized float32 buffers, and convolution
    workspaces plus the pool add about 6000 + 500 * t bytes per full-resolution pixel of a
    chunk (t: its frames at full resolution). The estimate was 1.1-1.8x the measured peak
    growth for every shape measured, never below it.
    """

    decoder_ch: int
    decoder_ch_mult: Tuple[int, ...]
    temporal_up_layers: Tuple[int, ...]
    patch_channels: int
    z_channels: int
    itemsize: int
    weights_bytes: int
    on_cpu: bool

    # CPU terms, fitted (see the class docstring).
    CPU_SCORE_BUFFERS = 6
    CPU_WORKSPACE_PER_PIXEL = 6000
    CPU_WORKSPACE_PER_PIXEL_FRAME = 500

    @classmethod
    def from_config(cls, config, *, z_channels: int, itemsize: int, weights_bytes: int,
                    on_cpu: bool) -> "VaeCost":
        """From a `stepvideo.vae.vae.VaeConfig`."""
        return cls(config.decoder_ch, tuple(config.decoder_ch_mult), tuple(config.temporal_up_layers),
                   config.patch_width(z_channels), z_channels, itemsize, weights_bytes, on_cpu)

    def chunk_peak(self, b: int, t_latent: int, h: int, w: int) -> Tuple[int, int]:
        """(activation bytes, CPU workspace bytes) at the peak of decoding one chunk of `t_latent` (<= 3) latents."""
        q, ch, mult = self.itemsize, self.decoder_ch, self.decoder_ch_mult
        top = ch * mult[-1]
        # unpatchify: conv_in and its shortcut at the latent size, then the 2x2x2 pixel shuffle
        # to (top, 2T-1, 2h, 2w) with its channel-duplicating shortcut.
        latent = b * t_latent * h * w * q
        peaks = [latent * (self.z_channels + 2 * self.patch_channels + 4 * 8 * top)]
        t, hh, ww = 2 * t_latent - 1, 2 * h, 2 * w

        def size(c: int, frames: int) -> int:
            return b * c * frames * hh * ww * q

        # mid block: two resnet blocks and the attention over all n = t*h*w positions
        # (x, normed, q, k, v, their token copies, the output; exact attention adds its scores,
        # the masked scores and the softmax in float32).
        n = t * hh * ww
        peaks.append(_resnet_peak(size, top, top, t))
        peaks.append(8 * size(top, t) + (self.CPU_SCORE_BUFFERS * b * n * n * 4 if self.on_cpu else 0))
        c_in = top
        for level in reversed(range(len(mult))):
            c = ch * mult[level]
            for _ in range(3):  # num_res_blocks + 1 resnet blocks per level
                peaks.append(_resnet_peak(size, c_in, c, t))
                c_in = c
            if level == 0:
                break
            before = size(c, t)
            if level in self.temporal_up_layers:  # Upsample3D: nearest x2 in t, h, w, then a residual block
                t, hh, ww = 2 * t, 2 * hh, 2 * ww
                peaks.append(before + 4 * size(c, t))
            else:  # Upsample2D: nearest x2 in h, w, then a conv
                hh, ww = 2 * hh, 2 * ww
                peaks.append(before + 2 * size(c, t))
        # head: norm_out, SiLU, causal pad, conv_out to 3 channels
        peaks.append(2 * size(c_in, t) + size(c_in, t + 2) + size(3, t))
        workspace = b * hh * ww * (self.CPU_WORKSPACE_PER_PIXEL + self.CPU_WORKSPACE_PER_PIXEL_FRAME * t) \
            if self.on_cpu else 0
        return max(peaks), workspace

    def decode(self, shape: Sequence[int]) -> Estimate:
        """latents (b, T, z, h, w) -> the estimate of decoding them."""
        b, t_total, _, h, w = (int(d) for d in shape)
        frames = sum(8 * min(3, t_total - s) - 7 for s in range(0, t_total, 3))
        chunk_frames = 8 * min(3, t_total) - 7
        pixel = 3 * 16 * h * 16 * w * 4  # float32 values of one output frame (per video)
        activations, workspace = self.chunk_peak(b, min(3, t_total), h, w)
        parts = {"weights": self.weights_bytes, "activations of one chunk": activations}
        if workspace:
            parts["CPU workspaces"] = workspace
        parts["chunk copies"] = 2 * b * chunk_frames * pixel  # a chunk cast to float32, then transposed in
        parts["output"] = b * frames * pixel
        return Estimate(f"decoding latents of shape {tuple(int(d) for d in shape)}", parts)


    def encode(self, shape: Sequence[int]) -> Estimate:
        """videos (b, frames, 3, H, W) -> the estimate of encoding them (TI2V's first image: frames = 1).

        The encoder mirrors the decoder (same widths, the same resolutions in reverse, chunks of
        up to 17 frames), so one chunk's peak is taken to be the decoder's for the latents it
        makes; the input video is float32 and the latents are small beside it.
        """
        b, frames, _, height, width = (int(d) for d in shape)
        h, w = height // 16, width // 16
        t_latent = 1 if frames == 1 else 3  # one image -> one latent; a chunk of 17 frames -> 3
        activations, workspace = self.chunk_peak(b, t_latent, h, w)
        parts = {"weights": self.weights_bytes, "activations of one chunk": activations}
        if workspace:
            parts["CPU workspaces"] = workspace
        parts["input"] = b * frames * 3 * height * width * 4
        return Estimate(f"encoding videos of shape {tuple(int(d) for d in shape)}", parts)


# --------------------------------------------------------------------------- caption


@dataclass(frozen=True)
class CaptionCost:
    """Memory of one caption request: Step-LLM over 320 tokens and CLIP over 77, per prompt.

    Per layer the live activations are a few hidden-size rows per token, the feed-forward's
    rows, and the attention scores (heads x L x L float32: scores, masked, softmax); the
    outputs are float32.
    """

    llm_hidden: int
    llm_ffn: int
    llm_heads: int
    clip_hidden: int
    clip_ffn: int
    clip_heads: int
    itemsize: int
    weights_bytes: int
    llm_length: int = 320
    clip_length: int = 77

    @classmethod
    def from_model_dir(cls, model_dir, *, itemsize: int, weights_bytes: int) -> "CaptionCost":
        """From `step_llm/config.json` and `hunyuan_clip/clip_text_encoder/config.json`."""
        with open(os.path.join(model_dir, "step_llm", "config.json"), encoding="utf-8") as f:
            llm = json.load(f)
        with open(os.path.join(model_dir, "hunyuan_clip", "clip_text_encoder", "config.json"), encoding="utf-8") as f:
            clip = json.load(f)
        return cls(llm["hidden_size"], llm["ffn_hidden_size"], llm["num_attention_heads"], clip["hidden_size"],
                   clip["intermediate_size"], clip["num_attention_heads"], itemsize, weights_bytes)

    def encode(self, prompts: int) -> Estimate:
        b, q = prompts, self.itemsize
        llm = b * self.llm_length * (6 * self.llm_hidden + 4 * self.llm_ffn) * q \
            + 3 * b * self.llm_heads * self.llm_length ** 2 * 4
        clip = b * self.clip_length * (6 * self.clip_hidden + 2 * self.clip_ffn) * 4 \
            + 3 * b * self.clip_heads * self.clip_length ** 2 * 4
        outputs = b * (self.llm_length * self.llm_hidden * 4 + (self.clip_length + self.llm_length) * 8
                       + self.clip_length * self.clip_hidden * 4)
        return Estimate(f"encoding {prompts} prompt(s)", {
            "weights": self.weights_bytes, "activations": max(llm, clip), "outputs": outputs})


def physical_memory_bytes() -> int:
    """RAM of this machine (for a CPU service's default budget)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit_gb(device: str) -> float:
    """24 GB on an accelerator (the decode target of docs/vae_memory.md); on CPU an eighth of the
    machine's RAM, at most 24 GB: a CPU service (demos, development) shares its host with everything
    else, and no real video decodes on CPU anyway (docs/vae_memory.md)."""
    if device.lower() == "cpu":
        return min(24.0, math.floor(physical_memory_bytes() / 8 / GB * 10) / 10)
    return 24.0
