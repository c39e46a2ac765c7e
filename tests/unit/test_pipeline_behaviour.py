"""StepVideoPipeline behaviour beyond the golden loop: inputs, guidance, batches, noise, mp4 output.

Runs the real tiny checkpoint with the text encoders and the VAE in process.
"""
import logging

import numpy as np
import pytest

from stepvideo.diffusion.video_pipeline import StepVideoPipeline, round_to_bf16
from stepvideo.utils.video_process import read_mp4

SMALL = dict(height=32, width=48, num_frames=17, num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, tmp_path_factory):
    p = StepVideoPipeline.from_pretrained(tiny_model_dir, save_path=str(tmp_path_factory.mktemp("results")))
    return p.setup_local(tiny_model_dir)


class CountingText:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=0), "height must be a positive integer"),
    (dict(width=-16), "width must be a positive integer"),
    (dict(num_frames=2.5), "num_frames must be a positive integer"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list"),
    (dict(prompt=["ok", 3]), r"prompt\[1\] must be a string"),
    (dict(output_type="gif"), "output_type must be one of"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt must be a positive integer"),
])
def test_bad_inputs_fail_before_any_model_work(pipe, kwargs, message):
    counting = CountingText(pipe.text_encoding)
    pipe.text_encoding = counting
    try:
        args = dict(prompt="a cat", **SMALL)
        args.update(kwargs)
        with pytest.raises(ValueError, match=message):
            pipe(**args)
        assert counting.calls == [], "the text encoder must not run for bad input"
    finally:
        pipe.text_encoding = counting.inner


def test_rounding_of_sizes_is_announced(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        out = pipe("a cat", height=40, width=50, num_frames=20, num_inference_steps=1, output_type="latent",
                   seed=0, progress=False)
    assert out.video.shape == (1, 3, 64, 2, 3)
    assert "adjusted the video size from 20 frames 40x50 (HxW) to 17 frames 32x48" in caplog.text


def test_guidance_at_most_one_runs_without_the_negative_prompt(pipe):
    counting = CountingText(pipe.text_encoding)
    pipe.text_encoding = counting
    try:
        out = pipe("a cat", pos_magic="+", neg_magic="-", guidance_scale=1.0, seed=3, output_type="latent",
                   progress=False, **SMALL)
    finally:
        pipe.text_encoding = counting.inner
    assert counting.calls == [["a cat+"]]
    assert out.video.shape == (1, 3, 64, 2, 3) and np.isfinite(out.video).all()


def test_prompt_lists_and_several_videos_per_prompt(pipe):
    counting = CountingText(pipe.text_encoding)
    pipe.text_encoding = counting
    try:
        out = pipe(["a cat", "a dog"], num_videos_per_prompt=2, seed=5, output_type="latent", progress=False,
                   **SMALL)
    finally:
        pipe.text_encoding = counting.inner
    assert counting.calls == [["a cat", "a dog", ""]], "each distinct text is encoded once"
    lat = out.video
    assert lat.shape == (4, 3, 64, 2, 3)
    # one noise draw per video: the two videos of a prompt differ
    assert not np.allclose(lat[0], lat[1])


def test_noise_comes_from_numpy_and_is_reproducible(pipe):
    shape = (1, 3, 64, 2, 3)
    noise = pipe.prepare_latents(shape, seed=11)
    expected = round_to_bf16(np.random.default_rng(11).standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(noise, expected)
    a = pipe("a cat", seed=11, output_type="latent", progress=False, **SMALL).video
    b = pipe("a cat", generator=np.random.default_rng(11), output_type="latent", progress=False, **SMALL).video
    np.testing.assert_array_equal(a, b)


def test_mp4_output_is_written_and_readable(pipe):
    out = pipe("a cat / on grass", seed=1, progress=False, output_file_name="a cat / on grass", **SMALL)
    (video,) = out.video  # one path per video
    frames, fps = read_mp4(video)
    assert frames.shape == (17, 32, 48, 3) and fps == 25.0
    assert "/" not in video.rsplit("/", 1)[-1].replace(".mp4", "")


def test_np_output_gives_the_uint8_frames(pipe):
    out = pipe("a cat", seed=1, progress=False, output_type="np", **SMALL)
    assert out.video.dtype == np.uint8 and out.video.shape == (17, 32, 48, 3)
