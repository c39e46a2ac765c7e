"""Request cost estimates (stepvideo/serving/costs.py) and the latent limits.

The published-VAE numbers are checked against the hand arithmetic of docs/vae_memory.md;
the CPU estimate of the tiny VAE against a measured decode in a fresh process.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepvideo.serving import wire
from stepvideo.serving.costs import GB, CaptionCost, Estimate, OverBudget, VaeCost, check_budget
from stepvideo.serving.server import Limits

ROOT = Path(__file__).resolve().parents[2]


class PublishedVae:
    """The published VaeConfig's numbers (stepvideo/vae/vae.py defaults), without importing MindSpore."""
    decoder_ch, decoder_ch_mult, temporal_up_layers = 128, (1, 2, 4, 4), (2, 3)

    @staticmethod
    def patch_width(z):
        return 4 * z * 8


def test_published_decode_matches_the_documented_arithmetic():
    """544 x 992 x 204 in bf16 on Ascend: docs/vae_memory.md's worst step, x + silu + P1 of up.0.block.0."""
    cost = VaeCost.from_config(PublishedVae, z_channels=64, itemsize=2, weights_bytes=10**9, on_cpu=False)
    est = cost.decode((1, 36, 64, 34, 62))
    pixels = 544 * 992
    worst = 2 * pixels * (256 * 20 + 256 * 20 + 256 * 22)  # S1 + silu(S1) + P1, bf16
    assert est.parts["activations of one chunk"] == worst
    assert round(worst / GB, 1) == 17.1
    assert est.parts["output"] == 204 * 3 * pixels * 4  # float32 video
    assert "CPU workspaces" not in est.parts
    assert est.bytes == sum(est.parts.values())


def test_published_encode_counts_the_input_and_grows_with_the_frames():
    """TI2V's first image (one 544 x 992 frame) against a 17-frame chunk, bf16 on Ascend."""
    cost = VaeCost.from_config(PublishedVae, z_channels=64, itemsize=2, weights_bytes=10**9, on_cpu=False)
    image, chunk = cost.encode((1, 1, 3, 544, 992)), cost.encode((1, 17, 3, 544, 992))
    assert image.parts["input"] == 544 * 992 * 3 * 4  # float32 pixels
    assert chunk.parts["input"] == 17 * 544 * 992 * 3 * 4
    assert image.parts["weights"] == chunk.parts["weights"] == 10**9
    assert chunk.parts["activations of one chunk"] > 2 * image.parts["activations of one chunk"]
    with pytest.raises(OverBudget, match=r"encoding videos of shape \(1, 17, 3, 544, 992\)"):
        check_budget(chunk, image.bytes)


def test_limits_admit_the_largest_video_with_margin_and_no_more():
    limits = Limits()
    spec = limits.samples_spec(64)
    for shape in [(1, 36, 64, 62, 62), (1, 36, 64, 34, 62), (1, 54, 64, 64, 64), (4, 12, 64, 34, 62)]:
        spec.check("F32", list(shape))
        assert np.prod(shape) <= limits.max_latent_elements, shape
    z = np.zeros((1, 36, 64, 62, 62), np.float32)
    assert wire.encode_parts({"samples": z})[0] <= limits.max_body_bytes
    for shape, axis in [((5, 3, 64, 2, 2), "b"), ((1, 55, 64, 2, 2), "T"), ((1, 3, 64, 65, 2), "h"),
                        ((1, 3, 64, 2, 65), "w")]:
        with pytest.raises(wire.WireError, match=f"axis {axis} has size"):
            spec.check("F32", list(shape))


def test_over_budget_names_the_estimate_and_the_limit():
    est = Estimate("decoding latents of shape (1, 3, 64, 32, 32)", {"weights": 10**7, "activations of one chunk": 8 * 10**9})
    check_budget(est, 9 * 10**9)
    with pytest.raises(OverBudget) as e:
        check_budget(est, 4 * 10**9)
    assert str(e.value) == ("decoding latents of shape (1, 3, 64, 32, 32) needs about 8.01 GB (weights 0.01, "
                            "activations of one chunk 8.00), more than this service's limit of 4.00 GB "
                            "(server option --max_memory_gb)")


def test_caption_cost_grows_with_the_prompts():
    cost = CaptionCost(llm_hidden=6144, llm_ffn=16384, llm_heads=48, clip_hidden=1024, clip_ffn=4096, clip_heads=16,
                       itemsize=2, weights_bytes=2 * 10**10)
    one, many = cost.encode(1), cost.encode(64)
    assert one.parts["weights"] == many.parts["weights"] == 2 * 10**10
    assert many.parts["activations"] == 64 * one.parts["activations"]
    assert one.parts["outputs"] == 320 * 6144 * 4 + 397 * 8 + 77 * 1024 * 4


_MEASURE = r"""
import json, resource, sys
import numpy as np
from mindspore import Tensor
from stepvideo import backend
from stepvideo.checkpoint import named_parameters
from stepvideo.serving.costs import VaeCost
from stepvideo.vae.vae import AutoencoderKL, VaeConfig

backend.init("cpu")
vae = AutoencoderKL(config=VaeConfig.tiny())
rng = np.random.default_rng(0)  # the values do not change the memory
for param in named_parameters(vae).values():
    param.set_data(Tensor.from_numpy((0.02 * rng.standard_normal(param.shape)).astype(np.float32)))
weights = sum(p.nbytes for p in named_parameters(vae).values())
vae.decode(np.zeros((1, 1, 64, 1, 1), np.float32))  # the runtime's own start-up allocations
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize()
# Reset the peak: ru_maxrss would also count the forking parent's RSS (the test runner's, which
# exec keeps as the child's high-water mark), not only this process's own decode.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
shape = tuple(json.loads(sys.argv[1]))
vae.decode(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
est = VaeCost.from_config(vae.config, z_channels=64, itemsize=4, weights_bytes=weights, on_cpu=True).decode(shape)
print(json.dumps({"growth": peak - before, "estimate": est.bytes - weights}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 64, 16, 16), (1, 3, 64, 8, 8)])
def test_cpu_estimate_bounds_a_measured_tiny_decode(shape):
    """The estimate (minus the already-loaded weights) is at least the measured RSS growth, and not 2x over."""
    done = subprocess.run(["prlimit", "--as=6000000000", sys.executable, "-c", _MEASURE, json.dumps(shape)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "GLOG_v": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{shape}: measured growth {r['growth'] / 2**20:.0f} MiB, estimate {r['estimate'] / 2**20:.0f} MiB")
    assert r["growth"] <= r["estimate"] <= 2 * r["growth"]
