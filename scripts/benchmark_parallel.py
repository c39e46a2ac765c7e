"""Parallel layouts: measured with two workers on CPU, projected for Ascend 910B.

    python scripts/benchmark_parallel.py measure [--steps 4] [--append docs/performance.md]
    python scripts/benchmark_parallel.py ascend [--append docs/performance.md]

`measure`: where a denoising step's time goes with two workers.
A medium DiT (4 blocks, 8 heads x 128, D = 1024) in a complete tiny model folder, one video of
1 x 32 x 64 = 2048 latent tokens, CFG batch 2, runs as `run_parallel.py` under msrun with one
worker per core (`--bind_core=True`: each worker pinned to its own core) for each layout: pp2,
sp2, tp2, cfg2, and the whole model on one core as the reference. Each rank's `--stats_dir`
JSON gives its per-call split (`DistributedDiT.timing`): idle = waiting in the pipeline
(recv, send, the output broadcast, which is where a rank waits for the others), communication
= Ulysses all-to-alls and gather plus tensor-parallel all-reduces, compute = the rest. The
first call (compile) is left out; the median of the others is reported.

Compiled blocks (the default) run the tensor-parallel all-reduce inside their graph, where it
cannot be timed apart: tp2 is therefore also run with --eager, in which every collective is timed.

`ascend`: the time and memory of every 4- and 8-device layout (pp x cfg x tensor x ulysses) for
544x992x204, 50 steps, on paper (`layout_projection`, formulas in its docstring), with the
device numbers of `benchmark.AscendAssumptions`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

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


def machine_line(what: str) -> str:
    import mindspore
    return (f"`benchmark_parallel.py {what}` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPU(s), MindSpore "
            f"{mindspore.__version__}, load average {os.getloadavg()[0]:.2f} at start")


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


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def measure(steps: int, layouts=LAYOUTS) -> str:
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


# ============================================================================ ascend (paper)

BLOCK_SLICED = ("attn1.wqkv.weight", "attn1.wo.weight", "attn2.wq.weight", "attn2.wkv.weight", "attn2.wo.weight",
                "ff.net.0.proj.weight", "ff.net.2.weight")  # cut by tensor parallelism (parallel/tensor.py)
RESERVE_GIB = 4.0  # device memory assumed taken by the framework, HCCL buffers and kernel workspaces


@functools.lru_cache(maxsize=1)
def published_parameter_sizes() -> Dict[str, int]:
    """Parameter name -> element count of the published DiT (built lazily: no weight memory)."""
    from benchmark import published_config
    from stepvideo.modules.model import StepVideoModel
    model = StepVideoModel.from_config_dict({**published_config(), "caption_channels": [6144, 1024]})
    return {name: int(np.prod(p.shape)) for name, p in model.parameters_and_names()}


def stage_weight_bytes(pp: int, tp: int, itemsize: int = 2) -> int:
    """Parameter bytes of the heaviest stage's device: its blocks (projections / T) + embeddings or output."""
    from stepvideo.parallel.pipeline import plan_stages
    sizes = published_parameter_sizes()
    per_plan = []
    for plan in plan_stages(48, pp):
        per_plan.append(sum(c // tp if name.endswith(BLOCK_SLICED) else c
                            for name, c in sizes.items() if plan.owns(name)))
    return max(per_plan) * itemsize


def layout_projection(pp: int, cfg: int, tp: int, u: int, a=None, steps: int = 50) -> Dict[str, float]:
    """Seconds per step and bytes per device of 544x992x204 (CFG, 48 blocks) on pp x cfg x tp x u devices.

    Per micro-batch (one CFG row) and stage, on one device (n = 75,888 video tokens, L = 397 text
    tokens, D = 6144, d = 128, bf16, B = L_blocks / P = blocks per stage):
        GEMM       B * 2 (14 n D^2 + 2 L D^2) / (T U) / (peak * u_gemm)  (+ embeddings on stage 0, unsplit)
        attention  B * 4 D n (n + L) / (T U) / (peak * u_fa)
        vector     B * (5 + 7 / T) passes * (n / U) * D * 2 B * 2 (read + write) / HBM bandwidth
                   (adaLN LayerNorm x2, gates/residuals x3 on every rank; q/k norm + RoPE, cross q-norm,
                   GELU x4 on the rank's heads / FFN slice)
        all-to-all B * [(n/U) 3 D/T + n D/(T U)] * 2 B * (U-1)/U / link    (Ulysses, q/k/v + output)
        all-reduce B * 3 * (n/U) D * 2 B * 2 (T-1)/T / link                 (ring, attn1/attn2/FFN outputs)
        hand-off   the stage's activations / link (P > 1)
    step time = t_micro-batch * (M + P - 1), M = 2 / C micro-batches per CFG group (pipeline bubble
    (P-1)/(M+P-1)), + the output broadcast; nothing overlapped (conservative).
    memory = the heavier stage's weights (sliced projections / T) + live activations of one row.
    """
    from benchmark import AscendAssumptions, DitShape, block_flops, dit_flops
    a = a or AscendAssumptions()
    n, text, d_model, layers = 36 * 34 * 62, 77 + 320, 48 * 128, 48
    one_row = DitShape(layers=layers, heads=48, head_dim=128, batch=1, video_tokens=n, text_tokens=text,
                       llm_tokens=320, clip_tokens=77)
    blk = block_flops(one_row)
    edges = dit_flops(one_row)["gemm"] - layers * blk["gemm"]
    per_stage = layers / pp
    link = a.link_gbs * 1e9
    local = n / u
    t = {
        "gemm": (per_stage * blk["gemm"] / (tp * u) + edges) / (a.peak_tflops * 1e12 * a.gemm_util),
        "attention": per_stage * blk["attention"] / (tp * u) / (a.peak_tflops * 1e12 * a.flash_util),
        "vector": per_stage * (5 + 7 / tp) * local * d_model * 2 * 2 / (a.hbm_gbs * 1e9),
        "all_to_all": (per_stage * (local * 3 * d_model / tp + n * d_model / (tp * u)) * 2 * (u - 1) / u / link),
        "all_reduce": per_stage * 3 * local * d_model * 2 * 2 * (tp - 1) / tp / link,
        "handoff": (local * d_model * 2 + text * d_model * 2) / link if pp > 1 else 0.0,
    }
    micro_batches = 2 // cfg
    per_mb = sum(t.values())
    output = 2 * 36 * 64 * 34 * 62 * 2 / link  # the prediction broadcast (both rows)
    step = per_mb * (micro_batches + pp - 1) + output
    act = 2 * (2 * local * d_model  # hidden + residual
               + local * d_model  # the all-reduced / gathered output of a projection
               + 2 * 3 * local * d_model / tp  # q, k, v before and after the exchange
               + 2 * local * d_model / tp  # attention output, both layouts
               + local * 4 * d_model / tp)  # FFN inner
    weights = stage_weight_bytes(pp, tp)
    return {**{f"t_{k}": v * micro_batches * 1.0 for k, v in t.items()}, "per_micro_batch": per_mb,
            "bubble_factor": (micro_batches + pp - 1) / micro_batches, "step": step, "total": step * steps,
            "weights": weights, "activations": act, "peak": weights + act,
            "fits": (weights + act) / 2**30 <= a.hbm_gib - RESERVE_GIB}


