"""The one place that knows which device we run on.

Everything device-specific lives here: the device and compute dtype, the runtime
switches, and the few kernels whose best (or only working) form differs between
Ascend and CPU. Model code calls these functions and the layers in
`stepvideo.layers`; it never branches on the device itself.

Choice (issue 2): the models call these functions directly instead of us
monkeypatching the missing `mint` kernels on CPU at start-up. Patching changes
the meaning of `mint.*` globally and silently (for mindone and for every other
library in the process), hides which kernel really runs, and breaks when a
MindSpore release renames the internals it patches. Calling a named function
keeps each choice visible and testable on its own.

Device choice: ``STEPVIDEO_DEVICE`` (``cpu`` | ``ascend``) or `init(device=...)`
wins; otherwise Ascend when MindSpore reports one, else CPU.

Kernel choices (facts in ../shared/notes/mindspore-cpu.md):
- attention: FlashAttentionScore on Ascend (bf16, BSND); exact softmax attention
  on CPU (no FA kernel there). An additive bias (Step-LLM's ALiBi) always takes
  the exact path so its order relative to the scale is unambiguous.
- GELU-tanh: on CPU the `tanh` kernel is off by 1e-4, so we use the identical
  `x * sigmoid(2c(x + 0.044715 x^3))` form (accurate and 8x faster there).
- RMSNorm: the fused `RmsNorm` kernel on Ascend; explicit fp32 math on CPU.
- LayerNorm, embedding lookup, conv, group norm, padding use classic `ops` that
  have kernels on both devices, so they need no branch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
from mindspore import Tensor, mint, ops

ASCEND = "Ascend"
CPU = "CPU"
_ENV_DEVICE = "STEPVIDEO_DEVICE"


@dataclass(frozen=True)
class BackendInfo:
    device: str  # ASCEND or CPU
    compute_dtype: ms.dtype  # bf16 on Ascend, fp32 on CPU


_info: Optional[BackendInfo] = None


def _detect_device() -> str:
    requested = os.environ.get(_ENV_DEVICE, "").strip().lower()
    if requested:
        if requested not in ("cpu", "ascend"):
            raise ValueError(f"{_ENV_DEVICE}={requested!r}: expected 'cpu' or 'ascend'")
        return ASCEND if requested == "ascend" else CPU
    try:
        if ms.hal.is_available("Ascend") and ms.hal.device_count("Ascend") > 0:
            return ASCEND
    except Exception:  # MindSpore builds without the Ascend plugin raise here
        pass
    return CPU


def init(device: Optional[str] = None, device_id: Optional[int] = None) -> BackendInfo:
    """Select the device once per process; later calls return the same choice.

    `device` is "cpu"/"ascend" (any case); None means env var, then auto-detect.
    """
    global _info
    if device is not None:
        wanted = ASCEND if device.strip().lower() == "ascend" else CPU
        if device.strip().lower() not in ("cpu", "ascend"):
            raise ValueError(f"device={device!r}: expected 'cpu' or 'ascend'")
    else:
        wanted = None
    if _info is not None:
        if wanted is not None and wanted != _info.device:
            raise RuntimeError(f"backend already initialised for {_info.device}; cannot switch to {wanted}")
        return _info
    dev = wanted or _detect_device()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        if device_id is not None:
            ms.set_device(dev, device_id)
        else:
            ms.set_device(dev)
    except RuntimeError:
        # Something already ran a kernel (which fixes the device). That is fine if it is ours.
        current = ms.get_context("device_target")
        if current != dev:
            raise RuntimeError(f"MindSpore already runs on {current}; cannot switch to {dev}. Call "
                               "stepvideo.backend.init() before any tensor operation.") from None
    if dev == CPU:
        # Synchronous pynative on CPU: errors point at the failing op, and the
        # runtime threads stop competing with compute threads (1.6-9x faster).
        ms.runtime.launch_blocking()
    _info = BackendInfo(device=dev, compute_dtype=ms.bfloat16 if dev == ASCEND else ms.float32)
    return _info


def info() -> BackendInfo:
    return _info if _info is not None else init()


def device() -> str:
    return info().device


def compute_dtype() -> ms.dtype:
    return info().compute_dtype


def on_ascend() -> bool:
    return info().device == ASCEND


# --------------------------------------------------------------------------- kernels


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (torch `approximate="tanh"`)."""
    if on_ascend():
        return ops.gelu(x, approximate="tanh")
    # 0.5 * (1 + tanh(u)) == sigmoid(2u), with u = sqrt(2/pi) * (x + 0.044715 x^3);
    # 2u is written as x * (c + c * 0.044715 * x^2): six passes over x instead of seven.
    c = math.sqrt(8.0 / math.pi)
    return x * ops.sigmoid(x * (c + (c * 0.044715) * (x * x)))


