"""AutoencoderKL v2 against the golden fixtures of the original (vae d0, d1, e0).

The fixture VAE is the full published architecture (~499M parameters) with weights made by
the golden generation rule, keyed by the checkpoint-file names. They are written to a
temporary `vae_v2.safetensors` and loaded through `AutoencoderKL(model_path=...)`, so the key
names and the `decoder.conv_out` rename are proven along with the numbers.
"""
import json
import math

import numpy as np
import pytest
from mindspore import Tensor

from ascend_standins import kernel_table  # noqa: F401 (fixture: golden cases with the CPU and the Ascend table)
from stepvideo.checkpoint import named_parameters
from stepvideo.diffusion.interfaces import LocalVae
from stepvideo.utils import safetensors_io as st
from synthetic_weights import rule_kind, rule_seed, rule_weights
from stepvideo.vae.vae import CHECKPOINT_FILE, AutoencoderKL, DiagonalGaussianDistribution
from support import assert_parity, golden, load

# Generating 2 GB of weights, loading them and three full-size decoder/encoder runs take ~40 s.
pytestmark = pytest.mark.slow

MANIFEST = json.loads((golden("vae") / "weights_manifest.json").read_text())
MID = ["mid_block_1_in", "mid_block_1_out", "mid_attn_1_out", "mid_block_2_out"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path of the generated vae_v2.safetensors, per-key statistics of what was written)."""
    weights = rule_weights({e["key"]: e["shape"] for e in MANIFEST["tensors"]}, salt=MANIFEST["salt"])
    stats = {k: (list(w.shape), float(w.sum(dtype=np.float64)), float(np.abs(w).sum(dtype=np.float64)),
                 w.reshape(-1)[:4].tolist()) for k, w in weights.items()}
    path = tmp_path_factory.mktemp("vae") / CHECKPOINT_FILE
    st.save_file(path, weights)
    return path, stats


@pytest.fixture(scope="module")
def vae(checkpoint):
    return AutoencoderKL(z_channels=64, model_path=checkpoint[0], version=2)


@pytest.fixture(scope="module")
def fixtures():
    return load("vae", "inputs"), load("vae", "outputs")


def test_generated_weights_match_the_manifest(checkpoint):
    _, stats = checkpoint
    assert set(stats) == {e["key"] for e in MANIFEST["tensors"]}
    for e in MANIFEST["tensors"]:
        shape, total, abs_total, first4 = stats[e["key"]]
        assert shape == e["shape"], e["key"]
        assert rule_seed(e["key"], MANIFEST["salt"]) == e["seed"] and rule_kind(e["key"], shape) == e["rule"], e["key"]
        assert first4 == e["first4"], e["key"]
        assert math.isclose(total, e["sum"], rel_tol=1e-9, abs_tol=1e-6), (e["key"], total, e["sum"])
        assert math.isclose(abs_total, e["abs_sum"], rel_tol=1e-9), (e["key"], abs_total, e["abs_sum"])


def test_checkpoint_keys_and_the_conv_out_rename(checkpoint, vae):
    path, _ = checkpoint
    with st.SafetensorsFile(path) as f:
        keys = set(f.keys())
        stored_conv_out = f.read("decoder.conv_out.weight")
    assert {"decoder.conv_out.weight", "decoder.conv_out.bias"} <= keys
    assert not any(k.startswith("decoder.conv_out.conv.") for k in keys)
    params = named_parameters(vae)
    assert len(params) == len(keys) == 262
    np.testing.assert_array_equal(params["decoder.conv_out.conv.weight"].asnumpy(), stored_conv_out)
    assert sum(math.prod(p.shape) for p in params.values()) == 498_818_819


def test_decode_d0_intermediates_and_video(vae, fixtures, kernel_table):
    """One chunk of 3 latents -> 17 frames; the decoder's mid-block stages one by one."""
    inputs, outputs = fixtures
    z = Tensor(inputs["d0.z"])
    h = vae.decoder.unpatchify(z)
    assert_parity(h, outputs["d0.mid_block_1_in"], "d0.mid_block_1_in")
    for name, stage in zip(MID[1:], [vae.decoder.mid.block_1, vae.decoder.mid.attn_1, vae.decoder.mid.block_2]):
        h = stage(h)
        assert_parity(h, outputs[f"d0.{name}"], f"d0.{name}")
    video = vae.decode(z)
    assert video.dtype == Tensor(np.zeros(1, np.float32)).dtype
    assert_parity(video, outputs["d0.video"], "d0.video")
    assert_parity(video, outputs["d0.video_before_mix"], "d0.video_before_mix (one chunk: nothing to mix)")


