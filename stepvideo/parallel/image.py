"""Image encoding for a distributed TI2V job: one rank asks the VAE, every rank gets the latent.

Like `BroadcastTextEncoding`: the VAE (service or in-process) sees the first image once, and
`StepVideoPipeline` calls the same `encode(video, seed)` on every rank.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from mindspore import Tensor

from stepvideo.parallel.collectives import Collectives
from stepvideo.diffusion.interfaces import VideoEncoding


class BroadcastImageEncoding(VideoEncoding):
    """Rank `src` encodes with `encoder` (other ranks pass None); the latents are broadcast to all ranks."""

    def __init__(self, encoder: Optional[VideoEncoding], collectives: Collectives, src: int = 0):
        is_src = collectives.mesh.rank == src
        if is_src and encoder is None:
            raise ValueError(f"BroadcastImageEncoding: rank {src} encodes, so it needs a VAE encoder")
        self.encoder = encoder if is_src else None
        self.collectives = collectives
        self.src = src

    def __repr__(self) -> str:
        return f"BroadcastImageEncoding(src={self.src}, encoder={self.encoder!r})"

    def encode(self, video: np.ndarray, seed: int = 0) -> np.ndarray:
        mine = None
        if self.encoder is not None:
            latents = np.asarray(self.encoder.encode(video, seed=seed), np.float32)
            mine = {"latents": Tensor.from_numpy(np.ascontiguousarray(latents))}
        return self.collectives.broadcast(mine, self.src)["latents"].asnumpy()
