"""What one request may ask of a service (`Limits`) and how its memory is estimated (`Costs`).

    limits = Limits(max_body_bytes=64 * 2**20, max_memory_bytes=int(24e9))

Light to import (no web framework): `api/call_remote_server.py` reads the defaults for its flags
before the port is taken. The app (`stepvideo.serving.server`) enforces them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stepvideo.serving import wire
from stepvideo.serving.costs import CaptionCost, VaeCost

# A 204-frame 544x992 video has latents (1, 36, 64, 34, 62): 19.4 MB in float32.
DEFAULT_MAX_BODY_MB = 64.0


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and how long and how many may be in flight.

    Latents: the largest video the model makes is 204 frames at 992 x 992 (or 544 x 992),
    latents (1, 36, 64, 62, 62); the limits admit 1.5x its frames (T <= 54: 306 frames) and
    1024-pixel sides (h, w <= 64), batch 4. Within those, `max_memory_bytes` bounds what a
    request may make the model hold (`stepvideo.serving.costs`; None: not checked).
    """

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_prompts: int = 64
    max_prompt_chars: int = 16384
    max_batch: int = 4
    max_latent_frames: int = 54  # T; 3 latents decode to 17 frames
    max_latent_side: int = 64  # h and w; 16 pixels each
    max_latent_elements: int = 16 * 2**20  # b*T*64*h*w; the 204 x 992 x 992 video has 8.9M
    max_waiting: int = 32  # requests queued for the model; more get 503 (each holds its body in memory)
    max_memory_bytes: Optional[int] = None  # what one request may make the model hold (weights included)
    body_timeout_s: float = 60.0  # the whole body must arrive within this, or 408
    max_connections: int = 32  # open connections; more get 503
    shutdown_grace_s: float = 30.0  # after SIGTERM: how long the running job may still take
    # VAE encode (TI2V's first image; one frame is the usual request). Its cost grows with
    # b*frames*H*W like a decode's with its output.
    max_video_frames: int = 17 * 18  # as max_latent_frames (54 latents) in frames
    max_video_side: int = 16 * 64  # H and W, as max_latent_side in pixels
    max_video_elements: int = 32 * 2**20  # b*frames*3*H*W

    def videos_spec(self) -> wire.TensorSpec:
        return wire.TensorSpec("videos", ("b", "frames", "c", "H", "W"), ("F32", "BF16", "F16"),
                               sizes=(None, None, 3, None, None),
                               max_sizes=(self.max_batch, self.max_video_frames, None,
                                          self.max_video_side, self.max_video_side))

    def samples_spec(self, channels: int) -> wire.TensorSpec:
        return wire.TensorSpec("samples", ("b", "T", "c", "h", "w"), ("F32", "BF16", "F16"),
                               sizes=(None, None, channels, None, None),
                               max_sizes=(self.max_batch, self.max_latent_frames, None,
                                          self.max_latent_side, self.max_latent_side))


@dataclass(frozen=True)
class Costs:
    """How to estimate each endpoint's memory from a request (None: that endpoint is not costed)."""

    vae: Optional[VaeCost] = None
    caption: Optional[CaptionCost] = None
