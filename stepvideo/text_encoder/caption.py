"""The caption the DiT is conditioned on: Step-LLM and CLIP outputs packed together.

One implementation for the caption service and the in-process pipeline:

    encoder = CaptionEncoder(model_dir)       # loads model_dir/step_llm and model_dir/hunyuan_clip
    out = encoder(["a cat", ""])
    out["y"]               # (b, 320, H_llm) compute dtype: Step-LLM hidden states
    out["y_mask"]          # (b, 77 + 320) int64: 77 ones for the CLIP tokens, then the Step-LLM mask
    out["clip_embedding"]  # (b, 77, H_clip) compute dtype: CLIP's last hidden state

Every CLIP position counts as valid (including its [PAD] tokens): the DiT puts
the CLIP tokens before the Step-LLM tokens and uses the mask only through each
row's count. The CLIP embedding is cast to the compute dtype (the DiT's dtype).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import mindspore as ms
from mindspore import Tensor, ops

from stepvideo import backend
from stepvideo.contracts import check_prompts
from stepvideo.text_encoder.clip import HunyuanClip
from stepvideo.text_encoder.stepllm import STEP1TextEncoder

LLM_MAX_LENGTH = 320
CLIP_MAX_LENGTH = 77


def pack_caption(y: Tensor, y_mask: Tensor, clip_embedding: Tensor,
                 dtype: Optional[ms.dtype] = None) -> Dict[str, Tensor]:
    """Combine the two encoders' outputs as the DiT expects them.

    y (b, L, H) and y_mask (b, L) from Step-LLM, clip_embedding (b, L_clip, C) from CLIP ->
    {"y": y, "y_mask": [1] * L_clip + y_mask (int64), "clip_embedding": clip_embedding in `dtype`}
    with `dtype` defaulting to the compute dtype.
    """
    if y.ndim != 3 or clip_embedding.ndim != 3:
        raise ValueError(f"y and clip_embedding must be (b, tokens, channels), got {tuple(y.shape)} and "
                         f"{tuple(clip_embedding.shape)}")
    if tuple(y_mask.shape) != tuple(y.shape[:2]):
        raise ValueError(f"y_mask must have shape {tuple(y.shape[:2])} (that of y without channels), "
                         f"got {tuple(y_mask.shape)}")
    b, clip_len = clip_embedding.shape[:2]
    if b != y.shape[0]:
        raise ValueError(f"clip_embedding has {b} rows but y has {y.shape[0]}")
    clip_ones = ops.ones((b, clip_len), ms.int64)
    return {"y": y,
            "y_mask": ops.concat((clip_ones, y_mask.astype(ms.int64)), axis=1),
            "clip_embedding": clip_embedding.astype(dtype or backend.compute_dtype())}


class CaptionEncoder:
    """Step-LLM + HunyuanCLIP from a Step-Video model folder; prompts -> the packed caption."""

    def __init__(self, model_dir: Union[str, os.PathLike], llm_dir: str = "step_llm",
                 clip_dir: str = "hunyuan_clip", offload: bool = False):
        """offload: stream Step-LLM's layers (`STEP1TextEncoder`); CLIP (~1.3 GB) stays loaded."""
        self.text_encoder = STEP1TextEncoder(os.path.join(model_dir, llm_dir), max_length=LLM_MAX_LENGTH,
                                             offload=offload)
        self.clip = HunyuanClip(os.path.join(model_dir, clip_dir), max_length=CLIP_MAX_LENGTH)

    def __call__(self, prompts: Union[str, Sequence[str]]) -> Dict[str, Tensor]:
        prompts = check_prompts(prompts)
        y, y_mask = self.text_encoder(prompts)
        clip_embedding, _ = self.clip(prompts)
        return pack_caption(y, y_mask, clip_embedding)
