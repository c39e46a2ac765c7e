"""Faults a real msrun job must survive cleanly, on the tiny checkpoint (2 DiT blocks, the session's), CPU.

- a rank killed with SIGKILL from outside in the middle of denoising (it cannot report anything
  itself), the job started by scripts/run_parallel.sh: the whole job ends non-zero within 60 s,
  the script names the rank, its pid and the signal, and no worker is left running;
- the VAE service killed while it decodes rank 0's latents: rank 0 fails with an error that names
  the service and its URL, and the job ends.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from msrun_support import ROOT, job_env, leftover_processes, run_command, run_msrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN_PARALLEL = ROOT / "run_parallel.py"
SERVER = ROOT / "api" / "call_remote_server.py"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def job_args(model_dir: Path, *extra: str, device: bool = True) -> list:
    return ["--model_dir", str(model_dir), "--prompt", "A cat walks on the grass.", "--seed", "42",
            *(["--device", "cpu", "--ulysses_degree", "1", "--pp_degree", "2"] if device else []), *extra]


def _kill_rank_when_denoising(log_dir: Path, rank: int, steps: int, killed: dict) -> None:
    """SIGKILL `rank` (pid from its log) once rank 0's progress bar shows step 2 of `steps`."""
    deadline = time.monotonic() + 240
    progress = re.compile(rf"\b[2-9]/{steps}\b")
    while time.monotonic() < deadline:
        try:
            rank0 = (log_dir / "worker_0.log").read_text(errors="replace")
            target = (log_dir / f"worker_{rank}.log").read_text(errors="replace")
        except FileNotFoundError:
            time.sleep(0.1)
            continue
        pid = re.search(r"process id (\d+)$", target, re.M)
        if pid and progress.search(rank0):
            os.kill(int(pid.group(1)), signal.SIGKILL)
            killed.update(pid=int(pid.group(1)), at=time.monotonic())
            return
        time.sleep(0.05)


def test_a_rank_killed_mid_denoising_ends_the_job_naming_it(model_dir, workdir):
    """As the OOM killer would: rank 1 gets SIGKILL from outside while rank 0 shows step 2 of 20."""
    log_dir = workdir / "sigkill_logs"
    latents = workdir / "never.safetensors"
    killed = {}
    watcher = threading.Thread(target=_kill_rank_when_denoising, args=(log_dir, 1, 20, killed), daemon=True)
    watcher.start()
    env = {"MODEL_DIR": str(model_dir), "ULYSSES": "1", "PP": "2", "DEVICE": "cpu", "LOG_DIR": str(log_dir)}
    job = run_command(["bash", str(ROOT / "scripts" / "run_parallel.sh"), *job_args(
        model_dir, "--local_models", "--infer_steps", "20", "--num_frames", "1", "--height", "32", "--width", "48",
        "--output_type", "latent", "--latents_out", str(latents), device=False)[2:]], workdir, 180, env, log_dir)
    since_kill = time.monotonic() - killed.get("at", time.monotonic())
    watcher.join(5)
    assert "pid" in killed, job.console[-3000:]
    print(f"\nrank 1 SIGKILLed mid-denoising: rc {job.returncode}, the job ended {since_kill:.1f} s after the kill"
          f"\n{job.console[-800:]}")
    assert job.returncode != 0 and since_kill < 60
    assert f"run_parallel.sh: rank 1 (pid {killed['pid']}) ended by signal 9 (KILL)" in job.console
    assert not latents.exists()
    assert not leftover_processes(str(log_dir))


def test_the_vae_service_killed_mid_decode_fails_rank_0_clearly(model_dir, workdir):
    log = open(workdir / "service.log", "wb")
    env = job_env()
    service = subprocess.Popen([sys.executable, str(SERVER), "--model_dir", str(model_dir), "--port", "0"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None and time.monotonic() < deadline:
            text = (workdir / "service.log").read_text(errors="replace")
            url = next((line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("vae_url: ")), None)
            assert service.poll() is None, text[-2000:]
            time.sleep(0.2)
        assert url, "service not ready"
        killed = {}

        def kill_when_decoding():
            while service.poll() is None:
                try:
                    if httpx.get(url + "/health", timeout=5).json()["running"] == "vae":
                        service.send_signal(signal.SIGKILL)
                        killed["at"] = time.monotonic()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_when_decoding, daemon=True)
        watcher.start()
        job = run_msrun(RUN_PARALLEL, job_args(model_dir, "--caption_url", url, "--vae_url", url, "--infer_steps", "3",
                                               "--num_frames", "17",
                                               "--height", "64", "--width", "128", "--save_path",
                                               str(workdir / "videos")), 2, workdir, timeout=180)
        watcher.join(5)
    finally:
        if service.poll() is None:
            service.kill()
        service.wait(10)
        log.close()
    print(f"\nVAE service killed mid-decode: rc {job.returncode}, job ended "
          f"{time.monotonic() - killed.get('at', time.monotonic()):.1f} s ago\n{job.console[-1500:]}")
    assert "at" in killed, "the service was never seen decoding"
    assert job.returncode != 0
    assert "[rank 0] error" in job.console
    assert f"vae service at {url}/vae-api" in job.console
    videos = workdir / "videos"
    assert not videos.exists() or not list(videos.glob("*.mp4"))
