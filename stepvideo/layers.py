"""Small layers with PyTorch parameter names, created lazily.

Every parameter is made with a MindSpore `initializer`, which allocates nothing
until data is set: a 30B model can be built, inspected and partially loaded
(one pipeline stage's blocks) without touching memory for the rest. The
checkpoint loader fills them with `set_data`.

Names follow torch (`weight`, `bias`), so checkpoint keys map to parameter names
one to one.

`dtype` defaults to the backend's compute dtype (bf16 on Ascend, fp32 on CPU);
modules the reference keeps in fp32 pass `dtype=ms.float32` explicitly.

`jit_method` is the one way a cell compiles: a decorated method runs as a
compiled graph while the cell's `jit_enabled` is True, and eagerly otherwise.
"""
from __future__ import annotations

import threading
import types
from typing import Callable, Optional, Sequence, Tuple, Union

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from stepvideo import backend


def lazy_parameter(shape: Sequence[int], dtype: Optional[ms.dtype] = None, fill: str = "zeros") -> Parameter:
    """A parameter whose memory is allocated only when data is set."""
    return Parameter(initializer(fill, tuple(shape), dtype or backend.compute_dtype()))


class jit_method:
    """Method decorator: the method runs as a compiled graph (`ms.jit`, one compile per input
    shape) while `self.jit_enabled` is True, and as plain Python otherwise.

    Every caller of the method (the cell's own forward, a pipeline stage calling it from
    outside, another decorated method) gets the same choice. A decorated method called while
    another one is being compiled is inlined into that graph rather than compiled on its own.
    Graphs are cached by MindSpore per instance and input shapes; they keep the backend
    kernels they were compiled with.
    """

    _compiling = threading.local()

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graph = ms.jit(fn)
        self.__doc__ = fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self.fn
        if not obj.jit_enabled or getattr(jit_method._compiling, "active", False):
            return types.MethodType(self.fn, obj)
        return types.MethodType(self._run_graph, obj)

    def _run_graph(self, obj, *args):
        jit_method._compiling.active = True
        try:
            return self.graph(obj, *args)
        finally:
            jit_method._compiling.active = False


def _triple(v: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Linear(nn.Cell):
    """y = x W^T + b; weight (out, in) as in torch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = lazy_parameter((out_features, in_features), dtype)
        self.bias = lazy_parameter((out_features,), dtype) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        return mint.nn.functional.linear(x, self.weight, self.bias)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; without affine it has no parameters (like torch)."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.dim, self.eps = dim, eps
        dtype = dtype or backend.compute_dtype()
        if elementwise_affine:
            self.weight = lazy_parameter((dim,), dtype, "ones")
            self.bias = lazy_parameter((dim,), dtype, "zeros")
        else:
            self.weight, self.bias = None, None
            self._ones = ops.ones((dim,), dtype)
            self._zeros = ops.zeros((dim,), dtype)

    def construct(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return backend.layer_norm(x, self._ones.astype(x.dtype), self._zeros.astype(x.dtype), self.eps)
        return backend.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = lazy_parameter((dim,), dtype, "ones") if elementwise_affine else None

    def construct(self, x: Tensor) -> Tensor:
        return backend.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Cell):
    """Lookup table; weight (num_embeddings, dim) as in torch."""

    def __init__(self, num_embeddings: int, dim: int, dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.weight = lazy_parameter((num_embeddings, dim), dtype)

    def construct(self, ids: Tensor) -> Tensor:
        return backend.embedding(ids, self.weight)


class Conv2d(nn.Cell):
    """2-D convolution, weight (out, in, kh, kw); symmetric zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype: Optional[ms.dtype] = None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.weight = lazy_parameter((out_channels, in_channels, kh, kw), dtype)
        self.bias = lazy_parameter((out_channels,), dtype) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        """(n, c, h, w) -> (n, out, h', w')."""
        pad_mode = "pad" if any(self.padding) else "valid"
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, pad_mode=pad_mode,
                          padding=self.padding if any(self.padding) else 0)


class Conv3d(nn.Cell):
    """3-D convolution, weight (out, in, kt, kh, kw); symmetric zero padding (t, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = lazy_parameter((out_channels, in_channels) + self.kernel_size, dtype)
        self.bias = lazy_parameter((out_channels,), dtype) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        """(n, c, t, h, w) -> (n, out, t', h', w')."""
        pad_mode = "pad" if any(self.padding) else "valid"
        return ops.conv3d(x, self.weight, self.bias, stride=self.stride, pad_mode=pad_mode,
                          padding=self.padding if any(self.padding) else 0)


class GroupNorm(nn.Cell):
    """GroupNorm over (n, c, *spatial) with weight/bias of shape (c,)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, dtype: Optional[ms.dtype] = None):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = lazy_parameter((num_channels,), dtype, "ones")
        self.bias = lazy_parameter((num_channels,), dtype, "zeros")

    def construct(self, x: Tensor) -> Tensor:
        return backend.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
