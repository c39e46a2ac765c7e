"""Start real msrun jobs from tests: a free port, a temp log folder, a timeout, no processes left behind.

`run_batch` runs several run_parallel.py jobs one after another in the processes of one launch
(tests/distributed/batch_worker.py): a launch costs every process its MindSpore import and the
job's start-up, so layouts with the same number of workers share one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
MSRUN = Path(sys.executable).with_name("msrun")
BATCH_WORKER = ROOT / "tests" / "distributed" / "batch_worker.py"


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

    def run_log(self, name: str, rank: int = 0) -> str:
        """The part of a batch's worker log (or of its console, for a plain process) that run `name` wrote."""
        text = self.worker_log(rank) if (self.log_dir / f"worker_{rank}.log").is_file() else self.console
        begin = text.find(f"{BATCH_BEGIN} {name}\n")
        assert begin >= 0, f"run {name} did not start on rank {rank}:\n{text[-3000:]}"
        end = text.find(f"{BATCH_END} {name} ", begin)
        return text[begin:] if end < 0 else text[begin:end]


# Lines batch_worker.py prints around each run.
BATCH_BEGIN = "=== batch run"
BATCH_END = "=== batch end"


# MS_NODE_TIMEOUT bounds two waits: the scheduler's for a dead worker's heartbeat, and a collective's for a
# late peer (measured: a broadcast whose peer came 16 s late failed after 10.0 s with 10). Jobs default to 10,
# so a failing job ends soon; jobs whose ranks wait for a peer's first compile (a pipeline stage for the one
# before it) pass PEER_WAIT, as a loaded 2-core machine can take more than 10 s to compile a stage.
PEER_WAIT = {"MS_NODE_TIMEOUT": "30"}


def job_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"GLOG_v": "3", "PYTHONPATH": str(ROOT), "STEPVIDEO_DEVICE": "cpu", "MS_NODE_TIMEOUT": "10"})
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


def run_batch(runs: Dict[str, Sequence[str]], workers: int, workdir: Path, timeout: float = 300,
              env: Optional[Dict[str, str]] = None) -> Job:
    """run_parallel.py with each argv of `runs` (name -> argv), in turn, in the same processes.

    workers > 0: one msrun launch of that many workers; 0: one plain process (no msrun). A failing run ends
    the launch (the later runs do not start); `Job.run_log(name, rank)` is one run's part of a log.
    """
    spec = workdir / f"batch-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps([{"name": name, "argv": list(argv)} for name, argv in runs.items()]))
    env = {**PEER_WAIT, **(env or {})}
    if workers:
        return run_msrun(BATCH_WORKER, [str(spec)], workers, workdir, timeout, env)
    return run_single(BATCH_WORKER, [str(spec)], workdir, timeout, env)


class Launches:
    """launches(workers) -> the Job of the one launch that ran every run of that many workers, started on first
    use (workers 0: one plain process). runs: name -> (workers, run_parallel.py argv), in the order to run."""

    def __init__(self, runs: Dict[str, Tuple[int, Sequence[str]]], workdir: Path):
        self.runs, self.workdir, self.jobs = runs, workdir, {}

    def __call__(self, workers: int) -> Job:
        if workers not in self.jobs:
            mine = {name: argv for name, (w, argv) in self.runs.items() if w == workers}
            self.jobs[workers] = run_batch(mine, workers, self.workdir)
            print(f"{list(mine)}: one {'msrun launch of ' + str(workers) + ' workers' if workers else 'process'} "
                  f"took {self.jobs[workers].seconds:.1f} s")
        return self.jobs[workers]


@contextlib.contextmanager
def no_leftovers(workdir: Path) -> Iterator[Path]:
    """Yields `workdir`; afterwards kills any process whose command line still mentions it, and fails
    if there was one (unless the body already failed: its error is the one to see)."""
    try:
        yield workdir
    finally:
        left = leftover_processes(str(workdir))
        for pid, _ in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    assert not left, f"processes left behind: {left}"


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