def ascend_tables() -> str:
    from benchmark import AscendAssumptions
    from stepvideo.parallel.mesh import possible_layouts
    a = AscendAssumptions()
    parts = []
    best = {}
    for world in (4, 8):
        rows = []
        for lay in possible_layouts(world, 48, 48):
            p = layout_projection(lay.pp, lay.cfg, lay.tp, lay.ulysses, a)
            name = " x ".join(f"{k}{v}" for k, v in (("pp", lay.pp), ("cfg", lay.cfg), ("tp", lay.tp),
                                                       ("sp", lay.ulysses)) if v > 1) or "1"
            if p["fits"] and (world not in best or p["total"] < best[world][1]["total"]):
                best[world] = (name, p)
            rows.append((p["total"], [name, f"{p['weights'] / 2**30:.1f}", f"{p['peak'] / 2**30:.1f}",
                                      "yes" if p["fits"] else "no", f"{p['t_gemm']:.2f}", f"{p['t_attention']:.2f}",
                                      f"{p['t_vector']:.2f}", f"{p['t_all_to_all']:.2f}", f"{p['t_all_reduce']:.2f}",
                                      f"{p['bubble_factor']:.2f}", f"{p['step']:.1f}", f"{p['total']:,.0f}"]))
        rows.sort(key=lambda r: r[0])
        parts.append(table([f"{world} devices: layout", "weights GiB", "peak GiB", f"fits {a.hbm_gib:.0f} GiB - "
                            f"{RESERVE_GIB:.0f}", "GEMM s", "attention s", "vector s", "all-to-all s",
                            "all-reduce s", "bubble x", "step s", "50 steps s"], [r for _, r in rows]))
    summary = [[f"best {w}-device layout that fits", name, f"{p['total']:,.0f} s"] for w, (name, p) in best.items()]
    parts.append(table(["", "layout", "50 steps of 544x992x204"], summary))
    return "\n\n".join(parts) + (
        f"\n\nPer device, per step (both CFG rows): the GEMM .. all-reduce columns are the terms of "
        f"`layout_projection` summed over the rank's micro-batches, before the bubble factor (M+P-1)/M; step s = "
        f"(their sum) x bubble + the output broadcast. Assumptions: {a.peak_tflops:.0f} TFLOP/s bf16, GEMMs at "
        f"{a.gemm_util:.0%}, FlashAttentionScore at {a.flash_util:.0%}, HBM {a.hbm_gbs:.0f} GB/s, every "
        f"collective through one {a.link_gbs:.0f} GB/s HCCS link per direction, nothing overlapped; {RESERVE_GIB:.0f} "
        f"GiB of each device's {a.hbm_gib:.0f} GiB kept for the framework, HCCL and workspaces. Nothing here was "
        "measured on Ascend.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("measure", "ascend"))
    p.add_argument("--steps", type=int, default=4, help="measure: denoising steps per job (the first is not counted)")
    p.add_argument("--append", metavar="FILE", help="append the printed section to this Markdown file")
    args = p.parse_args(argv)
    from stepvideo import backend
    backend.init("cpu")
    if args.command == "ascend":
        header = machine_line("ascend")
        body = ascend_tables()
        note = ""
    else:
        header = machine_line(f"measure --steps {args.steps}")
        body = measure(args.steps)
        note = ("\n\nMedium DiT: 4 blocks, 8 heads x 128, 2048 video tokens (1 x 32 x 64), CFG batch 2, fp32, one "
                "worker per core (msrun --bind_core=True); median over the steps after the first. compute / comm / "
                "idle: shares of the rank's step. In compiled blocks the tensor-parallel all-reduce is part of "
                "'compute'; the eager tp2 row times it.")
    section = f"\n{header}\n\n{body}{note}\n"
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
