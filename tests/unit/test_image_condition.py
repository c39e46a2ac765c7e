"""TI2V's first-image preparation: the antialiased bilinear resize, the cover size, the condition latent.

The golden ti2v_pipeline images are only enlarged; shrinking (where antialiasing matters) is checked
against Pillow's own bilinear resize of float images, the filter torch's antialiased interpolation
was ported from.
"""
import numpy as np
import pytest
from PIL import Image

from stepvideo.diffusion.image_condition import (condition_latents, cover_size, load_image, resize_and_crop,
                                                 resize_bilinear_aa)


@pytest.mark.parametrize("height, width", [(40, 50), (200, 60), (97, 20), (13, 133)])
def test_resize_matches_pillow_when_shrinking_and_enlarging(height, width):
    img = np.random.default_rng(0).uniform(-1, 1, (3, 97, 133)).astype(np.float32)
    ours = resize_bilinear_aa(img, height, width)
    pil = np.stack([np.asarray(Image.fromarray(ch, mode="F").resize((width, height), Image.BILINEAR)) for ch in img])
    assert ours.shape == (3, height, width) and ours.dtype == np.float32
    assert np.abs(ours - pil).max() <= 1e-5


def test_halving_averages_with_the_widened_triangle():
    """4 -> 2 pixels: support 2, weights (0.75, 0.75, 0.25) / 1.75 around centre 1.0, mirrored for pixel 1."""
    row = np.array([[[1.0, 2.0, 4.0, 8.0]]], np.float32)
    out = resize_bilinear_aa(row, 1, 2)
    np.testing.assert_allclose(out[0, 0], [(0.75 * 1 + 0.75 * 2 + 0.25 * 4) / 1.75,
                                           (0.25 * 2 + 0.75 * 4 + 0.75 * 8) / 1.75], rtol=1e-6)


def test_cover_size_and_centre_crop():
    assert cover_size((37, 70), 48, 64) == (48, 91)  # wider than the video: fit the height
    assert cover_size((61, 50), 32, 80) == (98, 80)  # taller: fit the width
    img = np.arange(3 * 20 * 20, dtype=np.float32).reshape(3, 20, 20)
    out = resize_and_crop(img, 20, 10)  # same height: no resize, keep columns 5..14
    np.testing.assert_array_equal(out, img[:, :, 5:15])


def test_condition_latent_has_the_image_in_frame_zero_only():
    latent = np.random.default_rng(1).standard_normal((1, 1, 4, 2, 3)).astype(np.float32)
    cond = condition_latents(latent, batch=3, latent_frames=5)
    assert cond.shape == (3, 5, 4, 2, 3)
    for row in cond:
        np.testing.assert_array_equal(row[0], latent[0, 0])
        assert not row[1:].any()
    with pytest.raises(ValueError, match=r"expected shape \(1, 1, c, h, w\)"):
        condition_latents(latent[:, [0, 0]], 1, 5)


def test_load_image_inputs_and_errors(tmp_path):
    pixels = np.array([[[0, 255, 51]]], np.uint8)
    np.testing.assert_allclose(load_image(pixels)[:, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
    Image.fromarray(pixels).convert("L").save(tmp_path / "grey.png")
    assert load_image(str(tmp_path / "grey.png")).shape == (3, 1, 1)  # converted to RGB
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"a float array must be \(3, H, W\)"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="finite"):
        load_image(np.full((3, 2, 2), np.nan, np.float32))
    with pytest.raises(TypeError, match="expected a path, a PIL image or an array"):
        load_image(42)
