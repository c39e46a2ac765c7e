"""`streaming`: block streaming (--offload blocks), memory and time against the resident DiT; its Ascend projection.

    python scripts/benchmark streaming cpu [--quick] [--blocks N] [--file-dtype fp32|bf16] [--steps N] [--eager]
                                           [--no-msrun] [--tmp DIR] [--append FILE]
    python scripts/benchmark streaming ascend [--append FILE]

`cpu` writes a medium DiT (N blocks of 8 x 128 heads, D = 1024; 64 blocks = 4.3 GB as fp32
safetensors, one shard per block + one for the rest, weights by the golden rule of
`synthetic_weights.py`) into a temp folder, reads the files once (warm page cache), then runs,
each in a fresh process (`streaming_probe.py`): the resident DiT, the streamed DiT, and both
under msrun with 2 ranks (Ulysses 2: both ranks stream the same blocks from the same mapped
files). Each run prints its rows to stderr as soon as it ends; the section (tables + notes)
is printed at the end. The claim is about weights, so the DiT input is small (CFG batch 2 x 64
video tokens, 80 text tokens): activations stay far below the weights.

`ascend` is the paper projection for Ascend 910B (no NPU here): one device streaming all 48
blocks, and four devices with Ulysses 4 + streaming, next to today's Ulysses 2 x pipeline 2,
from the formulas and assumptions of `benchmark.ascend_projection` plus a PCIe bandwidth.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from benchmark.ascend import AscendAssumptions, ascend_projection
from benchmark.comm import free_port
from benchmark.flops import DitShape, block_flops, dit_flops, published_config
from benchmark.measure import table
from synthetic_weights import rule_tensor

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("streaming_probe.py")
CHANNELS = (1024, 256)  # caption channels of the medium model (LLM, CLIP); as in streaming_probe.py
VIDEO_TOKENS, TEXT_TOKENS = 64, 80  # per CFG row; as in streaming_probe.py


# ============================================================================ cpu


@dataclass
class Model:
    blocks: int
    heads: int = 8
    head_dim: int = 128

    def build(self):
        from stepvideo.modules.model import StepVideoModel
        return StepVideoModel(num_attention_heads=self.heads, attention_head_dim=self.head_dim,
                              num_layers=self.blocks, caption_channels=list(CHANNELS))


def write_checkpoint(folder: Path, m: Model, bf16: bool) -> Dict[str, int]:
    """Safetensors shards (one per block, one for the rest) + index, shard by shard; returns file bytes of each
    kind ("block", "other")."""
    from stepvideo.checkpoint import named_parameters
    from stepvideo.utils import safetensors_io as st
    folder.mkdir(parents=True)
    model = m.build()
    shapes = {name: p.shape for name, p in named_parameters(model).items()}
    groups: Dict[str, List[str]] = {}
    for name in shapes:
        key = name.split(".")[1] if name.startswith("transformer_blocks.") else "rest"
        groups.setdefault(key, []).append(name)
    order = [str(i) for i in range(m.blocks)] + ["rest"]
    itemsize = 2 if bf16 else 4
    weight_map, counts = {}, {"block": 0, "other": 0}
    for i, key in enumerate(order, 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{len(order):05d}.safetensors"
        tensors = {nm: rule_tensor(nm, shapes[nm], salt="streaming:") for nm in groups[key]}
        st.save_file(folder / fname, tensors, bf16=tensors.keys() if bf16 else ())
        for nm, a in tensors.items():
            weight_map[nm] = fname
            counts["block" if key != "rest" else "other"] += a.size * itemsize
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(counts.values())}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(dict(model.config), default=list))
    return counts


def _read_all(folder: Path) -> float:
    """Read every file once so the page cache is warm; returns seconds."""
    t = time.perf_counter()
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass
    return time.perf_counter() - t


def _env() -> dict:
    return dict(os.environ, GLOG_v="3", STEPVIDEO_DEVICE="cpu")


def _run_probe(folder: Path, mode: str, steps: int, jit: bool) -> List[dict]:
    run = subprocess.run([sys.executable, str(PROBE), str(ROOT), str(folder), mode, str(steps), str(int(jit))],
                         capture_output=True, text=True, timeout=3600, env=_env())
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE_RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} probe failed (rc={run.returncode}): {run.stderr[-3000:]}")
    return [json.loads(lines[-1].split(" ", 1)[1])]


def _run_probe_msrun(folder: Path, mode: str, steps: int, jit: bool, workers: int) -> List[dict]:
    with tempfile.TemporaryDirectory() as logs:
        cmd = [str(Path(sys.executable).with_name("msrun")), f"--worker_num={workers}",
               f"--local_worker_num={workers}", f"--master_port={free_port()}", "--join=True",
               "--cluster_time_out=600", f"--log_dir={logs}", str(PROBE), str(ROOT), str(folder), mode, str(steps),
               str(int(jit))]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=logs, env=_env())
        results = []
        for rank in range(workers):
            log = (Path(logs) / f"worker_{rank}.log").read_text(errors="replace")
            lines = [line for line in log.splitlines() if line.startswith("PROBE_RESULT ")]
            if run.returncode != 0 or not lines:
                raise RuntimeError(f"msrun {mode} probe failed (rc={run.returncode}): {log[-3000:]}")
            results.append(json.loads(lines[-1].split(" ", 1)[1]))
    return results


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


HEADER = ["run", "weights loaded MiB", "load s", "peak RSS growth MiB", "max Rss MiB (warm-up)",
          "max Pss MiB (warm-up)", "mapped shards: max Rss / Shared_Clean / Pss MiB (warm-up)", "first call s",
          "median step s (wall)", "median step CPU s", "vs resident (wall / CPU)", "compute waited for fills, s per step"]


def _row(name: str, r: dict, reference: dict) -> list:
    step, cpu = statistics.median(r["step_s"]), statistics.median(r["step_cpu_s"])
    ratio = (f"{step / statistics.median(reference['step_s']):.2f} / "
             f"{cpu / statistics.median(reference['step_cpu_s']):.2f}")
    files, sm, stream = r["files_peak"], r["smaps_peak"], r["stream"]
    return [name, _mib(r["loaded_bytes"]), f"{r['load_s']:.1f}", _mib(r["peak"]), _mib(sm["Rss"]), _mib(sm["Pss"]),
            f"{_mib(files['Rss'])} / {_mib(files['Shared_Clean'])} / {_mib(files['Pss'])}", f"{r['first_call_s']:.1f}",
            f"{step:.2f}", f"{cpu:.2f}", ratio, "-" if stream is None else f"{stream['wait_s'] / len(r['step_s']):.3f}"]


def cmd_cpu(args) -> str:
    m = Model(blocks=3 if args.quick else args.blocks, heads=2 if args.quick else 8)
    steps = 1 if args.quick else args.steps
    bf16 = args.file_dtype == "bf16"
    jit = not args.eager
    plan = [("1 process, resident", "resident", 1), ("1 process, --offload blocks", "streamed", 1)]
    if not args.no_msrun:
        plan += [("2 ranks (Ulysses 2), resident", "resident", 2), ("2 ranks (Ulysses 2), --offload blocks",
                                                                  "streamed", 2)]
    tmp = Path(tempfile.mkdtemp(prefix="stepvideo-streaming-", dir=args.tmp))
    runs: Dict[str, List[dict]] = {}
    rows, seconds = [], {}
    try:
        folder = tmp / "transformer"
        t = time.perf_counter()
        counts = write_checkpoint(folder, m, bf16)
        seconds["write"] = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        seconds["warm"] = _read_all(folder)
        print(f"checkpoint: {disk / 1e9:.2f} GB written in {seconds['write']:.0f} s, read in {seconds['warm']:.1f} s",
              file=sys.stderr, flush=True)
        for name, mode, workers in plan:
            t = time.perf_counter()
            results = (_run_probe(folder, mode, steps, jit) if workers == 1
                       else _run_probe_msrun(folder, mode, steps, jit, workers))
            seconds[name] = time.perf_counter() - t
            runs[name] = results
            for rank, r in enumerate(results):
                # "vs resident": against the resident run of the same layout and rank
                reference = runs[name.replace("--offload blocks", "resident")][rank]
                row = _row(name + (f", rank {r['rank']}" if workers > 1 else ""), r, reference)
                rows.append(row)
                print("| " + " | ".join(row) + f" |   ({seconds[name]:.0f} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp)
    text = table(HEADER, rows)
    per_block = counts["block"] * (2 if bf16 else 1) // m.blocks  # fp32 parameter bytes
    other = counts["other"] * (2 if bf16 else 1)
    resident = runs["1 process, resident"][0]
    streamed_peak = runs["1 process, --offload blocks"][0]["peak"]
    # Activations + runtime: what the resident run holds beyond its weights.
    activations = resident["peak"] - resident["loaded_bytes"]
    bound = other + 3 * per_block + activations
    text += "\n\n" + table(["bound (issue 17, item 4)", "MiB"], [
        ["non-block weights (fp32)", _mib(other)],
        [f"3 blocks (fp32, {_mib(per_block)} MiB each)", _mib(3 * per_block)],
        ["activations + runtime (resident peak growth - resident weights)", _mib(activations)],
        ["bound: non-block + 3 blocks + activations", _mib(bound)],
        ["streamed peak RSS growth (1 process)", _mib(streamed_peak)],
        ["streamed peak within the bound", "yes" if streamed_peak <= bound else "NO"],
        ["resident peak RSS growth (1 process)", _mib(resident["peak"])],
    ])
    if not args.no_msrun:
        two = [["2 ranks, " + mode, " + ".join(_mib(r["peak"]) for r in runs[name]),
                _mib(sum(r["peak"] for r in runs[name])), f"{sum(r['peak'] for r in runs[name]) / (2 * resident['peak']):.2f}"]
               for name, mode in (("2 ranks (Ulysses 2), resident", "resident"),
                                  ("2 ranks (Ulysses 2), --offload blocks", "--offload blocks"))]
        text += "\n\n" + table(["host memory (issue 17, item 2)", "peak RSS growth per rank MiB", "sum MiB",
                                "sum / (2 x 1-process resident)"], two)
    mode = "eager (op by op)" if args.eager else "compiled (mindspore.jit per block)"
    text += (f"\n\nModel: {m.blocks} blocks of {m.heads} x {m.head_dim} heads (D = {m.heads * m.head_dim}), caption "
             f"channels {CHANNELS[0]}/{CHANNELS[1]}; {args.file_dtype} safetensors (weights by the golden rule, "
             f"`synthetic_weights.py`), one shard per block + one for the rest, {disk / 1e9:.2f} GB on disk, "
             f"{_mib(other + m.blocks * per_block)} MiB of fp32 parameters; checkpoint written in {seconds['write']:.0f} s, "
             f"page cache warmed by reading it once ({seconds['warm']:.1f} s). A step is one {mode} DiT call on the "
             f"CFG batch (2 x {VIDEO_TOKENS} video tokens, {TEXT_TOKENS} text tokens; small on purpose: the claim is "
             f"about weights), median of {steps} after one warm-up call. Wall time of each run (fresh process or msrun "
             "job, load and calls): " + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items()
                                                   if n not in ("write", "warm")) + ". "
             "Peak RSS growth: VmHWM after the run minus RSS before loading (after the process group under msrun). "
             "Step CPU s: the process's CPU time over the call (all threads, the fill thread included), which other "
             "jobs on the shared cores disturb less than wall time. Rss / Pss and 'mapped shards' (the mappings of the "
             "checkpoint files only; Shared_Clean: their pages also mapped by another process at that moment): maxima "
             "of /proc/self/smaps sampled every 0.5 s during the warm-up call only (reading smaps walks the process's "
             "page tables: 160-500 ms per read here, which during timed calls took a core from the DiT). 'Compute "
             "waited': time the block loop spent waiting for a fill that was not done.")
    return text


# ============================================================================ ascend (paper)


@dataclass(frozen=True)
class StreamingAssumptions:
    pcie_gbs: float = 25.0  # host -> device per NPU, GB/s: PCIe 4.0 x16 effective, from pageable (mapped) memory
    host_memory_gbs: float = 100.0  # host DRAM bandwidth shared by the NPUs of one server, GB/s


def streaming_projection(a: AscendAssumptions = AscendAssumptions(), sa: StreamingAssumptions = StreamingAssumptions(),
                         steps: int = 50) -> dict:
    """Per-device memory and 50-step time of 544x992x204 for 1 NPU (streaming), 4 NPUs sp4 (+ streaming), sp2 x pp2."""
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.parallel.pipeline import step_traffic
    base = ascend_projection(a, steps)  # today's sp2 x pp2, and the shapes
    s: DitShape = base["shape"]
    d, n, L, b = s.dim, s.video_tokens, s.text_tokens, s.batch
    flops = dit_flops(s)
    model = StepVideoModel.from_config_dict(published_config())
    sizes = {name: int(np.prod(p.shape)) * 2 for name, p in model.parameters_and_names()}  # bf16 bytes
    block_bytes = sum(v for k, v in sizes.items() if k.startswith("transformer_blocks.0."))
    other_bytes = sum(v for k, v in sizes.items() if not k.startswith("transformer_blocks."))
    all_blocks = sum(v for k, v in sizes.items() if k.startswith("transformer_blocks."))
    per_block_flops = block_flops(s)
    out = {"base": base, "block_bytes": block_bytes, "other_bytes": other_bytes, "all_blocks": all_blocks,
           "assumptions": a, "streaming": sa, "steps": steps, "layouts": []}
    for name, u in (("1 NPU, --offload blocks", 1), ("4 NPUs, Ulysses 4 (sp4), --offload blocks", 4),
                    ("4 NPUs, Ulysses 4 (sp4), resident", 4)):
        streamed = "offload" in name
        # No pipeline: each device runs all 48 blocks on 1/u of the tokens (GEMMs) and of the heads (attention),
        # the CFG batch of 2 in one pass (each block's weights come once per step).
        t_block = (per_block_flops["gemm"] / u / (a.peak_tflops * 1e12 * a.gemm_util)
                   + per_block_flops["attention"] / u / (a.peak_tflops * 1e12 * a.flash_util))
        t_edges = (flops["gemm"] - s.layers * per_block_flops["gemm"]) / u / (a.peak_tflops * 1e12 * a.gemm_util)
        one_pass = n / u * d * 2 * 2
        t_vector = (2 + 3 + 1 + 4 + 2) * one_pass * b * s.layers / (a.hbm_gbs * 1e9)
        t_sp = 0.0
        if u > 1:
            traffic = step_traffic(published_config(), (1, 36, 64, 34, 62), L, u, 1, itemsize=2, batch=b)
            t_sp = traffic[0]["sp_all_to_all"] * (u - 1) / u / (a.link_gbs * 1e9)
        t_copy = block_bytes / (sa.pcie_gbs * 1e9)  # one block host -> device
        # Block k+1's copy runs while block k computes: only what exceeds a block's compute is exposed.
        exposed = s.layers * max(0.0, t_copy - t_block) if streamed else 0.0
        step = s.layers * t_block + t_edges + t_vector + t_sp + exposed
        local = n // u
        # Live activations of the CFG batch (2 rows at once): hidden + residual, q/k/v (+ exchanged copy when
        # u > 1), attention output (both layouts when u > 1), FFN inner (4D).
        act = b * (2 * local * d + (2 if u > 1 else 1) * 3 * local * d + (2 if u > 1 else 1) * local * d
                   + 4 * local * d) * 2
        weights = other_bytes + (2 * block_bytes if streamed else all_blocks)
        out["layouts"].append({"name": name, "devices": u, "streamed": streamed, "t_block": t_block,
                               "t_copy": t_copy, "exposed": exposed, "t_sp": t_sp, "step": step,
                               "total": steps * step, "weights": weights, "activations": act,
                               "peak": weights + act, "pcie_per_step": s.layers * block_bytes if streamed else 0,
                               "host_read_gbs": u * s.layers * block_bytes / step / 1e9 if streamed else 0.0})
    return out


def cmd_ascend(args) -> str:
    p = streaming_projection()
    a, sa = p["assumptions"], p["streaming"]
    base = p["base"]
    gib = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    rows = []
    for lay in p["layouts"]:
        rows.append([lay["name"], gib(lay["weights"]), gib(lay["activations"]), gib(lay["peak"]),
                     f"{a.hbm_gib - lay['peak'] / 2**30:.1f}" if lay["peak"] / 2**30 < a.hbm_gib else
                     f"does not fit ({lay['peak'] / 2**30 - a.hbm_gib:.1f} GiB over)"])
    sp2pp2_peak = base["weights"] + base["act_bytes"]
    rows.append(["4 NPUs, Ulysses 2 x pipeline 2, resident (today)", gib(base["weights"]), gib(base["act_bytes"]),
                 gib(sp2pp2_peak), f"{a.hbm_gib - sp2pp2_peak / 2**30:.1f}"])
    memory = table(["per device (bf16; the VAE and the text encoders are on other devices)", "weights GiB",
                    "activations GiB", "peak GiB", f"left of {a.hbm_gib:.0f} GiB"], rows)
    trows = []
    today = base["times"][0][1]
    for lay in p["layouts"]:
        trows.append([lay["name"], f"{lay['t_block']:.2f}", f"{lay['t_copy'] * 1e3:.0f}" if lay["streamed"] else "-",
                      f"{lay['exposed']:.2f}", f"{lay['t_sp']:.2f}", f"{lay['step']:.1f}", f"{lay['total']:,.0f}",
                      f"{lay['total'] / today:.2f}x",
                      f"{lay['host_read_gbs']:.1f}" if lay["streamed"] else "-"])
    trows.append(["4 NPUs, Ulysses 2 x pipeline 2, resident (today)", "", "-", "0", f"{base['t_sp']:.2f}",
                  f"{today / p['steps']:.1f}", f"{today:,.0f}", "1.00x", "-"])
    timing = table(["layout", "compute per block s", "block copy ms", "exposed copy s per step",
                    "all-to-all s per step", "step s", f"{p['steps']} steps s", "vs today",
                    "host memory read GB/s"], trows)
    notes = (f"Formulas (`streaming_projection()` in scripts/benchmark/streaming.py, on top of "
             "`benchmark.ascend_projection`): no pipeline, so a device runs all 48 blocks on the whole CFG batch, "
             "1/u of the tokens in the GEMMs and 1/u of the heads in the attention: step = 48 x (GEMM / u / "
             f"(peak x {a.gemm_util:.0%}) + attention / u / (peak x {a.flash_util:.0%})) + embeddings + vector "
             f"passes + (u-1)/u of the all-to-all bytes at {a.link_gbs:.0f} GB/s (not overlapped) + exposed copy; "
             f"block copy = {p['block_bytes'] / 1e9:.2f} GB / {sa.pcie_gbs:.0f} GB/s (assumed: PCIe 4.0 x16 "
             "effective host -> device, from pageable mapped pages; pinned staging buffers would be faster); exposed "
             "copy = 48 x max(0, copy - compute per block), since block k+1 is copied while block k computes. "
             f"Memory: non-block weights ({gib(p['other_bytes'])} GiB) + 2 block slots "
             f"({gib(2 * p['block_bytes'])} GiB) in flight, against {gib(p['all_blocks'])} GiB for all 48 blocks "
             "resident; activations of the CFG batch of 2 rows live at once (hidden + residual, q/k/v and, when "
             "u > 1, their exchanged copies, attention output in both layouts, FFN inner 4D; FlashAttention keeps "
             "no score matrix); framework workspace not counted. The host keeps the bf16 blocks once in its page "
             f"cache ({gib(p['all_blocks'])} GiB) for all NPUs of the server; 'host memory read' is what the "
             f"streaming NPUs of one server read from it per second (assumed host bandwidth {sa.host_memory_gbs:.0f} "
             "GB/s). Same peak, utilisations and link as the Ulysses 2 x pipeline 2 projection above; nothing here "
             "was measured on Ascend; the streaming code's Ascend path (copy stream + events) has run only on CPU "
             "kernels through a stand-in of the stream API (tests/unit/test_streaming.py: the bits and the order of the "
             "stream calls, not real asynchrony).")
    return memory + "\n\n" + timing + "\n\n" + notes


def run(args) -> str:
    """`streaming cpu`: the measurement on this machine; `streaming ascend`: the paper projection."""
    if args.target == "ascend":
        return cmd_ascend(args)
    from stepvideo import backend
    backend.init("cpu")
    return cmd_cpu(args)
