"""A tiny AutoencoderKL v2 (VaeConfig.tiny(), z = 64) built from a folder like the demo's:
chunking and shapes, the boundary mix, causality, the posterior's noise, errors."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from stepvideo.checkpoint import CheckpointError, named_parameters
from stepvideo.utils import safetensors_io as st
from synthetic_weights import rule_weights
from stepvideo.vae.vae import CHECKPOINT_FILE, AutoencoderKL, DiagonalGaussianDistribution, VaeConfig
from support import assert_parity

Z = 64


def write_tiny_folder(folder, salt="tiny-vae-test:"):
    """config.json + vae_v2.safetensors keyed as the published file (decoder.conv_out.* not .conv.*)."""
    config = VaeConfig.tiny()
    shapes = {k: tuple(p.shape) for k, p in named_parameters(AutoencoderKL(config=config)).items()}
    weights = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): w for k, w in rule_weights(shapes, salt).items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_comment": "tiny", "z_channels": Z, **config.to_dict()}))
    st.save_file(folder / CHECKPOINT_FILE, weights)
    return folder


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return AutoencoderKL.from_pretrained(write_tiny_folder(tmp_path_factory.mktemp("tiny") / "vae"))


def latents(t, h=2, w=2, seed=0):
    return np.random.default_rng(seed).standard_normal((1, t, Z, h, w)).astype(np.float32)


def video(frames, h=32, w=32, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (1, frames, 3, h, w)).astype(np.float32)


# ----------------------------------------------------------------------------- building


def test_from_pretrained_reads_the_tiny_config(vae):
    assert vae.config == VaeConfig.tiny()
    assert vae.decoder.conv_in.conv.weight.shape == (128, Z, 3, 3, 3)
    assert VaeConfig.from_dict(VaeConfig.tiny().to_dict()) == VaeConfig.tiny()


def test_default_config_is_the_published_v2():
    cfg = VaeConfig()
    assert (cfg.encoder_ch, cfg.encoder_ch_mult, cfg.down_sampling_layer) == (32, (4, 8, 16, 16), (1, 2))
    assert (cfg.decoder_ch, cfg.decoder_ch_mult, cfg.temporal_up_layers) == (128, (1, 2, 4, 4), (2, 3))
    assert (cfg.temporal_downsample, cfg.num_groups, cfg.patch_width(64)) == (4, 32, 2048)


def test_bad_configs_and_versions_are_rejected(tmp_path):
    with pytest.raises(NotImplementedError, match="version=1"):
        AutoencoderKL(version=1)
    with pytest.raises(ValueError, match="num_groups=32 must divide"):
        VaeConfig(encoder_ch=8)
    with pytest.raises(ValueError, match="temporal_up_layers"):
        VaeConfig(temporal_up_layers=(3,))
    with pytest.raises(ValueError, match="unknown field"):
        VaeConfig.from_dict({"encoder_chs": 8})
    with pytest.raises(CheckpointError, match=CHECKPOINT_FILE):
        AutoencoderKL.from_pretrained(tmp_path)


def test_a_checkpoint_without_the_rename_is_refused(tmp_path):
    folder = write_tiny_folder(tmp_path / "vae")
    weights = st.load_file(folder / CHECKPOINT_FILE)
    weights["decoder.conv_out.conv.weight"] = weights.pop("decoder.conv_out.weight")
    st.save_file(folder / CHECKPOINT_FILE, weights)
    with pytest.raises(CheckpointError, match="decoder.conv_out"):
        AutoencoderKL.from_pretrained(folder)


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("t,frames", [(3, 17), (6, 34), (12, 68), (1, 1), (4, 18), (5, 26), (8, 43)])
def test_decode_shapes(vae, t, frames):
    """n latents per chunk -> 8n - 7 frames; chunks of 3 (1, 2 and 4 chunks; a shorter last chunk)."""
    out = vae.decode(latents(t, 1, 2))
    assert out.shape == (1, frames, 3, 16, 32)
    assert np.isfinite(out.asnumpy()).all()


def test_chunks_are_decoded_independently_then_mixed(vae):
    z = latents(8)
    chunks = vae.decode_chunks(z)
    assert chunks.shape == (1, 43, 3, 32, 32) and chunks.dtype == np.float32
    for start, (a, b) in zip((0, 3, 6), ((0, 17), (17, 34), (34, 43))):
        alone = vae.decode_chunks(z[:, start:start + 3])
        np.testing.assert_array_equal(chunks[:, a:b], alone, err_msg=f"chunk at latent {start}")
    np.testing.assert_array_equal(vae.decode(Tensor(z)).asnumpy(), vae.mix(chunks.copy()))


def test_decoding_is_causal_in_time(vae):
    """The first 8n - 7 frames of a chunk depend only on its first n latents."""
    z = latents(3, seed=3)
    full = vae.decode_chunks(z)
    for n in (1, 2):
        assert_parity(vae.decode_chunks(z[:, :n]), full[:, :8 * n - 7], f"first {n} latents", tol=1e-5)


def test_mix_order():
    """back = 0.6 back + 0.4 front first; then front = 0.6 front + 0.4 * (the new back)."""
    frames = 17 * 3 + 1  # three boundaries: 16|17, 33|34, 50|51
    x = np.zeros((2, frames, 3, 1, 1), np.float32)
    x[:, 16::17] = 1.0  # every front frame (the last frame of a chunk) is 1, every back frame 0
    expected = x.copy()
    for front in (16, 33, 50):
        expected[:, front + 1] = 0.4  # 0.6 * 0 + 0.4 * 1
        expected[:, front] = 0.6 + 0.4 * 0.4
    out = AutoencoderKL.mix(x)
    assert out is x
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    single = np.ones((1, 17, 3, 1, 1), np.float32)
    np.testing.assert_array_equal(AutoencoderKL.mix(single.copy()), single)


def test_decode_input_errors(vae):
    with pytest.raises(ValueError, match=r"z must be \(b, T, 64, h, w\), got shape \(3, 64, 2, 2\)"):
        vae.decode(latents(3)[0])
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 16, 2, 2\)"):
        vae.decode(np.zeros((1, 3, 16, 2, 2), np.float32))


# ----------------------------------------------------------------------------- encode


@pytest.mark.parametrize("frames,t", [(17, 3), (34, 6), (18, 4), (26, 5), (1, 1)])
def test_encode_shapes(vae, frames, t):
    out = vae.encode(video(frames, 16, 48), generator=0)
    assert out.shape == (1, t, Z, 1, 3)


def test_encoding_is_causal_in_time(vae):
    x = video(17, seed=5)
    full = vae.encode_moments(x).asnumpy()
    assert_parity(vae.encode_moments(x[:, :9]), full[:, :2], "first 9 frames -> first 2 latents", tol=1e-5)
    assert_parity(vae.encode_moments(x[:, :1]), full[:, :1], "first frame -> first latent", tol=1e-5)


def test_encode_noise_is_reproducible_from_a_seed(vae):
    x = video(17)
    moments = vae.encode_moments(x)
    posterior = DiagonalGaussianDistribution(moments)
    noise = np.random.default_rng(7).standard_normal((1, 3, Z, 2, 2), dtype=np.float32)
    expected = posterior.mean.asnumpy() + posterior.std.asnumpy() * noise
    a = vae.encode(x, generator=7).asnumpy()
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(vae.encode(x, generator=np.random.default_rng(7)).asnumpy(), a)
    np.testing.assert_array_equal(vae.encode(x, noise=noise).asnumpy(), a)
    assert not np.array_equal(vae.encode(x, generator=8).asnumpy(), a)
    np.testing.assert_array_equal(vae.encode(x, only_return_mean=True).asnumpy(), posterior.mean.asnumpy())
    np.testing.assert_array_equal(moments.asnumpy()[:, :, :Z], posterior.mean.asnumpy())


def test_posterior_clamps_the_log_variance():
    moments = np.zeros((1, 1, 2 * Z, 1, 1), np.float32)
    moments[:, :, Z:] = np.linspace(-100, 100, Z, dtype=np.float32).reshape(1, 1, Z, 1, 1)
    p = DiagonalGaussianDistribution(Tensor(moments))
    logvar = p.logvar.asnumpy().ravel()
    assert logvar.min() == -30.0 and logvar.max() == 20.0
    np.testing.assert_allclose(p.std.asnumpy().ravel(), np.exp(0.5 * logvar), rtol=1e-5)


def test_encode_input_errors(vae):
    with pytest.raises(ValueError, match="give a numpy generator, a seed or the noise"):
        vae.encode(video(17))
    with pytest.raises(ValueError, match=r"noise has shape \(1, 3, 64, 1, 1\); expected .*\(1, 3, 64, 2, 2\)"):
        vae.encode(video(17), noise=np.zeros((1, 3, Z, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"x must be \(b, frames, 3, H, W\), got shape \(1, 17, 4, 32, 32\)"):
        vae.encode(np.zeros((1, 17, 4, 32, 32), np.float32), generator=0)
    with pytest.raises(ValueError, match=r"x must be .*got shape \(17, 3, 32, 32\)"):
        vae.encode(video(17)[0], generator=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(video(17, 24, 32), generator=0)
    with pytest.raises(ValueError, match="a chunk of 5 frames cannot be encoded"):
        vae.encode(video(22), generator=0)
