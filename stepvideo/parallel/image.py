"""Image encoding for a distributed TI2V job: one rank asks the VAE, every rank gets the latent.

Like `BroadcastTextEncoding`: the VAE (service or in-process) sees the first image once, and
`StepVideoPipeline` calls the same `encode(video, seed)` on every rank.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from stepvideo.diffusion.interfaces import VideoEncoding
from stepvideo.parallel.one_rank import OnOneRank


class BroadcastImageEncoding(OnOneRank, VideoEncoding):
    """Rank `src` encodes with `encoder` (other ranks pass None); the latents are broadcast to all ranks."""

    needs = "a VAE encoder"

    def __repr__(self) -> str:
        return f"BroadcastImageEncoding(src={self.src}, encoder={self.encoder!r})"

    def encode(self, video: np.ndarray, seed: int = 0) -> np.ndarray:
        mine = None
        if self.encoder is not None:
            latents = np.asarray(self.encoder.encode(video, seed=seed), np.float32)
            mine = {"latents": Tensor.from_numpy(np.ascontiguousarray(latents))}
        return self.collectives.broadcast(mine, self.src)["latents"].asnumpy()
