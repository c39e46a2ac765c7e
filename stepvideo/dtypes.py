"""Every element type the project stores or sends, in one table, and bfloat16 without torch.

Each `DType` row names one element type the way each format does: the safetensors code
("BF16"), the torch storage class ("BFloat16Storage"), the MindSpore dtype (`ms.bfloat16`),
and the numpy dtype its bytes are held in (little-endian).

bfloat16 is held one way in numpy: as its uint16 bit patterns (numpy has no bfloat16 and
`ml_dtypes` is not required). The bits are the high half of a float32, so widening to
float32 is exact (`bf16_bits_to_f32`) and narrowing rounds to nearest even as torch does
(`f32_to_bf16_bits`). MindSpore's own numpy bfloat16 (what `Tensor.asnumpy()` of a bf16
tensor returns) is the same bits under another name: `is_mindspore_bf16` recognises it and
`mindspore_bf16` views bits as it, without a copy.

MindSpore is imported only by the functions that need it, so the file-format code
(safetensors, the PyTorch checkpoint reader, convert.py) runs without it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type. `numpy` is the dtype of the stored bytes (bfloat16: uint16 bits)."""

    name: str  # numpy-style name, e.g. "float32", "bfloat16"
    safetensors: str  # e.g. "F32", "BF16"
    torch_storage: str  # e.g. "FloatStorage"
    numpy: np.dtype
    mindspore: Optional[str]  # attribute of the mindspore module, None where MindSpore has no such type

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


TABLE = (
    DType("float64", "F64", "DoubleStorage", np.dtype("<f8"), "float64"),
    DType("float32", "F32", "FloatStorage", np.dtype("<f4"), "float32"),
    DType("float16", "F16", "HalfStorage", np.dtype("<f2"), "float16"),
    DType("bfloat16", "BF16", "BFloat16Storage", np.dtype("<u2"), "bfloat16"),
    DType("int64", "I64", "LongStorage", np.dtype("<i8"), "int64"),
    DType("int32", "I32", "IntStorage", np.dtype("<i4"), "int32"),
    DType("int16", "I16", "ShortStorage", np.dtype("<i2"), "int16"),
    DType("int8", "I8", "CharStorage", np.dtype("i1"), "int8"),
    DType("uint8", "U8", "ByteStorage", np.dtype("u1"), "uint8"),
    DType("bool", "BOOL", "BoolStorage", np.dtype("?"), "bool_"),
)
BY_NAME: Dict[str, DType] = {d.name: d for d in TABLE}
BY_SAFETENSORS: Dict[str, DType] = {d.safetensors: d for d in TABLE}
BY_TORCH_STORAGE: Dict[str, DType] = {d.torch_storage: d for d in TABLE}
BF16 = BY_NAME["bfloat16"]
FLOAT_NAMES = ("float32", "float16", "bfloat16")  # the floating types checkpoints hold


def of_array(arr: np.ndarray) -> Optional[DType]:
    """The row of a numpy array's element type (either byte order); None if it has none.

    uint16 arrays have no row: bfloat16 bits are told apart from integers by the caller.
    MindSpore's numpy bfloat16 maps to `BF16`.
    """
    if is_mindspore_bf16(arr.dtype):
        return BF16
    little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    for d in TABLE:
        if d is not BF16 and d.numpy == little:
            return d
    return None


# --------------------------------------------------------------------------- bfloat16


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact bfloat16 -> float32: the bf16 bits (uint16) are the high half of the float32."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (as torch does); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def is_mindspore_bf16(dtype: np.dtype) -> bool:
    """True for MindSpore's numpy bfloat16 (`Tensor.asnumpy()` of a bf16 tensor)."""
    return dtype.name == "bfloat16"


@functools.lru_cache(maxsize=1)
def _mindspore_numpy_bf16() -> np.dtype:
    # Looked up on first use: running a kernel at import time would fix the device too early.
    import mindspore as ms

    return ms.Tensor(np.zeros(1, np.float32)).astype(ms.bfloat16).asnumpy().dtype


def mindspore_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) viewed as MindSpore's numpy bfloat16, for `Tensor.from_numpy` (no copy)."""
    return bits.view(_mindspore_numpy_bf16())


def mindspore_dtype(d: DType):
    """The MindSpore dtype of a row (TypeError where MindSpore has none)."""
    import mindspore as ms

    if d.mindspore is None:
        raise TypeError(f"MindSpore has no dtype for {d.name}")
    return getattr(ms, d.mindspore)


def of_mindspore(dtype) -> DType:
    """The row of a MindSpore dtype (TypeError naming the supported ones if it has none)."""
    for d in TABLE:
        if d.mindspore is not None and mindspore_dtype(d) == dtype:
            return d
    raise TypeError(f"no element type for MindSpore dtype {dtype}; supported: {[d.name for d in TABLE]}")
