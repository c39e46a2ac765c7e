"""Start real msrun jobs from tests: a free port, a temp log folder, a timeout, no processes left behind."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import psutil

ROOT = Path(__file__).resolve().parents[1]
MSRUN = Path(sys.executable).with_name("msrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    returncode: int
    seconds: float
    console: str  # msrun's stdout + stderr (it streams every worker's log)
    log_dir: Path

    def worker_log(self, rank: int) -> str:
        return (self.log_dir / f"worker_{rank}.log").read_text(errors="replace")


def job_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"GLOG_v": "3", "PYTHONPATH": str(ROOT), "STEPVIDEO_DEVICE": "cpu",
                # A dead worker is noticed by the scheduler after this many seconds (default 30).
                "MS_NODE_TIMEOUT": "10"})
    env.update(extra or {})
    return env


def _kill_tree(proc: psutil.Process) -> None:
    """Kill `proc` and every descendant (msrun starts its workers in their own sessions)."""
    try:
        family = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def run_msrun(script: Path, args: Sequence[str], workers: int, workdir: Path, timeout: float = 240,
              env: Optional[Dict[str, str]] = None) -> Job:
    """`msrun --worker_num=N ... script args` in `workdir`; kills the whole tree on timeout."""
    log_dir = workdir / f"logs-{time.monotonic_ns()}"
    cmd = [str(MSRUN), f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
           "--join=True", "--cluster_time_out=60", f"--log_dir={log_dir}", str(script), *args]
    return run_command(cmd, workdir, timeout, env, log_dir)


def run_single(script: Path, args: Sequence[str], workdir: Path, timeout: float = 120,
               env: Optional[Dict[str, str]] = None) -> Job:
    """The same script in one plain process (no msrun)."""
    return run_command([sys.executable, str(script), *args], workdir, timeout, env, workdir)


def run_command(cmd: Sequence[str], workdir: Path, timeout: float, env: Optional[Dict[str, str]], log_dir: Path) -> Job:
    """Run `cmd` (msrun, a launcher script, ...) in `workdir`; kills its whole process tree on timeout."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=job_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    handle = psutil.Process(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(handle)
        out, _ = proc.communicate()
        raise AssertionError(f"job did not finish within {timeout} s: {' '.join(cmd)}\n{out[-4000:]}")
    finally:
        _kill_tree(handle)  # workers that outlived msrun, if any
    return Job(proc.returncode, time.monotonic() - started, out, log_dir)


def leftover_processes(marker: str) -> list:
    """Processes whose command line mentions `marker` (e.g. the test's temp folder)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and p.pid != os.getpid():
            found.append((p.pid, cmdline[:200]))
    return found
