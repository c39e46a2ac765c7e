"""Text encoding for a distributed job: one rank asks the caption encoder, every rank gets the arrays.

The caption service (or the in-process encoder) is expensive and must see each
prompt once, not once per rank; `BroadcastTextEncoding` has the same `encode`
method as the encoders, so `StepVideoPipeline` uses it unchanged on every rank.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from mindspore import Tensor

from stepvideo.diffusion.interfaces import CaptionOutput, TextEncoding
from stepvideo.parallel.one_rank import OnOneRank


class TextEncodingFailed(RuntimeError):
    """The caption encoder failed for these prompts (raised on every rank of the job)."""


class BroadcastTextEncoding(OnOneRank, TextEncoding):
    """Rank `src` encodes with `encoder` (other ranks pass None); the arrays are broadcast to all ranks."""

    def encode(self, prompts: Sequence[str]) -> CaptionOutput:
        """Every rank gets the arrays; if rank `src` fails to encode, every rank raises TextEncodingFailed.

        A failure is broadcast as an empty set of arrays, so the ranks stay in step and
        the job can go on with its next prompt.
        """
        mine, failure = None, None
        if self.encoder is not None:
            try:
                out = self.encoder.encode(prompts)
                mine = {name: Tensor.from_numpy(np.ascontiguousarray(arr)) for name, arr in out.as_dict().items()}
            except Exception as e:  # noqa: BLE001 - told to every rank below, then raised here
                mine, failure = {}, e
        got = self.collectives.broadcast(mine, self.src)
        if failure is not None:
            raise TextEncodingFailed(f"{type(failure).__name__}: {failure}") from failure
        if not got:
            raise TextEncodingFailed(f"rank {self.src} could not encode the prompt (its log says why)")
        return CaptionOutput(y=got["y"].asnumpy(), y_mask=got["y_mask"].asnumpy(),
                             clip_embedding=got["clip_embedding"].asnumpy())
