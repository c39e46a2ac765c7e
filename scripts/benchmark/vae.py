"""`vae`: the VAE decoder, FLOPs counted by hooks on every conv/linear layer that runs."""
from __future__ import annotations

import numpy as np

from benchmark.measure import GemmReference, fill_synthetic, measure, table


class FlopCounter:
    """Counts 2 * out_elements * fan_in for every convolution / linear layer a forward runs.

    fan_in = weight.size / weight.shape[0] for conv (out, in, k...) and linear (out, in) weights alike.
    The VAE's mid-block attention (a few hundred tokens) and the norms are not counted.
    """

    def __init__(self, net):
        self.flops = 0.0
        self.handles = []
        for _, cell in net.cells_and_names():
            weight = getattr(cell, "weight", None)
            if weight is not None and len(weight.shape) >= 2 and not list(cell.cells()):
                self.handles.append(cell.register_forward_hook(self._hook))

    def _hook(self, cell, inputs, output):
        w = cell.weight
        self.flops += 2.0 * float(np.prod(output.shape)) * float(np.prod(w.shape[1:]))

    def remove(self):
        for h in self.handles:
            h.remove()


def run(args) -> str:
    """`vae`: one decode of the golden d0 case (3 latents -> 17 frames) against the GEMM rate."""
    from stepvideo import backend
    from stepvideo.vae.vae import AutoencoderKL, VaeConfig

    backend.init("cpu")
    config = VaeConfig.tiny() if args.quick else VaeConfig()
    vae = AutoencoderKL(config=config)
    nbytes = fill_synthetic(vae, skip=("encoder.",))  # only the decoder side runs
    z_shape = (1, 3, 64, 2, 2)  # the golden d0 case: one chunk of 3 latents -> 17 frames of 32x32
    z = np.random.default_rng(0).standard_normal(z_shape, dtype=np.float32)
    counter = FlopCounter(vae)
    video = vae.decode(z)
    flops, counter.flops = counter.flops, 0.0
    counter.remove()
    gemm = GemmReference()
    repeats = 2 if args.quick else args.repeats
    timing = measure(lambda: vae.decode(z), repeats=repeats, warmup=1, gemm=gemm)
    rate, ref = flops / timing.median, timing.best_gemm_rate(gemm)
    rows = [["published widths" if not args.quick else "tiny widths", f"{nbytes / 2**20:.0f}",
             f"{tuple(z_shape)} -> {tuple(video.shape)}", f"{flops / 1e9:.1f}", f"{timing.median:.3f}",
             f"{timing.best:.3f}", f"{rate / 1e9:.0f}", f"{ref / 1e9:.0f}", timing.fractions(flops, gemm)]]
    text = table(["VAE decoder", "decoder MiB (fp32)", "latents -> video", "GFLOP (conv + linear)", "median s",
                  "best s", "GFLOP/s (median)", "GEMM GFLOP/s (best, same run)",
                  "fraction of GEMM rate (median / best)"], rows)
    return text + (f"\n\nWeights by the golden rule generator (salt 'benchmark:'), pynative fp32, median of {repeats} "
                   "decodes after one warm-up. FLOPs are counted by hooks on every conv/linear layer that ran.")
