"""`step`: one denoising step of `StepVideoPipeline`, and the share of it spent outside the DiT."""
from __future__ import annotations

import statistics
import time
from typing import List

import numpy as np

from benchmark.dit import build_dit
from benchmark.flops import DitShape
from benchmark.measure import sync, table


class FixedCaption:
    """Fixed caption embeddings in the shapes of the services (77 CLIP + 320 LLM tokens)."""

    def __init__(self, llm_channels: int, clip_channels: int, llm_valid: int):
        self.llm_channels, self.clip_channels, self.llm_valid = llm_channels, clip_channels, llm_valid

    def encode(self, prompts):
        from stepvideo.diffusion.interfaces import CaptionOutput
        rng = np.random.default_rng(0)
        b = len(prompts)
        mask = np.zeros((b, 77 + 320), np.int64)
        mask[:, :77 + self.llm_valid] = 1
        return CaptionOutput(y=rng.standard_normal((b, 320, self.llm_channels), dtype=np.float32), y_mask=mask,
                             clip_embedding=rng.standard_normal((b, 77, self.clip_channels), dtype=np.float32))


class TimedTransformer:
    """The DiT with the wall time of every call recorded (the output is synced before the clock stops)."""

    def __init__(self, model):
        self.model = model
        self.seconds: List[float] = []

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def __call__(self, **kwargs):
        t = time.perf_counter()
        out = self.model(**kwargs)
        sync(out)
        self.seconds.append(time.perf_counter() - t)
        return out


def run(args) -> str:
    """`step`: the wall time of a denoising step outside the DiT call (pipeline + scheduler overhead)."""
    from stepvideo import backend
    from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
    from stepvideo.diffusion.video_pipeline import StepVideoPipeline

    backend.init("cpu")
    if args.quick:
        layers, heads, size, steps = 1, 2, 128, 3
    else:
        layers, heads, size, steps = 4, 8, 416, 1 + args.repeats
    s = DitShape(layers=layers, heads=heads, head_dim=128, batch=2, video_tokens=3 * (size // 16) ** 2,
                 text_tokens=77 + 64, llm_channels=256, clip_channels=128)
    model = build_dit(s)
    model.set_jit(not args.quick)
    dit = TimedTransformer(model)
    pipe = StepVideoPipeline(dit, FlowMatchDiscreteScheduler(), text_encoding=FixedCaption(256, 128, llm_valid=64))
    ends: List[float] = []
    pipe(prompt="a cat", height=size, width=size, num_frames=17, num_inference_steps=steps, guidance_scale=9.0,
         output_type="latent", seed=0, progress=False, callback=lambda i, _: ends.append(time.perf_counter()))
    # Step i >= 1 runs from the end of step i-1 to the end of step i (step 0 also compiles).
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    dit_s = dit.seconds[1:]
    outside = [st - dt for st, dt in zip(step_s, dit_s)]
    med_step, med_out = statistics.median(step_s), statistics.median(outside)
    rows = [[f"{s.layers} x {s.heads}x{s.head_dim}{' (jit)' if not args.quick else ''}",
             f"17 x {size} x {size} -> {s.video_tokens} tokens, CFG batch 2", len(step_s), f"{med_step:.3f}",
             f"{statistics.median(dit_s):.3f}", f"{med_out * 1e3:.1f}", f"{med_out / med_step:.2%}"]]
    text = table(["DiT", "video", "steps timed", "median step s", "median DiT s", "outside the DiT ms",
                  "outside share"], rows)
    return text + ("\n\nOne `StepVideoPipeline` denoising step (CFG batch, guidance 9, scheduler step in fp32) with "
                   "in-process stub text embeddings; 'outside' = step wall time - DiT call wall time (first step "
                   "excluded). Target: <= 2%.")