def test_decode_d1_two_chunks_and_mix(vae, fixtures):
    """6 latents -> two chunks of 17 frames, blended at frames 16/17. (With the device's table only: the
    chunks run d0's kernels, and the mix is host arithmetic.)"""
    inputs, outputs = fixtures
    before = vae.decode_chunks(inputs["d1.z"])
    assert_parity(before, outputs["d1.video_before_mix"], "d1.video_before_mix")
    video = vae.mix(before.copy())
    assert_parity(video, outputs["d1.video"], "d1.video")
    # Mixing the reference's own chunks must give the reference's video almost exactly.
    assert_parity(vae.mix(outputs["d1.video_before_mix"].copy()), outputs["d1.video"], "d1 mix of reference chunks",
                  tol=1e-6)


def test_encode_e0_moments_posterior_and_intermediates(vae, fixtures):
    """(With the device's table only: the encoder reaches the Ascend table only through the mid-block's
    AttnBlock, the same call d0 runs with both tables; a second full encode costs ~20 s of CPU.)"""
    inputs, outputs = fixtures
    x = Tensor(inputs["e0.video"])
    h = vae.encoder.down_blocks(x.transpose(0, 2, 1, 3, 4).contiguous())
    assert_parity(h, outputs["e0.mid_block_1_in"], "e0.mid_block_1_in")
    for name, stage in zip(MID[1:], [vae.encoder.mid.block_1, vae.encoder.mid.attn_1, vae.encoder.mid.block_2]):
        h = stage(h)
        assert_parity(h, outputs[f"e0.{name}"], f"e0.{name}")
    assert_parity(vae.encoder.head(h), outputs["e0.moments"], "e0.moments (encoder head)")

    moments = vae.encode_moments(x)
    assert_parity(moments, outputs["e0.moments"], "e0.moments")
    posterior = DiagonalGaussianDistribution(moments)
    assert_parity(posterior.mean, outputs["e0.mean"], "e0.mean")
    assert_parity(posterior.std, outputs["e0.std"], "e0.std")
    sample = vae.encode(x, noise=outputs["e0.noise"])
    assert_parity(sample, outputs["e0.sample"], "e0.sample")
    assert_parity(vae.encode(x, only_return_mean=True), outputs["e0.mean"], "e0.mean (only_return_mean)")


def test_image_encode_as_the_services_run_it(vae, fixtures):
    """TI2V's image encode: `LocalVae.encode` (what the VAE service runs) is the fixture's mean + std * noise,
    with the noise drawn from the seed; one frame (an image) gives latent frame 0 of the 17-frame chunk,
    because the encoder is causal in time."""
    inputs, outputs = fixtures
    local, seed = LocalVae(vae), 7
    shape = outputs["e0.mean"].shape
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    assert_parity(local.encode(inputs["e0.video"], seed=seed), outputs["e0.mean"] + outputs["e0.std"] * noise,
                  "e0 sample (LocalVae.encode)")
    image = inputs["e0.video"][:, :1]
    noise = np.random.default_rng(seed).standard_normal((1, 1) + shape[2:], dtype=np.float32)
    assert_parity(local.encode(image, seed=seed), outputs["e0.mean"][:, :1] + outputs["e0.std"][:, :1] * noise,
                  "e0 frame 0 alone (1-frame image encode)")
