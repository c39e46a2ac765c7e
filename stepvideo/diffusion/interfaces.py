"""The two things the pipeline asks of the outside world, with an in-process implementation.

    text = LocalCaption.from_model_dir(model_dir)      # or RemoteCaption(caption_url)
    out = text.encode(["a cat", ""])                    # CaptionOutput(y, y_mask, clip_embedding)
    vae = LocalVae.from_model_dir(model_dir)            # or RemoteVae(vae_url)
    video = vae.decode(latents)                         # (b, T, 64, h, w) -> (b, frames, 3, 16h, 16w)

`TextEncoding` and `VideoDecoding` are the interfaces; the local classes run the
models in this process, the remote ones (`stepvideo.serving.client`) call the
HTTP services, which themselves run the local classes, so both give the same
arrays bit for bit.

Arrays are numpy, in and out. Floating arrays are float32: when a model computes
in bf16 (Ascend), its bf16 outputs are widened to float32 exactly, so nothing is
rounded here, and the wire sends such arrays as bf16 bits again (see
`stepvideo.serving.wire`). Masks are int64.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor

from stepvideo.contracts import check_latents, check_prompts


@dataclass(frozen=True)
class CaptionOutput:
    """What the caption service returns for b prompts (row i belongs to prompt i).

    y: (b, 320, H_llm) float32, Step-LLM hidden states;
    y_mask: (b, 77 + 320) int64, ones for the CLIP tokens, then the Step-LLM token mask;
    clip_embedding: (b, 77, H_clip) float32, the CLIP text encoder's last hidden state.
    """

    y: np.ndarray
    y_mask: np.ndarray
    clip_embedding: np.ndarray

    def as_dict(self) -> dict:
        return {"y": self.y, "y_mask": self.y_mask, "clip_embedding": self.clip_embedding}


class TextEncoding(abc.ABC):
    """prompts -> CaptionOutput."""

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> CaptionOutput:
        ...


class VideoDecoding(abc.ABC):
    """latents (b, T, 64, h, w) -> video (b, frames, 3, 16h, 16w) float32 in about [-1, 1]."""

    @abc.abstractmethod
    def decode(self, latents: np.ndarray) -> np.ndarray:
        ...


def to_numpy(x, what: str) -> np.ndarray:
    """A model output (Tensor or array) as a numpy array; bf16 widened to float32 exactly.

    On CPU `asnumpy()` shares the tensor's memory and keeps it alive (no copy of a video).
    """
    if isinstance(x, Tensor):
        if x.dtype in (ms.bfloat16, ms.float16):
            x = x.astype(ms.float32)
        return x.asnumpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{what}: expected a Tensor or numpy array from the model, got {type(x).__name__}")


class LocalCaption(TextEncoding):
    """Step-LLM + CLIP in this process (a `stepvideo.text_encoder.caption.CaptionEncoder`)."""

    def __init__(self, encoder):
        self.encoder = encoder

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, os.PathLike], offload: bool = False) -> "LocalCaption":
        """offload: stream Step-LLM's layers from the mapped checkpoint (memory: embeddings + 2 layers)."""
        from stepvideo.text_encoder.caption import CaptionEncoder

        return cls(CaptionEncoder(model_dir, offload=offload))

    def encode(self, prompts: Sequence[str]) -> CaptionOutput:
        prompts = check_prompts(prompts)
        out = self.encoder(prompts)
        result = CaptionOutput(y=to_numpy(out["y"], "y").astype(np.float32, copy=False),
                               y_mask=to_numpy(out["y_mask"], "y_mask").astype(np.int64, copy=False),
                               clip_embedding=to_numpy(out["clip_embedding"], "clip_embedding")
                               .astype(np.float32, copy=False))
        b = len(prompts)
        for name, arr in result.as_dict().items():
            if arr.shape[0] != b:
                raise RuntimeError(f"caption encoder returned {name} of shape {arr.shape} for {b} prompts")
        return result


class LocalVae(VideoDecoding):
    """The video VAE in this process (a `stepvideo.vae.vae.AutoencoderKL`)."""

    def __init__(self, vae):
        self.vae = vae

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, os.PathLike]) -> "LocalVae":
        """`<model_dir>/vae/vae_v2.safetensors` (+ `config.json` for non-published widths)."""
        from stepvideo.vae.vae import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(Path(model_dir) / "vae"))

    @property
    def z_channels(self) -> int:
        return self.vae.z_channels

    def decode(self, latents: np.ndarray) -> np.ndarray:
        # The VAE casts each chunk to its own dtype, so the latents go in as they are.
        z = check_latents(latents, self.z_channels)
        return to_numpy(self.vae.decode(Tensor.from_numpy(z)), "video").astype(np.float32, copy=False)
