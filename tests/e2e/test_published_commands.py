"""The published instructions (mindone's examples/step_video_t2v README), run as a user pastes them.

The three command blocks are run by bash verbatim except for the model folder (the tiny
checkpoint), the frame/size/step counts and a free master port: the two services on their
default ports 5000/5001 started with one flag each, bare-host URLs, `msrun --bind_core=True ...
python -u run_parallel.py ...` without --join (msrun returns at once; the test waits for the
workers, as a user watches the log folder). Then the original's one-process form: one service
with no enable flag, both URLs pointing at it, several prompts from a file with two videos
each, one mp4 per video, the job started together with the service (--wait_services). Every process is found by the test's temp folder in its command line
and stopped at the end.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from msrun_support import free_port, job_env, leftover_processes
from stepvideo.utils.video_process import read_mp4
from support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPT = "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光"
SERVICES = """\
ASCEND_RT_VISIBLE_DEVICES=0 python api/call_remote_server.py --model_dir $model_dir --enable_vae True &
ASCEND_RT_VISIBLE_DEVICES=1 python api/call_remote_server.py --model_dir $model_dir --enable_llm True &
"""
DIT = """\
vae_url='127.0.0.1'; caption_url='127.0.0.1'
ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 msrun --bind_core=True --worker_num=4 --local_worker_num=4 --master_port={port} \
--log_dir=outputs/parallel_logs python -u run_parallel.py --model_dir $model_dir --vae_url $vae_url \
--caption_url $caption_url --ulysses_degree 2 --pp_degree 2 --prompt "{prompt}" --infer_steps 2 --cfg_scale 9.0 \
--time_shift 13.0 --num_frames 17 --height 32 --width 48
"""


def bash(script: str, workdir: Path, model_dir: Path, timeout: float = 60) -> str:
    """Run `script` with bash in `workdir`; returns its output. A file, not a pipe, takes the output:
    the services it starts in the background keep theirs open, and a pipe would never close."""
    env = job_env({"model_dir": str(model_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    out = workdir / f"bash-{time.monotonic_ns()}.log"
    with open(out, "wb") as fh:
        done = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    text = out.read_text(errors="replace")
    assert done.returncode == 0, f"{script}\nexited with {done.returncode}:\n{text[-4000:]}"
    return text


def wait_ready(port: int, timeout: float = 180) -> dict:
    """The /health JSON once it answers 200 (the user waits for the service to print its URL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # a user reads the URL as soon as it is printed; so does the test
    pytest.fail(f"no service ready on port {port} after {timeout} s")


def wait_gone(marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in leftover_processes(marker) if "run_parallel.py" in p[1] or "msrun" in p[1]]:
            return True
        time.sleep(0.2)
    return False


def stop_all(marker: str) -> None:
    procs = []
    for pid, _ in leftover_processes(marker):
        try:
            procs.append(psutil.Process(pid))
            procs[-1].terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    """A folder to run the commands in, with the repository's entry points; ports 5000/5001 must be free."""
    for port in (5000, 5001):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is in use: the published commands need it"
    for name in ("api", "run_parallel.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    yield tmp_path
    stop_all(str(tiny_model_dir))


def run_failing(script: str, workdir: Path, model_dir: Path, logs: str) -> tuple:
    """The DiT line with --join=True into outputs/<logs>: (seconds until msrun ended, rank 0's log)."""
    script = script.replace("--log_dir=outputs/parallel_logs", f"--join=True --log_dir=outputs/{logs}")
    begun = time.monotonic()
    out = bash(script.rstrip() + " || echo msrun-exit=$?", workdir, model_dir, timeout=240)
    took = time.monotonic() - begun
    assert "msrun-exit=1" in out, out[-3000:]
    return took, (workdir / "outputs" / logs / "worker_0.log").read_text(errors="replace")


def test_published_two_services_and_msrun_write_the_mp4(workdir, tiny_model_dir):
    # Pasted before the services: every rank stops before loading, rank 0 says how to start them.
    took, rank0 = run_failing(DIT.format(port=free_port(), prompt=PROMPT), workdir, tiny_model_dir, "missing_logs")
    print(f"services missing: msrun ended after {took:.1f} s")
    assert took < 30 and "StepVideoModel" not in rank0
    assert ("caption service at http://127.0.0.1:5000/health: nothing answers ([Errno 111] Connection refused)\n"
            f"  start it with: python api/call_remote_server.py --model_dir {tiny_model_dir} --enable_llm True\n"
            "vae service at http://127.0.0.1:5001/health: nothing answers") in rank0

    bash(SERVICES, workdir, tiny_model_dir)
    vae, caption = wait_ready(5001), wait_ready(5000)
    assert vae["models"] == {"caption": False, "vae": True}
    assert caption["models"] == {"caption": True, "vae": False}

    begun = time.monotonic()
    bash(DIT.format(port=free_port(), prompt=PROMPT), workdir, tiny_model_dir)  # without --join: returns at once
    assert wait_gone(str(tiny_model_dir), timeout=300), "the msrun workers did not finish within 300 s"
    print(f"msrun job: {time.monotonic() - begun:.1f} s")
    logs = workdir / "outputs" / "parallel_logs"
    rank0 = (logs / "worker_0.log").read_text(errors="replace")
    assert "summary: 1 of 1 video(s) written" in rank0, rank0[-3000:]

    (video,) = (workdir / "results").glob("*.mp4")
    assert video.name.startswith("一名宇航员在月球上发现一块石碑")
    frames, fps = read_mp4(video)
    assert frames.shape == (17, 32, 48, 3) and fps == 25.0
    latents = video.with_suffix(".safetensors")
    assert latents.is_file(), "the latents are written next to the mp4 before decoding"

    # The same line with the caption URL pointing at the VAE-only service: every rank stops before
    # loading the DiT, within seconds, rank 0 with the whole explanation (--join=True to see the end).
    wrong = DIT.format(port=free_port(), prompt=PROMPT).replace("caption_url='127.0.0.1'",
                                                                "caption_url='127.0.0.1:5001'")
    took, rank0 = run_failing(wrong, workdir, tiny_model_dir, "wrong_logs")
    print(f"caption URL at the VAE-only service: msrun ended after {took:.1f} s")
    assert took < 30
    logs = workdir / "outputs" / "wrong_logs"
    assert ("[rank 0] error: the services this job needs are not ready:\ncaption service at "
            "http://127.0.0.1:5001/health: a Step-Video service with VAE, not the caption model (Step-LLM + CLIP)\n"
            "  --caption_url must point at the caption service; start one with: python api/call_remote_server.py "
            f"--model_dir {tiny_model_dir} --enable_llm True, then pass --caption_url 127.0.0.1:5000") in rank0
    for rank in (1, 2, 3):  # each stops by itself, or msrun kills it once the first has failed
        text = (logs / f"worker_{rank}.log").read_text(errors="replace")
        assert "StepVideoModel" not in text and "holds" not in text, text[-2000:]

    # Two prompts, the first refused by the caption service (longer than its limit): every rank hears of
    # the failure from rank 0, goes on with the second prompt, and its video is written.
    (workdir / "prompts.txt").write_text("x" * 20000 + "\nA cat walks on the grass\n", encoding="utf-8")
    several = DIT.format(port=free_port(), prompt=PROMPT).replace(f'--prompt "{PROMPT}"', "--prompt_file prompts.txt")
    _, rank0 = run_failing(several, workdir, tiny_model_dir, "several_logs")  # exit 1: one prompt gave no video
    assert "summary: 1 of 1 video(s) written" in rank0, rank0[-3000:]
    assert "FAILED: text encoding failed: " in rank0 and "HTTP 400" in rank0
    (cat,) = (workdir / "results").glob("A_cat_walks_on_the_grass-*.mp4")
    assert f"    results/{cat.name}" in rank0 and read_mp4(cat)[0].shape == (17, 32, 48, 3)


def test_one_process_service_serves_both_urls_for_several_prompts(workdir, tiny_model_dir):
    (workdir / "prompts.txt").write_text("A cat walks on the grass\n\n一只熊猫在吃竹子\n", encoding="utf-8")
    # Pasted together: the job waits for the service with --wait_services instead of failing.
    job = bash("python api/call_remote_server.py --model_dir $model_dir &\n"
               "python run_parallel.py --model_dir $model_dir --vae_url 127.0.0.1:5000 --caption_url 127.0.0.1:5000 "
               "--ulysses_degree 1 --prompt_file prompts.txt --num_videos 2 --infer_steps 1 --num_frames 17 "
               "--height 32 --width 48 --wait_services 120", workdir, tiny_model_dir, timeout=240)
    assert wait_ready(5000, timeout=5)["models"] == {"caption": True, "vae": True}
    videos = sorted((workdir / "results").glob("*.mp4"))
    assert [v.name.split("-")[0] for v in videos] == ["A_cat_walks_on_the_grass_v0", "A_cat_walks_on_the_grass_v1",
                                                      "一只熊猫在吃竹子_v0", "一只熊猫在吃竹子_v1"]
    for v in videos:
        frames, _ = read_mp4(v)
        assert frames.shape == (17, 32, 48, 3), (v, frames.shape)  # one video each, not stacked
        assert f"    {v.relative_to(workdir)}" in job
    assert "summary: 4 of 4 video(s) written" in job
