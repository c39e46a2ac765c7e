"""Work done on one rank and broadcast to every rank of the job (the caption and image encodes).

The caption service or the VAE must see each request once, not once per rank; the
subclasses (`BroadcastTextEncoding`, `BroadcastImageEncoding`) keep the encoder's own
`encode` signature, so `StepVideoPipeline` calls them unchanged on every rank.
"""
from __future__ import annotations

from typing import Optional

from stepvideo.parallel.collectives import Collectives


class OnOneRank:
    """Rank `src` holds `encoder` (other ranks pass None and hold None); `collectives` broadcasts its result.

    `needs` names what rank `src` must be given, for the error when it is missing.
    """

    needs = "an encoder"

    def __init__(self, encoder: Optional[object], collectives: Collectives, src: int = 0):
        is_src = collectives.mesh.rank == src
        if is_src and encoder is None:
            raise ValueError(f"{type(self).__name__}: rank {src} encodes, so it needs {self.needs}")
        self.encoder = encoder if is_src else None
        self.collectives = collectives
        self.src = src
