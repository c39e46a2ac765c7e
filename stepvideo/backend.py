"""The one place that knows which device we run on: the device, the compute dtype and the kernel table.

Model code calls the functions below (`attention`, `gelu_tanh`, `rms_norm`,
`modulated_layer_norm`, ...) and the layers in `stepvideo.layers`; it never
branches on the device. The functions whose best (or only working) form differs
between devices dispatch through the active `Kernels` table:

    backend.init()                          # picks the device, then its table from KERNEL_TABLES
    backend.attention(q, k, v, mask=keep)   # runs kernels().attention

Tables: `cpu_kernels()` (exact fp32 forms) and `ascend_kernels(device_ops)`
(FlashAttentionScore, the fused RmsNorm, the Ascend GELU, native collectives).
`device_ops` is where the Ascend-only MindSpore calls come from (`mindspore.ops`
by default); anything with the same functions and documented semantics can
stand in for it, which is how the Ascend table runs on a CPU:

    previous = backend.install(backend.ascend_kernels(my_ops, compute_dtype=ms.float32))
    ...
    backend.install(previous)

Install a table before building and compiling models: layers take their dtype
from the table when they are built, and a compiled graph keeps the kernels it
was compiled with.

Device choice: ``STEPVIDEO_DEVICE`` (``cpu`` | ``ascend``) or `init(device=...)`
wins; otherwise Ascend when MindSpore reports one, else CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import mindspore as ms
from mindspore import Tensor, mint, ops

ASCEND = "Ascend"
CPU = "CPU"
_ENV_DEVICE = "STEPVIDEO_DEVICE"


@dataclass(frozen=True)
class Kernels:
    """One device's kernel table. Every kernel takes and returns tensors in the caller's dtype.

    attention(q, k, v, mask, causal, bias, scale): see `backend.attention` (scale already resolved).
    gelu_tanh(x), rms_norm(x, weight, eps), modulated_layer_norm(x, weight, bias, eps, scale, shift):
        see the functions of the same name below.
    native_collectives: True = the distributed DiT uses the device's all-to-all and send/recv
        through `comm`; False = the emulations built from all-gather and broadcast.
    comm: the communication module (`mindspore.mint.distributed`, or an object with its API).
    """

    name: str
    compute_dtype: ms.dtype
    attention: Callable[..., Tensor]
    gelu_tanh: Callable[[Tensor], Tensor]
    rms_norm: Callable[[Tensor, Optional[Tensor], float], Tensor]
    modulated_layer_norm: Callable[..., Tensor]
    native_collectives: bool
    comm: Any


@dataclass(frozen=True)
class BackendInfo:
    device: str  # ASCEND or CPU
    compute_dtype: ms.dtype  # of the active kernel table: bf16 on Ascend, fp32 on CPU
    kernels: str  # name of the active kernel table


_device: Optional[str] = None
_table: Optional[Kernels] = None


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


# CANN's SoC names (aclrtGetSocName, which `mindspore.hal.get_device_name` returns on Ascend). The Ascend
# table needs bf16 compute and FlashAttentionScore: Atlas A2 (Ascend910B1..B4, B2C, B4-1) and Atlas A3
# (Ascend910_93xx). The first-generation 910 (Ascend910A/B/ProA/ProB/PremiumA; note "Ascend910B"
# without a digit is one of them) has neither.
SUPPORTED_SOC = re.compile(r"Ascend910B\d|Ascend910_93\d\d")
FIRST_GENERATION_910 = ("Ascend910A", "Ascend910B", "Ascend910ProA", "Ascend910ProB", "Ascend910PremiumA")


def check_ascend_soc(soc_name: str, device_id: int = 0) -> str:
    """Refuse an NPU the Ascend table cannot run on; returns `soc_name` when it is an Atlas A2/A3 NPU.

    `soc_name`: what `mindspore.hal.get_device_name(device_id, "Ascend")` reports, e.g. "Ascend910B2".
    """
    if SUPPORTED_SOC.match(soc_name):
        return soc_name
    if soc_name in FIRST_GENERATION_910:
        why = ("a first-generation Ascend 910, which has no bf16 compute and no FlashAttentionScore "
               "(the DiT and Step-LLM run in bf16, their attention with FlashAttentionScore)")
    else:
        why = "not an Ascend NPU with bf16 compute and FlashAttentionScore"
    raise RuntimeError(f"Ascend device {device_id} is {soc_name!r}: {why}. Step-Video needs an Atlas A2/A3 "
                       "training NPU (Ascend910B1-B4 or Ascend910_93xx, as reported by "
                       "mindspore.hal.get_device_name); on other machines run on the CPU (STEPVIDEO_DEVICE=cpu).")


def init(device: Optional[str] = None, device_id: Optional[int] = None) -> BackendInfo:
    """Select the device and its kernel table once per process; later calls return the same choice.

    `device` is "cpu"/"ascend" (any case); None means env var, then auto-detect.
    """
    global _device, _table
    wanted = None
    if device is not None:
        if device.strip().lower() not in ("cpu", "ascend"):
            raise ValueError(f"device={device!r}: expected 'cpu' or 'ascend'")
        wanted = ASCEND if device.strip().lower() == "ascend" else CPU
    if _device is not None:
        if wanted is not None and wanted != _device:
            raise RuntimeError(f"backend already initialised for {_device}; cannot switch to {wanted}")
        return info()
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
    if dev == ASCEND:
        check_ascend_soc(ms.hal.get_device_name(device_id or 0, ASCEND), device_id or 0)
    if dev == CPU:
        # Synchronous pynative on CPU: errors point at the failing op, and the
        # runtime threads stop competing with compute threads (1.6-9x faster).
        ms.runtime.launch_blocking()
    _device = dev
    if _table is None:
        _table = KERNEL_TABLES[dev]()
    return info()


def info() -> BackendInfo:
    if _device is None:
        init()
    return BackendInfo(device=_device, compute_dtype=_table.compute_dtype, kernels=_table.name)


def device() -> str:
    return info().device


def compute_dtype() -> ms.dtype:
    return kernels().compute_dtype


def on_ascend() -> bool:
    """The process runs on an Ascend NPU (for device resources such as streams; kernels come from the table)."""
    return device() == ASCEND


def kernels() -> Kernels:
    """The active kernel table (initialising the backend on first use)."""
    if _table is None:
        init()
    return _table


def install(table: Kernels) -> Kernels:
    """Make `table` the active kernel table; returns the one it replaces (to install it back)."""
    global _table
    if not isinstance(table, Kernels):
        raise TypeError(f"install: expected a backend.Kernels table, got {type(table).__name__}")
    previous = kernels()
    _table = table
    return previous


@contextlib.contextmanager
def using(table: Kernels) -> Iterator[Kernels]:
    """`with backend.using(table):` runs the block with `table` installed, then restores the previous one."""
    previous = install(table)
    try:
        yield table
    finally:
        install(previous)


# --------------------------------------------------------------------------- dispatch


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None, causal: bool = False,
              bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Softmax attention in the (b, s, heads, d) layout; every attention in the models comes here.

    q: (b, s_q, h, d); k, v: (b, s_k, h, d) -> (b, s_q, h, d) in q's dtype; softmax in fp32.
    mask: bool, True = attend; 3-D masks broadcast to (b, s_q, s_k) (e.g. (b, 1, s_k)
        for one mask per row), 4-D masks to (b, h, s_q, s_k).
    causal: query i sees keys j <= i (s_q == s_k).
    bias: additive float, broadcastable to (b, h, s_q, s_k), added after the scale.
    scale: multiplies q.k; default 1/sqrt(d).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return kernels().attention(q, k, v, mask, causal, bias, scale)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (torch `approximate="tanh"`)."""
    return kernels().gelu_tanh(x)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in fp32, cast back to x's dtype,
    then scaled by `weight` (shape (c,), or None for no affine) in that dtype."""
    return kernels().rms_norm(x, weight, eps)


def modulated_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, scale: Tensor,
                         shift: Tensor) -> Tensor:
    """layer_norm(x, weight, bias) * (1 + scale) + shift (adaLN); scale/shift broadcast to x, e.g. (b, 1, c).

    weight and bias None: a LayerNorm without affine (the DiT's output norm).
    """
    return kernels().modulated_layer_norm(x, weight, bias, eps, scale, shift)


# --------------------------------------------------------------------------- kernels with one form


def silu(x: Tensor) -> Tensor:
    return ops.silu(x)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis; weight/bias of shape (c,) (ones/zeros when no affine)."""
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)(x, weight, bias)[0]


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids] for integer ids of any shape -> ids.shape + (dim,)."""
    return ops.gather(table, ids, 0)


def group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm over (b, c, *spatial) with per-channel affine."""
    return ops.group_norm(x, num_groups, weight, bias, eps)


