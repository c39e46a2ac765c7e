"""`comm`: what the collectives carry per denoising step, and their CPU emulations timed under msrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

from benchmark.flops import published_config
from benchmark.measure import table

ROOT = Path(__file__).resolve().parents[2]
COMM_WORKER = Path(__file__).with_name("comm_worker.py")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_comm_job(tokens: int, dim: int, heads: int, repeats: int) -> List[dict]:
    """The exchange worker under `msrun --worker_num=2`; returns each rank's result."""
    import psutil
    msrun = Path(sys.executable).with_name("msrun")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               "--cluster_time_out=60", f"--log_dir={tmp}/logs", str(COMM_WORKER), str(ROOT), str(tokens), str(dim),
               str(heads), str(repeats)]
        env = dict(os.environ, GLOG_v="3", STEPVIDEO_DEVICE="cpu", MS_NODE_TIMEOUT="10")
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            console, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
            for p in family:
                p.kill()
            raise RuntimeError("msrun comm job timed out after 300 s")
        logs = console + "".join(p.read_text(errors="replace") for p in Path(tmp, "logs").glob("worker_*.log"))
    results = {}
    for line in logs.splitlines():
        if "COMM_RESULT " in line:
            r = json.loads(line.split("COMM_RESULT ", 1)[1])
            results[r["rank"]] = r
    if proc.returncode != 0 or len(results) != 2:
        raise RuntimeError(f"msrun comm job failed (rc={proc.returncode}):\n{logs[-3000:]}")
    return [results[0], results[1]]


def run(args) -> str:
    """`comm`: bytes each collective carries per step (arithmetic), and the CPU emulations timed under msrun."""
    from stepvideo import backend
    from stepvideo.parallel.pipeline import step_traffic
    backend.init("cpu")
    rows = []
    # 1. Arithmetic: bytes per denoising step, one rank per stage, from the shapes DistributedDiT sends.
    layouts = [("published, 544x992x204", published_config(), (1, 36, 64, 34, 62), 397, 2, 2, 2),
               ("medium 4 x 1024, 2048 tokens", {**published_config(), "num_attention_heads": 8, "num_layers": 4},
                (1, 2, 64, 32, 32), 128, 2, 2, 4)]
    for name, cfg, latent, text_tokens, u, pp, itemsize in layouts:
        for stage, ops_bytes in enumerate(step_traffic(cfg, latent, text_tokens, u, pp, itemsize=itemsize)):
            for op, nbytes in sorted(ops_bytes.items()):
                rows.append([name, f"u{u} x pp{pp}, {'bf16' if itemsize == 2 else 'fp32'}", f"stage {stage}", op,
                             f"{nbytes / 2**20:,.1f}"])
    text = table(["model", "layout", "rank", "collective", "MiB handed per step"], rows)
    if args.quick:
        return text + ("\n\nQuick mode: byte arithmetic only (`stepvideo.parallel.pipeline.step_traffic`, the "
                       "payload one rank hands to each collective per denoising step, CFG batch 2), no msrun job.")
    # 2. Measured: 2 workers under msrun, CPU emulations of the collectives (see stepvideo/parallel/collectives.py).
    tokens, dim, heads = 2048, 1024, 8
    results = run_comm_job(tokens, dim, heads, args.repeats)
    mrows = []
    for what, key in (("Ulysses q/k/v + output exchange, one block, one row", "ulysses"),
                      ("stage hand-off of the hidden states, one row", "handoff")):
        # the slower rank; for the hand-off that is the receiver (a send returns once the data is out)
        seconds = max(r[f"{key}_s"] for r in results)
        nbytes = results[0][f"{key}_bytes"]
        mrows.append([what, f"{tokens} tokens x {dim} fp32", f"{nbytes / 2**20:.1f}", f"{seconds * 1e3:.1f}",
                      f"{nbytes / seconds / 2**30:.2f}"])
    text += "\n\n" + table(["measured on CPU (msrun, 2 workers)", "shape", "MiB handed per rank", "median ms",
                            "GiB/s"], mrows)
    return text + ("\n\nThe measured rows use the CPU emulations (all-gather then slice for the all-to-all, a "
                   "broadcast in a two-rank group for the hand-off), so they show the cost on this machine, not "
                   "on HCCL; the slower rank's median is reported.")
