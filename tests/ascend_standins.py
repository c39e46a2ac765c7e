"""Stand-ins for the Ascend-only MindSpore calls, so that the Ascend kernel table runs on a CPU.

Each stand-in is written from MindSpore 2.7's documentation of the call it replaces (docstring
of the installed `mindspore.ops.flash_attention_score`, `ops.rms_norm`, `ops.gelu`,
`mindspore.mint.distributed.all_to_all` / `send` / `recv`): same argument names and defaults,
same layouts, same mask polarity (True = discard), same return values and the documented errors
for inputs the real call rejects. Features the port does not use (dropout, pse, prefix,
variable-length TND, sparse modes) raise NotImplementedError instead of being guessed.
Arithmetic runs in float32 (the CPU has no bf16 arithmetic kernels); results are cast back to the
input dtype, as the fused kernels return them.

    table = ascend_table()                 # backend.ascend_kernels(this module, StandinComm())
    with backend.using(table): ...         # the Ascend branches of backend run on the CPU

The golden tests take the fixture `kernel_table` (`from ascend_standins import kernel_table`): each
golden case runs once with the device's own table and once with this Ascend table.

`bf16_emulation(table)` wraps a table for the bf16 mode (see its docstring).
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Callable

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, mint, nn, ops
from mindspore.mint import distributed as md

from stepvideo import backend

FP = (ms.float16, ms.bfloat16)
LAYOUTS = ("BSH", "BNSD", "SBH", "BSND", "TND")


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


# --------------------------------------------------------------------------- ops.flash_attention_score


def _to_bnsd(x: Tensor, layout: str, heads: int) -> Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
    s, b, h = x.shape  # SBH
    return x.reshape(s, b, heads, h // heads).transpose(1, 2, 0, 3)


def _from_bnsd(x: Tensor, layout: str) -> Tensor:
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _heads_of(x: Tensor, layout: str, head_num_or_none) -> int:
    """N of a q/k/v tensor: explicit in the 4-D layouts, H / D in the 3-D ones."""
    if layout == "BNSD":
        return x.shape[1]
    if layout == "BSND":
        return x.shape[2]
    return head_num_or_none


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                          input_layout="BSH", sparse_mode=0):
    """softmax(Mask(scalar_value * q k^T, attn_mask)) v; attn_mask True/1 = discard; -> attention_out only.

    Shapes: q (B, S1, H1) | (B, N1, S1, D) | (S1, B, H1) | (B, S1, N1, D); k, v likewise with N2 heads,
    N2 dividing N1 (grouped heads). attn_mask (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2), bool or
    uint8. Returns a tensor of query's shape and dtype.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"flash_attention_score: {name} must be a Tensor")
    if query.dtype not in FP:
        raise TypeError(f"flash_attention_score: dtype of query must be float16 or bfloat16, got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError("flash_attention_score: query, key and value must have the same dtype")
    if not isinstance(input_layout, str):
        raise TypeError("flash_attention_score: input_layout must be a string")
    if input_layout not in LAYOUTS:
        raise ValueError(f"flash_attention_score: input_layout {input_layout!r} is not one of {LAYOUTS}")
    if not isinstance(scalar_value, float) or not isinstance(keep_prob, float):
        raise TypeError("flash_attention_score: scalar_value and keep_prob must be float")
    if not isinstance(sparse_mode, int):
        raise TypeError("flash_attention_score: sparse_mode must be an int")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError("flash_attention_score: attn_mask must be a Tensor")
        if attn_mask.dtype not in (ms.bool_, ms.uint8):
            raise TypeError(f"flash_attention_score: dtype of attn_mask must be bool or uint8, got {attn_mask.dtype}")
    if real_shift is not None and not isinstance(real_shift, Tensor):
        raise TypeError("flash_attention_score: real_shift must be a Tensor")
    unused = dict(real_shift=real_shift, drop_mask=drop_mask, padding_mask=padding_mask, prefix=prefix,
                  actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen)
    if any(v is not None for v in unused.values()) or keep_prob != 1.0 or sparse_mode not in (0, 2, 3) or \
            pre_tokens != 2147483647 or next_tokens != 2147483647 or input_layout == "TND":
        raise NotImplementedError("flash_attention_score stand-in: only q, k, v, attn_mask, scalar_value, "
                                  "head_num, sparse_mode 0/2/3 and the BSH/BNSD/SBH/BSND layouts are modelled")
    if head_num <= 0:
        raise RuntimeError(f"flash_attention_score: head_num must be greater than 0, got {head_num}")
    ndim = 4 if input_layout in ("BNSD", "BSND") else 3
    if query.ndim != ndim or key.ndim != ndim or value.ndim != ndim:
        raise RuntimeError(f"flash_attention_score: layout {input_layout} needs {ndim}-D query/key/value")
    if ndim == 3 and query.shape[-1] % head_num:
        raise RuntimeError(f"flash_attention_score: H1 {query.shape[-1]} is not head_num {head_num} * D")
    n1 = _heads_of(query, input_layout, head_num)
    if n1 != head_num:
        raise RuntimeError(f"flash_attention_score: head_num {head_num} != query's N1 {n1}")
    d = query.shape[-1] if ndim == 4 else query.shape[-1] // head_num
    n2 = _heads_of(key, input_layout, None)
    if n2 is None:  # 3-D layouts: N2 = H2 / D
        if key.shape[-1] % d:
            raise RuntimeError("flash_attention_score: D-axis of query, key and value is not the same")
        n2 = key.shape[-1] // d
    k_d = key.shape[-1] if ndim == 4 else key.shape[-1] // n2
    v_d = value.shape[-1] if ndim == 4 else value.shape[-1] // n2
    if k_d != d or v_d != d:
        raise RuntimeError("flash_attention_score: D-axis of query, key and value is not the same")
    if head_num % n2:
        raise RuntimeError(f"flash_attention_score: head_num {head_num} is not divisible by N2 {n2}")
    if d % 16 or d > 512:
        raise RuntimeError(f"flash_attention_score: D must be a multiple of 16 and at most 512, got {d}")
    if tuple(key.shape) != tuple(value.shape):
        raise RuntimeError("flash_attention_score: key and value must have the same shape")

    q = _to_bnsd(_fp32(query), input_layout, head_num)  # (B, N1, S1, D)
    k = _to_bnsd(_fp32(key), input_layout, n2)  # (B, N2, S2, D)
    v = _to_bnsd(_fp32(value), input_layout, n2)
    b, _, s1, _ = q.shape
    s2 = k.shape[2]
    if n2 != head_num:  # grouped heads: query head h reads key/value head h // (N1 / N2)
        k = _repeat_heads(k, head_num // n2)
        v = _repeat_heads(v, head_num // n2)
    if sparse_mode in (2, 3):
        attn_mask = _causal_drop(attn_mask, s1, s2, sparse_mode)
    elif attn_mask is not None and tuple(attn_mask.shape) not in ((b, head_num, s1, s2), (b, 1, s1, s2), (s1, s2)):
        raise RuntimeError(f"flash_attention_score: attn_mask shape {tuple(attn_mask.shape)} is not valid; "
                           f"expected {(b, head_num, s1, s2)}, {(b, 1, s1, s2)} or {(s1, s2)}")
    scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * scalar_value  # (B, N1, S1, S2)
    if attn_mask is not None:
        scores = ops.masked_fill(scores, attn_mask.astype(ms.bool_), float("-inf"))
    out = ops.matmul(mint.softmax(scores, dim=-1), v)  # (B, N1, S1, D)
    return _from_bnsd(out, input_layout).astype(query.dtype)


def _causal_drop(compressed, s1: int, s2: int, sparse_mode: int) -> Tensor:
    """The (S1, S2) discard mask of sparse_mode 2 (leftUpCausal: query i keeps keys j <= i) or 3 (rightDownCausal:
    keys j <= i + S2 - S1), after checking the compressed mask these modes require: (2048, 2048), True above the
    diagonal (the documented optimized mask; the stand-in refuses any other content rather than guess)."""
    if compressed is None or tuple(compressed.shape) != (2048, 2048):
        shape = None if compressed is None else tuple(compressed.shape)
        raise RuntimeError(f"flash_attention_score: sparse_mode {sparse_mode} needs the compressed attn_mask of "
                           f"shape (2048, 2048), got {shape}")
    if not np.array_equal(compressed.asnumpy().astype(bool), np.triu(np.ones((2048, 2048), bool), 1)):
        raise NotImplementedError("flash_attention_score stand-in: only the upper-triangular compressed mask "
                                  "(True above the diagonal) is modelled")
    offset = 0 if sparse_mode == 2 else s2 - s1
    return Tensor(np.arange(s2)[None, :] > np.arange(s1)[:, None] + offset)


def _repeat_heads(x: Tensor, times: int) -> Tensor:
    b, n, s, d = x.shape
    return x.expand_dims(2).broadcast_to((b, n, times, s, d)).reshape(b, n * times, s, d)


# --------------------------------------------------------------------------- ops.rms_norm


def rms_norm(x, gamma, epsilon=1e-6):
    """(y, rstd): y = x * rsqrt(mean(x^2) + epsilon) * gamma over the last gamma.ndim axes, in x's dtype;
    rstd float32 of shape x.shape[:-gamma.ndim] + (1,) * gamma.ndim."""
    allowed = (ms.float16, ms.float32, ms.bfloat16)
    if x.dtype not in allowed:
        raise TypeError(f"rms_norm: dtype of x must be float16, float32 or bfloat16, got {x.dtype}")
    if gamma.dtype not in allowed:
        raise TypeError(f"rms_norm: dtype of gamma must be float16, float32 or bfloat16, got {gamma.dtype}")
    if x.dtype != gamma.dtype:
        raise TypeError(f"rms_norm: x ({x.dtype}) and gamma ({gamma.dtype}) must have the same dtype")
    if not isinstance(epsilon, float) or not 0.0 < epsilon <= 1.0:
        raise ValueError(f"rms_norm: epsilon must be a float in (0, 1], got {epsilon!r}")
    if gamma.ndim > x.ndim:
        raise ValueError(f"rms_norm: the rank of gamma ({gamma.ndim}) is larger than the rank of x ({x.ndim})")
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    xf = _fp32(x)
    rstd = ops.rsqrt((xf * xf).mean(axis=axes, keep_dims=True) + epsilon)
    return (xf * rstd * _fp32(gamma)).astype(x.dtype), rstd


# --------------------------------------------------------------------------- ops.gelu


def gelu(input, approximate="none"):  # noqa: A002 (the documented argument name)
    """GELU of `input` in its dtype: x P(X <= x) ('none') or the tanh approximation ('tanh')."""
    if not isinstance(input, Tensor):
        raise TypeError("gelu: input must be a Tensor")
    if input.dtype not in (ms.bfloat16, ms.float16, ms.float32, ms.float64):
        raise TypeError(f"gelu: dtype of input must be bfloat16, float16, float32 or float64, got {input.dtype}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    x = _fp32(input)
    if approximate == "tanh":
        # 0.5 (1 + tanh(u)) = sigmoid(2u): exact, and the CPU tanh kernel is off by 1e-4.
        c = math.sqrt(8.0 / math.pi)
        out = x * ops.sigmoid(c * (x + 0.044715 * x * x * x))
    else:
        out = 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
    return out.astype(input.dtype)


# --------------------------------------------------------------------------- mint.distributed


def _fix_cpu_send() -> None:
    """MindSpore 2.7 CPU: `send` asks `get_cache_group_rank()` for a default group bound at import to
    "hccl_world_group"; resolve the world group when called instead (docs/mindspore-notes.md)."""
    from mindspore.communication.management import GlobalComm
    from mindspore.mint.distributed import distributed as impl

    original = impl.get_cache_group_rank
    if getattr(original, "resolves_world_group", False):
        return

    def get_cache_group_rank(group=None):
        return original(GlobalComm.WORLD_COMM_GROUP if group is None else group)

    get_cache_group_rank.resolves_world_group = True
    impl.get_cache_group_rank = get_cache_group_rank


class StandinComm:
    """`mindspore.mint.distributed` with all_to_all, send and recv that work on the CPU backend.

    all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False): rank i of the group
    receives chunk i of every rank's input list, written in place into output_tensor_list; done
    with a list all-gather. send / recv: MindSpore's own, with the CPU default-group fix. Every other
    function is mint.distributed's. `calls` counts the calls of the three stand-ins.
    """

    def __init__(self):
        self.calls = {"all_to_all": 0, "send": 0, "recv": 0}

    def __getattr__(self, name):
        return getattr(md, name)

    def all_to_all(self, output_tensor_list, input_tensor_list, group=None, async_op=False):
        tensors = list(output_tensor_list) + list(input_tensor_list)
        if not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError("all_to_all: every element of input_tensor_list and output_tensor_list must be a Tensor")
        if len({t.dtype for t in tensors}) != 1:
            raise TypeError("all_to_all: the tensors in input_tensor_list and output_tensor_list must have one dtype")
        if group is not None and not isinstance(group, str):
            raise TypeError(f"all_to_all: group must be a str, got {type(group).__name__}")
        if not isinstance(async_op, bool):
            raise TypeError("all_to_all: async_op must be a bool")
        if async_op:
            raise NotImplementedError("all_to_all stand-in: async_op=True is not modelled")
        self.calls["all_to_all"] += 1
        size = md.get_world_size(group) if group is not None else md.get_world_size()
        me = md.get_rank(group) if group is not None else md.get_rank()
        shape = tuple(input_tensor_list[0].shape)
        if len(input_tensor_list) != size or len(output_tensor_list) != size or \
                any(tuple(t.shape) != shape for t in tensors):
            raise RuntimeError(f"all_to_all stand-in: expected {size} input and output tensors of one shape")
        dtype = input_tensor_list[0].dtype
        packed = mint.cat([t.reshape(1, -1) for t in input_tensor_list], dim=0)  # (size, numel)
        gathered = [ops.zeros(tuple(packed.shape), ms.float32).astype(dtype) for _ in range(size)]
        md.all_gather(gathered, packed, group=group)
        for src in range(size):
            output_tensor_list[src].copy_(gathered[src][me].reshape(shape))
        return None

    def send(self, tensor, dst=0, group=None, tag=0):
        _fix_cpu_send()
        self.calls["send"] += 1
        return md.send(tensor, dst, group=group, tag=tag)

    def recv(self, tensor, src=0, group=None, tag=0):
        _fix_cpu_send()
        self.calls["recv"] += 1
        return md.recv(tensor, src, group=group, tag=tag)


def ascend_table(compute_dtype=ms.float32) -> backend.Kernels:
    """The Ascend kernel table with this module's stand-ins (fp32 compute by default: the CPU path)."""
    return backend.ascend_kernels(sys.modules[__name__], StandinComm(), compute_dtype=compute_dtype,
                                  name="ascend-standin")


KERNEL_TABLES = ("default", "ascend-standin")


@pytest.fixture(params=KERNEL_TABLES)
def kernel_table(request):
    """The test once with the table `backend.init` chose (on a CPU the exact fp32 kernels), once with the
    Ascend table on these stand-ins in float32, where the golden tolerances hold unchanged.

    In float32 the Ascend table takes its fused RmsNorm, Ascend GELU and LayerNorm modulation and the
    exact branch of its attention (FlashAttentionScore takes bf16/fp16 only: test_ascend_mode.py runs
    that branch in bf16). Eager models built under either table can run under the other (both compute
    in float32 and dispatch per call); a compiled graph keeps the kernels it was compiled with, so a
    test that compiles builds its model inside the fixture's table.
    """
    if request.param == "default":
        yield backend.kernels()
        return
    with backend.using(ascend_table()) as table:
        yield table
        assert backend.kernels() is table, f"{request.node.name} replaced the Ascend table it was given"


# --------------------------------------------------------------------------- bf16 emulation


def round_bf16(x):
    """A float32 tensor rounded to bf16 precision (kept float32); other values unchanged."""
    if isinstance(x, Tensor) and x.dtype == ms.float32:
        return x.astype(ms.bfloat16).astype(ms.float32)
    return x


def _bf16_inputs(kernel: Callable) -> Callable:
    """Call `kernel` with its float32 tensors as bf16 (as on Ascend) and return float32."""
    def run(*args):
        out = kernel(*(a.astype(ms.bfloat16) if isinstance(a, Tensor) and a.dtype == ms.float32 else a
                       for a in args))
        return out.astype(ms.float32)
    return run


def _rounded_output(kernel: Callable) -> Callable:
    def run(*args):
        return round_bf16(kernel(*args))
    return run


def bf16_emulation(table: backend.Kernels) -> backend.Kernels:
    """bf16 numerics on a CPU, whose MindSpore has no bf16 arithmetic kernels (Mul, MatMul, Sigmoid ...).

    Tensors stay float32 holding bf16 values. Attention, GELU and RMSNorm get bf16 inputs, so the
    Ascend table takes its fused branches (FlashAttentionScore, the Ascend GELU, RmsNorm) through
    the stand-ins, which compute in float32 and return bf16. The modulated LayerNorm computes in
    float32 and rounds its output. The layers (Linear, Conv, LayerNorm, Embedding, GroupNorm) are
    rounded by `round_layer_outputs`, the parameters by `round_parameters`.
    """
    return replace(table, name=f"{table.name}-bf16-emulation", attention=_bf16_attention(table.attention),
                   gelu_tanh=_bf16_inputs(table.gelu_tanh), rms_norm=_bf16_inputs(table.rms_norm),
                   modulated_layer_norm=_rounded_output(table.modulated_layer_norm))


def _bf16_attention(kernel: Callable) -> Callable:
    def run(q, k, v, mask, causal, bias, scale):
        cast = lambda t: t.astype(ms.bfloat16)  # noqa: E731
        return kernel(cast(q), cast(k), cast(v), mask, causal, bias, scale).astype(ms.float32)
    return run


def round_parameters(net: nn.Cell) -> None:
    """Every float32 parameter of `net` rounded to bf16 precision (the model stored in bf16)."""
    for p in net.get_parameters():
        if p.dtype == ms.float32:
            p.set_data(round_bf16(Tensor(p.asnumpy())))


LEAF_LAYERS = ("Linear", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding", "RMSNorm")


def round_layer_outputs(net: nn.Cell) -> list:
    """Round the output of every leaf layer of `net` to bf16 (forward hooks); returns the handles."""
    handles = []
    for _, cell in net.cells_and_names():
        if type(cell).__name__ in LEAF_LAYERS:
            handles.append(cell.register_forward_hook(lambda _cell, _inputs, output: round_bf16(output)))
    return handles


def bf16_array(x: np.ndarray) -> np.ndarray:
    """A float32 numpy array rounded to bf16 precision (round to nearest even)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)
