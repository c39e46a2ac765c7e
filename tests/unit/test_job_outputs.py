"""What a job leaves behind: latents before decoding, one mp4 per video, the 540p crop per video,
--decode_latents, --prompt_file, --preset, and the stop before loading when a service is missing.

Runs the real tiny checkpoint in process; a failing decode is a real one (the VAE URL has nothing
listening), so the latents must survive it and decode later, in a plain process, to the same video.
"""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from stepvideo.config import load_presets, parse_args
from stepvideo.diffusion.video_pipeline import StepVideoPipeline, VideoOutputError
from stepvideo.job import StartupError, read_prompts
from stepvideo.serving.client import RemoteVae
from stepvideo.utils import safetensors_io as st
from stepvideo.utils.video_process import read_mp4, video_frames, write_mp4
from support import ROOT

SMALL = dict(height=32, width=48, num_frames=17, num_inference_steps=1)


def _env() -> dict:
    return dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), STEPVIDEO_DEVICE="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, tmp_path_factory):
    p = StepVideoPipeline.from_pretrained(tiny_model_dir, save_path=str(tmp_path_factory.mktemp("results")),
                                          name_suffix="t")
    return p.setup_local(tiny_model_dir)


def test_540p_crop_applies_to_each_video():
    video = np.full((2, 1, 3, 544, 992), -1.0, np.float32)
    video[1] = 1.0
    video[0, :, :, 2:542, 16:976] = 0.0  # the centre 540x960 of the first video
    first, second = video_frames(video)
    assert first.shape == second.shape == (1, 540, 960, 3)
    assert (first == 127).all() and (second == 255).all()


def test_one_mp4_per_video_with_its_latents_written_first(pipe):
    prompts = ["a cat", "一只熊猫"]
    lat = pipe(prompts, num_videos_per_prompt=2, seed=3, output_type="latent", progress=False, **SMALL).video
    out = pipe(prompts, num_videos_per_prompt=2, seed=3, progress=False, **SMALL)
    assert [f.video.name for f in out.files] == ["a_cat_v0-t.mp4", "a_cat_v1-t.mp4", "一只熊猫_v0-t.mp4",
                                                 "一只熊猫_v1-t.mp4"]
    assert out.video == [str(f.video) for f in out.files]
    for i, f in enumerate(out.files):
        assert f.prompt == prompts[i // 2] and f.error is None
        assert f.latents == f.video.with_suffix(".safetensors")
        np.testing.assert_array_equal(st.load_file(f.latents)["latents"], lat[i:i + 1])
        frames, _ = read_mp4(f.video)
        assert frames.shape == (17, 32, 48, 3)
    # a second call with the same names does not overwrite anything
    first, again = (pipe(prompts[:1], seed=3, progress=False, **SMALL).files[0] for _ in range(2))
    assert (first.video.name, again.video.name) == ("a_cat-t.mp4", "a_cat-t-1.mp4")
    assert again.latents.name == "a_cat-t-1.safetensors"


def test_a_failed_decode_keeps_the_latents_and_they_decode_later(pipe, tmp_path, tiny_model_dir):
    good = pipe.video_decoding
    pipe.video_decoding = RemoteVae(f"127.0.0.1:{free_port()}", connect_wait=0)  # nothing listens there
    try:
        with pytest.raises(VideoOutputError) as e:
            pipe("a dog", num_videos_per_prompt=2, seed=5, progress=False, **SMALL)
    finally:
        pipe.video_decoding = good
    failed = e.value.failed
    assert e.value.written == [] and len(failed) == 2
    assert all(f.video is None and f.latents.is_file() and not f.latents.with_suffix(".mp4").exists() for f in failed)
    assert "not reachable" in failed[0].error
    assert str(failed[0].latents) in str(e.value) and "--decode_latents FILE --vae_url URL" in str(e.value)

    # Later, in one plain process (here with the VAE in process), with a broken file among them.
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    files = [str(failed[0].latents), str(bad), str(failed[1].latents)]
    r = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--decode_latents", *files, "--local_models",
                        "--model_dir", str(tiny_model_dir)], capture_output=True, text=True, timeout=120,
                       env=_env(), cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # one file could not be decoded
    assert "summary: 2 of 3 video(s) written" in r.stdout and f"not decoded; latents in {bad}" in r.stdout
    assert "1 of 3 prompt(s) did not give all their videos" in r.stderr
    for f in failed:
        mp4 = f.latents.with_suffix(".mp4")  # where the job would have written it
        assert f"    {mp4}" in r.stdout
        # the same video as decoding those latents directly (same frames, same encoder settings)
        (frames,) = video_frames(good.decode(st.load_file(f.latents)["latents"]))
        expected = write_mp4(frames, tmp_path / f"expected-{mp4.name}")
        np.testing.assert_array_equal(read_mp4(mp4)[0], read_mp4(expected)[0])


def test_prompt_file_and_presets(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("  a cat \n\n一只熊猫\n   \n", encoding="utf-8")
    assert read_prompts(parse_args(["--prompt_file", str(f)])) == ["a cat", "一只熊猫"]
    f.write_text("\n \n", encoding="utf-8")
    with pytest.raises(StartupError, match="holds no prompt"):
        read_prompts(parse_args(["--prompt_file", str(f)]))
    with pytest.raises(StartupError, match="cannot read it"):
        read_prompts(parse_args(["--prompt_file", str(tmp_path / "nope.txt")]))

    # the model card's rows, and explicit flags win whatever their position
    assert sorted(load_presets()) == ["base", "turbo"]
    turbo = parse_args(["--preset", "turbo"])
    assert (turbo.infer_steps, turbo.cfg_scale, turbo.time_shift) == (15, 5.0, 17.0)
    base = parse_args(["--preset", "base"])
    assert (base.infer_steps, base.cfg_scale, base.time_shift) == (50, 9.0, 13.0)
    mixed = parse_args(["--cfg_scale", "7.5", "--preset", "turbo", "--infer_steps", "50"])
    assert (mixed.infer_steps, mixed.cfg_scale, mixed.time_shift) == (50, 7.5, 17.0)
    with pytest.raises(SystemExit):
        parse_args(["--preset", "fast"])


def test_dit_job_stops_before_loading_when_a_service_is_missing(tiny_model_dir, tmp_path):
    """run_parallel.py as a user starts it, without the services: exit 2 within seconds, one clear error."""
    missing = free_port()
    started = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", str(tiny_model_dir),
                        "--caption_url", f"127.0.0.1:{missing}", "--vae_url", f"127.0.0.1:{missing}",
                        "--ulysses_degree", "1", "--prompt", "a cat", "--save_path", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    took = time.monotonic() - started
    print(f"DiT job without services: exit {r.returncode} after {took:.1f} s")
    assert r.returncode == 2 and took < 30
    assert f"caption service at http://127.0.0.1:{missing}/health: nothing answers" in r.stderr
    assert f"vae service at http://127.0.0.1:{missing}/health: nothing answers" in r.stderr
    assert "start it with: python api/call_remote_server.py --model_dir" in r.stderr
    assert "Traceback" not in r.stderr and "StepVideoModel: loaded" not in r.stdout