def silu(x: Tensor) -> Tensor:
    return ops.silu(x)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis; weight/bias of shape (c,) (ones/zeros when no affine)."""
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)(x, weight, bias)[0]


def modulated_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, scale: Tensor,
                         shift: Tensor) -> Tensor:
    """layer_norm(x, weight, bias) * (1 + scale) + shift (adaLN); scale/shift broadcast to x, e.g. (b, 1, c).

    weight and bias None: a LayerNorm without affine (the DiT's output norm).

    On CPU the LayerNorm kernel runs on one thread (11.5 ms for 2048 x 1024 fp32); there the
    mean and the (centred, two-pass) variance are matrix-vector products and the affine is
    folded into the modulation: 6 ms for norm + modulation instead of 15.
    """
    if on_ascend():
        if weight is None:
            weight, bias = ops.ones(x.shape[-1:], x.dtype), ops.zeros(x.shape[-1:], x.dtype)
        return layer_norm(x, weight, bias, eps) * (1 + scale) + shift
    c = x.shape[-1]
    average = ops.full((c, 1), 1.0 / c, dtype=x.dtype)
    rows = x.reshape(-1, c)
    centred = rows - ops.matmul(rows, average)
    normed = centred * ops.rsqrt(ops.matmul(centred * centred, average) + eps)
    gain = 1 + scale if weight is None else weight * (1 + scale)
    offset = shift if bias is None else bias * (1 + scale) + shift
    return normed.reshape(x.shape) * gain + offset


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps), computed in fp32, cast back, then scaled by `weight`.

    This is the reference's order: normalise in fp32, cast to the input dtype,
    multiply by the weight in that dtype.
    """
    if on_ascend() and weight is not None and x.dtype == weight.dtype:
        return ops.rms_norm(x, weight, eps)[0]
    xf = _as_fp32(x)
    d = x.shape[-1]
    # mean(x^2) as a matrix-vector product: several times faster than ReduceMean on CPU.
    mean_square = ops.matmul((xf * xf).reshape(-1, d), ops.full((d, 1), 1.0 / d, dtype=ms.float32))
    out = xf * ops.rsqrt(mean_square.reshape(x.shape[:-1] + (1,)) + eps)
    out = out if x.dtype == ms.float32 else out.astype(x.dtype)
    return out * weight if weight is not None else out


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids] for integer ids of any shape -> ids.shape + (dim,)."""
    return ops.gather(table, ids, 0)


def group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm over (b, c, *spatial) with per-channel affine."""
    return ops.group_norm(x, num_groups, weight, bias, eps)


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None, causal: bool = False,
              bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Softmax attention in the reference's (b, s, heads, d) layout.

    q: (b, s_q, h, d); k, v: (b, s_k, h, d) -> (b, s_q, h, d).
    mask: bool, True = attend; 3-D masks broadcast to (b, s_q, s_k) (e.g. (b, 1, s_k)
        for one mask per row), 4-D masks to (b, h, s_q, s_k).
    causal: query i sees keys j <= i (s_q == s_k).
    bias: additive float, broadcastable to (b, h, s_q, s_k), added after the scale.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if on_ascend() and bias is None and q.dtype in (ms.bfloat16, ms.float16):
        return _flash_attention(q, k, v, mask, causal, scale)
    return _exact_attention(q, k, v, mask, causal, bias, scale)


def _exact_attention(q, k, v, mask, causal, bias, scale):
    dtype = q.dtype
    # The scale goes onto q (s_q x d values) rather than onto the scores (s_q x s_k).
    qh = (_as_fp32(q) * scale).transpose(0, 2, 1, 3)  # (b, h, s_q, d)
    kh = _as_fp32(k).transpose(0, 2, 1, 3)  # (b, h, s_k, d)
    vh = _as_fp32(v).transpose(0, 2, 1, 3)  # (b, h, s_k, d)
    scores = _matmul_nt(qh, kh)  # (b, h, s_q, s_k)
    if bias is not None:
        scores = scores + bias.astype(ms.float32)
    keep = None
    if mask is not None:
        keep = mask if mask.ndim == 4 else mask.expand_dims(1)
    if causal:
        s_q, s_k = scores.shape[-2], scores.shape[-1]
        tri = ops.tril(ops.ones((s_q, s_k), ms.bool_))
        keep = tri if keep is None else ops.logical_and(keep, tri)
    if keep is not None:
        scores = ops.masked_fill(scores, ops.logical_not(keep), float("-inf"))
    probs = mint.softmax(scores, dim=-1)
    out = ops.matmul(probs, vh)  # (b, h, s_q, d)
    out = out.transpose(0, 2, 1, 3)
    return out if dtype == ms.float32 else out.astype(dtype)


_matmul_nt = ops.BatchMatMul(transpose_b=True)  # a @ b^T without materialising b^T


def _as_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def _flash_attention(q, k, v, mask, causal, scale):
    heads = q.shape[2]
    drop = None
    if mask is not None:
        # FlashAttentionScore masks where the flag is True (discard), the opposite of ours.
        keep = mask if mask.ndim == 4 else mask.expand_dims(1)
        keep = keep.broadcast_to((q.shape[0], keep.shape[1], q.shape[1], k.shape[1]))
        drop = ops.logical_not(keep)
    if causal:
        s = q.shape[1]
        tri_drop = ops.triu(ops.ones((s, s), ms.bool_), 1)
        drop = tri_drop if drop is None else ops.logical_or(drop, tri_drop)
    return ops.flash_attention_score(q, k, v, heads, attn_mask=drop, scalar_value=scale,
                                     input_layout="BSND")


# --------------------------------------------------------------------------- weight streaming


def weight_copy_stream():
    """The stream that copies streamed block weights host -> device (`stepvideo/streaming.py`).

    Ascend: a separate `mindspore.runtime.Stream`, so the next block's copy overlaps this
    block's compute (untested here: no NPU). CPU: None, the parameters live in host memory
    and a "copy" is a write into their buffers.
    """
    return ms.runtime.Stream() if on_ascend() else None
