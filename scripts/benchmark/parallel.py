"""`parallel`: where a denoising step's time goes with two workers (compute, communication, idle per rank).

A medium DiT (4 blocks, 8 heads x 128, D = 1024) in a complete tiny model folder, one video of
1 x 32 x 64 = 2048 latent tokens, CFG batch 2, runs as `run_parallel.py` under msrun with one
worker per core (`--bind_core=True`: each worker pinned to its own core) for each layout: pp2,
sp2, tp2, cfg2, and the whole model on one core as the reference. Each rank's `--stats_dir`
JSON gives its per-call split (`DistributedDiT.timing`): idle = waiting in the pipeline
(recv, send, the output broadcast, which is where a rank waits for the others), communication
= Ulysses all-to-alls and gather plus tensor-parallel all-reduces, compute = the rest. The
first call (compile) is left out; the median of the others (--repeats of them) is reported.

Compiled blocks (the default) run the tensor-parallel all-reduce inside their graph, where it
cannot be timed apart: tp2 is therefore also run with --eager, in which every collective is timed.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

from benchmark.measure import table

ROOT = Path(__file__).resolve().parents[2]

LAYOUTS = [  # name, workers, flags
    ("1 core (reference)", 1, ["--ulysses_degree", "1"]),
    ("pp2", 2, ["--ulysses_degree", "1", "--pp_degree", "2"]),
    ("sp2", 2, ["--ulysses_degree", "2"]),
    ("tp2", 2, ["--ulysses_degree", "1", "--tensor_parallel_degree", "2"]),
    ("cfg2", 2, ["--ulysses_degree", "1", "--cfg_parallel_degree", "2"]),
    ("tp2, eager", 2, ["--ulysses_degree", "1", "--tensor_parallel_degree", "2", "--eager"]),
]
MEDIUM = {"num_attention_heads": 8, "num_layers": 4}  # on top of the tiny folder's DiT config
VIDEO = ["--num_frames", "1", "--height", "512", "--width", "1024"]  # 1 x 32 x 64 latent tokens


def write_medium_model(folder: Path) -> Path:
    """The tiny model folder (text encoders, VAE, scheduler) with a medium DiT in `transformer/`."""
    from make_tiny_checkpoint import convert_clip, dit_config, lazy_shapes, make_tiny_checkpoint, write_json
    from stepvideo.checkpoint import save_sharded
    from stepvideo.modules.model import StepVideoModel
    from synthetic_weights import rule_weights

    make_tiny_checkpoint(folder, layers=MEDIUM["num_layers"])
    convert_clip(folder)
    config = {**dit_config(MEDIUM["num_layers"]), **MEDIUM}
    shutil.rmtree(folder / "transformer")
    write_json(folder / "transformer" / "config.json", config)
    shapes = lazy_shapes(StepVideoModel.from_config_dict(config))
    save_sharded(rule_weights(shapes, salt="medium-dit:"), folder / "transformer", "diffusion_pytorch_model",
                 256 * 2**20, bf16=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(model_dir: Path, workdir: Path, name: str, workers: int, flags: Sequence[str],
               steps: int) -> List[dict]:
    """One msrun job, each worker on its own core; returns each rank's stats JSON."""
    tag = name.split()[0].replace(",", "") + ("_eager" if "--eager" in flags else "")
    stats_dir, log_dir = workdir / f"stats_{tag}", workdir / f"logs_{tag}"
    cmd = [str(Path(sys.executable).with_name("msrun")), f"--worker_num={workers}",
           f"--local_worker_num={workers}", f"--master_port={free_port()}", "--join=True", "--bind_core=True",
           "--cluster_time_out=120", f"--log_dir={log_dir}", str(ROOT / "run_parallel.py"),
           "--model_dir", str(model_dir), "--local_models", "--prompt", "A cat walks on the grass, realistic style.",
           "--infer_steps", str(steps), *VIDEO, "--output_type", "latent", "--device", "cpu",
           "--stats_dir", str(stats_dir), *flags]
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), STEPVIDEO_DEVICE="cpu", MS_NODE_TIMEOUT="30")
    job = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1200)
    if job.returncode != 0:
        raise RuntimeError(f"{name}: msrun failed (rc {job.returncode}):\n{job.stdout[-4000:]}")
    return [json.loads((stats_dir / f"rank{r}.json").read_text()) for r in range(workers)]


def split_per_step(stats: dict) -> Dict[str, float]:
    """Median over the calls after the first (which compiles) of each part of a call."""
    calls = stats["timing"]["per_call"][1:]
    median = lambda key: statistics.median(c[key] for c in calls)  # noqa: E731
    return {"total": median("total_s"), "compute": median("compute_s"),
            "comm": median("sp_comm_s") + median("tp_comm_s"), "idle": median("pipeline_wait_s")}


def measure(steps: int, layouts=LAYOUTS) -> str:
    """Every layout's ranks: seconds per step and their split, block weights, traffic, speed-up."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = write_medium_model(workdir / "medium")
        reference = None
        for name, workers, flags in layouts:
            load = os.getloadavg()[0]  # other jobs on the machine slow every rank: shown per layout
            ranks = run_layout(model_dir, workdir, name, workers, flags, steps)
            slowest = max(split_per_step(s)["total"] for s in ranks)
            if reference is None:
                reference = slowest
            for s in ranks:
                part = split_per_step(s)
                traffic = sum(v["bytes"] for op, v in s["traffic_last_step"].items() if op != "broadcast")
                rows.append([name, s["rank"], f"{part['total']:.2f}", f"{part['compute']:.2f}",
                             f"{part['comm']:.2f}", f"{part['idle']:.2f}",
                             f"{part['compute'] / part['total']:.0%} / {part['comm'] / part['total']:.0%} / "
                             f"{part['idle'] / part['total']:.0%}",
                             f"{s['load']['block_bytes'] / 2**20:.0f}", f"{traffic / 2**20:.1f}",
                             f"{reference / slowest:.2f}x", f"{load:.1f}"])
    return table(["layout", "rank", "s per step", "compute s", "comm s", "idle s", "compute / comm / idle",
                  "block weights MiB", "MiB sent per step (w/o output)", "speed-up vs 1 core",
                  "load average before"], rows)


def run(args) -> str:
    """`parallel`: the table, with the setting it was measured in."""
    steps = 2 if args.quick else args.repeats + 1
    return measure(steps) + (
        "\n\nMedium DiT: 4 blocks, 8 heads x 128, 2048 video tokens (1 x 32 x 64), CFG batch 2, fp32, one "
        "worker per core (msrun --bind_core=True); median over the steps after the first. compute / comm / idle: "
        "shares of the rank's step. In compiled blocks the tensor-parallel all-reduce is part of 'compute'; the "
        "eager tp2 row times it.")
