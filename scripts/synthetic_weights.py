"""Deterministic, name-keyed synthetic weights: the golden fixtures' generation rule.

Every tensor is a function of its checkpoint key, its shape and a salt only, so
a checkpoint can be regenerated bit for bit anywhere (the VAE fixtures store no
weights and depend on this):

    seed = zlib.crc32((salt + key).encode("utf-8"))      # unsigned 32-bit
    x    = numpy.random.default_rng(seed).standard_normal(shape)   # float64, PCG64
    ".bias" keys:  w = 0.05 * x
    1-D tensors:   w = 1 + 0.1 * x                        # norm scales
    otherwise:     w = x / sqrt(prod(shape[1:]))          # 1 / sqrt(fan_in)
    w = float32(w)

The float64 draws are made in blocks of rows (a PCG64 stream gives the same
numbers however it is cut), so a 226M-element tensor does not need a 1.8 GB
float64 temporary.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Mapping, Sequence

import numpy as np

_BLOCK_ELEMENTS = 1 << 22  # float64 draws per block (32 MiB)


def rule_seed(key: str, salt: str = "") -> int:
    return zlib.crc32((salt + key).encode("utf-8"))


def rule_kind(key: str, shape: Sequence[int]) -> str:
    """Which branch of the rule a tensor takes, named as in the fixtures' weight manifests."""
    if key.endswith(".bias"):
        return "bias"
    if len(shape) == 1:
        return "norm_weight"
    return "fan_in"


def rule_tensor(key: str, shape: Sequence[int], salt: str = "") -> np.ndarray:
    """The float32 tensor the rule gives for `key` (the name stored in the checkpoint file)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"{key}: the rule is defined for tensors of rank >= 1, got a scalar")
    kind = rule_kind(key, shape)
    rng = np.random.default_rng(rule_seed(key, salt))
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    fan_in = math.prod(shape[1:])
    for start in range(0, flat.size, _BLOCK_ELEMENTS):
        x = rng.standard_normal(min(_BLOCK_ELEMENTS, flat.size - start))
        if kind == "bias":
            x = 0.05 * x
        elif kind == "norm_weight":
            x = 1.0 + 0.1 * x
        else:
            x = x / math.sqrt(fan_in)
        flat[start:start + x.size] = x  # the float64 -> float32 cast rounds to nearest, as astype does
    return out


def rule_weights(shapes: Mapping[str, Sequence[int]], salt: str = "") -> Dict[str, np.ndarray]:
    """{checkpoint key: float32 array} for every key of `shapes`, by the rule above."""
    return {key: rule_tensor(key, shape, salt) for key, shape in shapes.items()}