# --------------------------------------------------------------------------- exact (CPU) kernels


def exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, bias: Optional[Tensor],
                    scale: float) -> Tensor:
    """`attention` as fp32 matrix products and a softmax (every dtype, every mask form)."""
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


def gelu_tanh_sigmoid(x: Tensor) -> Tensor:
    """GELU-tanh as x * sigmoid(2u): the CPU `tanh` kernel is off by 1e-4; this form is exact and faster."""
    # 0.5 * (1 + tanh(u)) == sigmoid(2u), with u = sqrt(2/pi) * (x + 0.044715 x^3);
    # 2u is written as x * (c + c * 0.044715 * x^2): six passes over x instead of seven.
    c = math.sqrt(8.0 / math.pi)
    return x * ops.sigmoid(x * (c + (c * 0.044715) * (x * x)))


def rms_norm_fp32(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """`rms_norm` as explicit fp32 math, the mean square as a matrix-vector product (faster than
    ReduceMean on CPU)."""
    xf = _as_fp32(x)
    d = x.shape[-1]
    mean_square = ops.matmul((xf * xf).reshape(-1, d), ops.full((d, 1), 1.0 / d, dtype=ms.float32))
    out = xf * ops.rsqrt(mean_square.reshape(x.shape[:-1] + (1,)) + eps)
    out = out if x.dtype == ms.float32 else out.astype(x.dtype)
    return out * weight if weight is not None else out


def modulated_layer_norm_matvec(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                                scale: Tensor, shift: Tensor) -> Tensor:
    """`modulated_layer_norm` with the mean and the (centred, two-pass) variance as matrix-vector
    products and the affine folded into the modulation: the CPU LayerNorm kernel runs on one thread."""
    c = x.shape[-1]
    average = ops.full((c, 1), 1.0 / c, dtype=x.dtype)
    rows = x.reshape(-1, c)
    centred = rows - ops.matmul(rows, average)
    normed = centred * ops.rsqrt(ops.matmul(centred * centred, average) + eps)
    gain = 1 + scale if weight is None else weight * (1 + scale)
    offset = shift if bias is None else bias * (1 + scale) + shift
    return normed.reshape(x.shape) * gain + offset


def cpu_kernels() -> Kernels:
    from mindspore.mint import distributed

    return Kernels(name="cpu", compute_dtype=ms.float32, attention=exact_attention, gelu_tanh=gelu_tanh_sigmoid,
                   rms_norm=rms_norm_fp32, modulated_layer_norm=modulated_layer_norm_matvec,
                   native_collectives=False, comm=distributed)


# --------------------------------------------------------------------------- Ascend kernels


def ascend_kernels(device_ops: Any = ops, comm: Any = None, compute_dtype: ms.dtype = ms.bfloat16,
                   name: str = "ascend") -> Kernels:
    """The Ascend table: its device-only calls go to `device_ops` and `comm`.

    device_ops: provides `flash_attention_score`, `rms_norm` and `gelu` with the signatures and
        semantics of `mindspore.ops` 2.7 (the default).
    comm: provides `mindspore.mint.distributed`'s API, all_to_all / send / recv included (the default).
    """
    if comm is None:
        from mindspore.mint import distributed as comm

    def flash_or_exact_attention(q, k, v, mask, causal, bias, scale):
        # FlashAttentionScore takes fp16/bf16 only and has no additive-bias input that we use:
        # an fp32 call or Step-LLM's ALiBi bias takes the exact path.
        if bias is None and q.dtype in (ms.bfloat16, ms.float16):
            return _flash_attention(device_ops, q, k, v, mask, causal, scale)
        return exact_attention(q, k, v, mask, causal, bias, scale)

    def gelu_tanh_fused(x):
        return device_ops.gelu(x, approximate="tanh")

    def rms_norm_fused(x, weight, eps):
        # The fused kernel normalises and scales in one pass; it needs a weight of x's dtype.
        if weight is not None and x.dtype == weight.dtype:
            return device_ops.rms_norm(x, weight, eps)[0]
        return rms_norm_fp32(x, weight, eps)

    return Kernels(name=name, compute_dtype=compute_dtype, attention=flash_or_exact_attention,
                   gelu_tanh=gelu_tanh_fused, rms_norm=rms_norm_fused, modulated_layer_norm=modulated_layer_norm_fused,
                   native_collectives=True, comm=comm)


# FlashAttentionScore's compressed causal mask (sparse_mode 2, 3, 4 take it instead of an (S1, S2) mask).
CAUSAL_MASK_SIZE = 2048


def _flash_attention(device_ops, q, k, v, mask, causal, scale):
    """FlashAttentionScore in the BSND layout; its mask flags the positions to discard (True = drop)."""
    heads = q.shape[2]
    if causal and mask is None:
        # sparse_mode 2 (leftUpCausal: query i keeps keys j <= i) with the fixed 2048 x 2048 mask: the VAE's
        # 42,160 positions at 544 x 992 would otherwise need a 1.8 GB (S, S) mask (docs/ascend.md).
        compressed = ops.triu(ops.ones((CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE), ms.bool_), 1)
        return device_ops.flash_attention_score(q, k, v, heads, attn_mask=compressed, scalar_value=scale,
                                                input_layout="BSND", sparse_mode=2)
    drop = None
    if mask is not None:
        keep = mask if mask.ndim == 4 else mask.expand_dims(1)
        keep = keep.broadcast_to((q.shape[0], keep.shape[1], q.shape[1], k.shape[1]))
        drop = ops.logical_not(keep)
    if causal:
        s = q.shape[1]
        tri_drop = ops.triu(ops.ones((s, s), ms.bool_), 1)
        drop = tri_drop if drop is None else ops.logical_or(drop, tri_drop)
    return device_ops.flash_attention_score(q, k, v, heads, attn_mask=drop, scalar_value=scale, input_layout="BSND")


def modulated_layer_norm_fused(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                               scale: Tensor, shift: Tensor) -> Tensor:
    """`modulated_layer_norm` with the device's LayerNorm kernel (ones/zeros when no affine)."""
    if weight is None:
        weight, bias = ops.ones(x.shape[-1:], x.dtype), ops.zeros(x.shape[-1:], x.dtype)
    return layer_norm(x, weight, bias, eps) * (1 + scale) + shift


KERNEL_TABLES = {CPU: cpu_kernels, ASCEND: ascend_kernels}  # device -> the factory of its default table


# --------------------------------------------------------------------------- weight streaming


def weight_copy_stream():
    """The stream that copies streamed block weights host -> device (`stepvideo/streaming.py`).

    Ascend: a separate `mindspore.runtime.Stream`, so the next block's copy overlaps this
    block's compute (untested here: no NPU). CPU: None, the parameters live in host memory
    and a "copy" is a write into their buffers.
    """
    return ms.runtime.Stream() if on_ascend() else None
