"""What the pipeline's two inputs must look like, checked in one place: prompts and latents.

Every entry point (the pipeline, the text encoders, the in-process and remote interfaces,
the VAE) checks its input with these functions, so a bad input gets the same message
wherever it arrives. The HTTP services check request bodies before this, with limits
(`stepvideo.serving.wire`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np


class PromptError(TypeError, ValueError):
    """Prompts that are not a string or a non-empty list of strings.

    Both a TypeError (a wrong type) and a ValueError (a wrong value, e.g. an empty list), so
    callers that catch either keep working.
    """


def check_prompts(prompts: Union[str, Sequence[str]], what: str = "prompts") -> List[str]:
    """A string (one prompt) or a non-empty list/tuple of strings, as a list of str.

    Raises PromptError naming `what` and the bad entry; the empty string is a valid prompt
    (the default negative prompt is empty).
    """
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise PromptError(f"{what} must be a string or a non-empty list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise PromptError(f"{what} must be a string or a non-empty list of strings: expected at least one prompt, "
                          "got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"{what}[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


def check_latent_shape(shape: Sequence[int], channels: int, what: str = "latents",
                       batch: Optional[int] = None) -> tuple:
    """Latents are (b, T, channels, h, w) with every size >= 1 (and b == `batch` if given); ValueError otherwise."""
    shape = tuple(int(s) for s in shape)
    b = "b" if batch is None else str(batch)
    if len(shape) != 5 or shape[2] != channels or min(shape) < 1 or (batch is not None and shape[0] != batch):
        want = f"({b}, T, {channels}, h, w)"
        raise ValueError(f"{what} must be {want}, got shape {shape}; latents of shape {want} need every size >= 1")
    return shape


def check_latents(latents, channels: int = 64, what: str = "latents") -> np.ndarray:
    """Latents (a Tensor or an array) as a C-contiguous float32 (b, T, channels, h, w) array.

    bfloat16 is widened exactly; ValueError says what was expected.
    """
    import mindspore as ms

    from stepvideo import dtypes

    if isinstance(latents, ms.Tensor):
        latents = latents.astype(ms.float32).asnumpy()
    arr = np.asarray(latents)
    if dtypes.is_mindspore_bf16(arr.dtype):
        arr = dtypes.bf16_bits_to_f32(arr.view(np.uint16))
    check_latent_shape(arr.shape, channels, what)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)
