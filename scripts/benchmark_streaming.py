"""Block streaming (--offload blocks): memory and time against the resident DiT, and its Ascend projection.

    python scripts/benchmark_streaming.py cpu    [--quick] [--blocks N] [--file_dtype fp32|bf16] [--append FILE]
    python scripts/benchmark_streaming.py ascend [--append FILE]

`cpu` writes a medium DiT (N blocks of 8 x 128 heads, D = 1024; 64 blocks = 4.3 GB as fp32
safetensors shards + index) into a temp folder, reads the files once (warm page cache), then
runs, each in a fresh process: the resident DiT, the streamed DiT, and the streamed DiT under
msrun with 2 ranks (Ulysses 2: both ranks stream the same blocks from the same mapped files).
Each process builds the model lazily, resets its peak-RSS counter, loads, runs one warm-up DiT
call (the compile), then times `--steps` DiT calls of one denoising step (CFG batch 2, 256
video tokens, 80 text tokens); a thread samples /proc/self/smaps_rollup every 50 ms. The temp
folder is deleted at the end.

`ascend` is the paper projection for Ascend 910B (no NPU here): one device streaming all 48
blocks, and four devices with Ulysses 4 + streaming, next to today's Ulysses 2 x pipeline 2,
from the formulas and assumptions of `benchmark.ascend_projection` plus a PCIe bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402

from benchmark.ascend import AscendAssumptions, ascend_projection  # noqa: E402
from benchmark.flops import DitShape, block_flops, dit_flops, published_config  # noqa: E402
from benchmark.measure import machine_line, table  # noqa: E402

TOKENS = (1, 16, 16)  # latent frames, height, width: 256 video tokens
LLM_TOKENS, CLIP_TOKENS = 64, 16
CHANNELS = (1024, 256)  # caption channels of the medium model (LLM, CLIP)


# ============================================================================ the probe (one process / rank)


class SmapsSampler:
    """Maxima over time of /proc/self/smaps_rollup's fields (bytes), and of the checkpoint files' mappings.

    smaps_rollup's Shared_Clean is mostly the shared libraries (MindSpore's); `folder_peak` counts only
    the mappings of files under `folder` (the mapped shards), read from /proc/self/smaps every 4th tick.
    """

    FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")

    def __init__(self, folder: str, period: float = 0.05):
        self.folder = str(Path(folder).resolve())
        self.period = period
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.folder_peak = {"Rss": 0, "Pss": 0, "Shared_Clean": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> Dict[str, int]:
        out = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in SmapsSampler.FIELDS:
                    out[name] = int(rest.split()[0]) * 1024
        return out

    def read_folder(self) -> Dict[str, int]:
        out = dict.fromkeys(self.folder_peak, 0)
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: address range ... path
                    inside = line.rstrip().endswith(".safetensors") and self.folder in line
                elif inside:
                    name, _, rest = line.partition(":")
                    if name in out:
                        out[name] += int(rest.split()[0]) * 1024
        return out

    def _run(self):
        tick = 0
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            if tick % 4 == 0:
                for k, v in self.read_folder().items():
                    self.folder_peak[k] = max(self.folder_peak[k], v)
            tick += 1
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _inputs(batch: int = 2):
    from mindspore import Tensor
    rng = np.random.default_rng(1)
    frames, h, w = TOKENS
    return dict(hidden_states=Tensor(rng.standard_normal((batch, frames, 64, h, w), dtype=np.float32)),
                timestep=Tensor(np.linspace(900, 100, batch).astype(np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((batch, LLM_TOKENS, CHANNELS[0]), dtype=np.float32)),
                encoder_attention_mask=Tensor(np.ones((batch, CLIP_TOKENS + LLM_TOKENS), np.float32)),
                encoder_hidden_states_2=Tensor(rng.standard_normal((batch, CLIP_TOKENS, CHANNELS[1]),
                                                                   dtype=np.float32)),
                return_dict=False)


def probe(folder: str, mode: str, steps: int, jit: bool) -> dict:
    """Load (resident or streamed), one warm-up call, `steps` timed calls; memory and time of this process."""
    from stepvideo import backend
    backend.init("cpu")
    from stepvideo.checkpoint import read_config
    from stepvideo.modules.model import StepVideoModel

    distributed = os.environ.get("MS_ROLE") in ("MS_SCHED", "MS_WORKER")  # msrun runs this in its scheduler too
    config = read_config(folder)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss0 = _status("VmRSS")
    streamer = None
    t0 = time.perf_counter()
    with SmapsSampler(folder) as sampler:
        if distributed:
            from stepvideo.parallel.collectives import init_process_group, make_collectives
            from stepvideo.parallel.mesh import Mesh
            from stepvideo.parallel.pipeline import DistributedDiT
            world = init_process_group()
            mesh = Mesh(rank=world.rank, world_size=world.world_size, ulysses_degree=world.world_size, pp_degree=1)
            collectives = make_collectives(mesh)
            rss0 = _status("VmRSS")  # after the process group: its buffers are not weights
            dit = DistributedDiT.from_pretrained(folder, mesh, collectives, offload=mode == "streamed")
            model, streamer, loaded = dit, dit.streamer, dit.load_report["bytes"]
        else:
            model = StepVideoModel.from_config_dict(config)
            if mode == "streamed":
                from stepvideo.streaming import dit_streaming
                report, streamer = dit_streaming(model, folder, range(config["num_layers"]))
            else:
                from stepvideo.checkpoint import load_weights
                report = load_weights(model, folder)
            model.set_train(False)
            loaded = report.bytes
        load_s = time.perf_counter() - t0
        after_load = _status("VmRSS") - rss0
        model.set_jit(jit)
        inputs = _inputs()
        t = time.perf_counter()
        model(**inputs).asnumpy()
        first = time.perf_counter() - t
        if streamer is not None:
            streamer.stats.wait_seconds = streamer.stats.fill_seconds = 0.0
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(**inputs).asnumpy()
            times.append(time.perf_counter() - t)
    result = {"mode": mode, "rank": int(os.environ.get("RANK_ID", 0)) if distributed else 0,
              "loaded_bytes": loaded, "load_s": load_s, "after_load": after_load,
              "peak": _status("VmHWM") - rss0, "rss0": rss0, "first_call_s": first, "step_s": times,
              "smaps_peak": sampler.peak, "smaps_end": SmapsSampler.read(), "files_peak": sampler.folder_peak,
              "stream": streamer.stats.as_dict() if streamer else None,
              "slot_bytes": streamer.slot_bytes() if streamer else 0}
    return result


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
    """Sharded safetensors + index, tensor by tensor (never the whole model in memory); returns byte counts."""
    from stepvideo.checkpoint import named_parameters
    from stepvideo.utils import safetensors_io as st
    folder.mkdir(parents=True)
    params = named_parameters(m.build())
    rng = np.random.default_rng(0)
    itemsize = 2 if bf16 else 4
    # One shard per block (~64 MiB bf16 / ~128 MiB fp32 for D = 1024) and one for the rest.
    groups: Dict[str, List[str]] = {}
    for name in params:
        key = name.split(".")[1] if name.startswith("transformer_blocks.") else "rest"
        groups.setdefault(key, []).append(name)
    n = len(groups)
    weight_map, counts = {}, {"block": 0, "other": 0}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0] == "rest", int(kv[0])
                                                                           if kv[0] != "rest" else 0)), 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {nm: (0.02 * rng.standard_normal(params[nm].shape, dtype=np.float32)) for nm in names}
        st.save_file(folder / fname, tensors, bf16=tensors.keys() if bf16 else ())
        for nm, a in tensors.items():
            weight_map[nm] = fname
            counts["block" if key != "rest" else "other"] += a.size * itemsize
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(counts.values())}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(dict(m.build().config), default=list))
    return counts


def _read_all(folder: Path) -> float:
    """Read every file once so the page cache is warm; returns seconds."""
    t = time.perf_counter()
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass
    return time.perf_counter() - t


def _run_probe(folder: Path, mode: str, steps: int, jit: bool) -> dict:
    run = subprocess.run([sys.executable, __file__, "probe", str(folder), mode, str(steps), str(int(jit))],
                         capture_output=True,
                         text=True, timeout=3600, env=dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT)))
    if run.returncode != 0:
        raise RuntimeError(f"{mode} probe failed (rc={run.returncode}): {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1].split(" ", 1)[1])


def _run_probe_msrun(folder: Path, mode: str, steps: int, jit: bool, workers: int) -> List[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as logs:
        cmd = [str(Path(sys.executable).with_name("msrun")), f"--worker_num={workers}",
               f"--local_worker_num={workers}", f"--master_port={port}", "--join=True", "--cluster_time_out=120",
               f"--log_dir={logs}", __file__, "probe", str(folder), mode, str(steps), str(int(jit))]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=logs,
                             env=dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), STEPVIDEO_DEVICE="cpu"))
        results = []
        for rank in range(workers):
            log = (Path(logs) / f"worker_{rank}.log").read_text(errors="replace")
            lines = [l for l in log.splitlines() if l.startswith("PROBE_RESULT ")]
            if run.returncode != 0 or not lines:
                raise RuntimeError(f"msrun {mode} probe failed (rc={run.returncode}): {log[-3000:]}")
            results.append(json.loads(lines[-1].split(" ", 1)[1]))
    return results


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def cmd_cpu(args) -> str:
    m = Model(blocks=3 if args.quick else args.blocks, heads=2 if args.quick else 8)
    steps = 1 if args.quick else args.steps
    bf16 = args.file_dtype == "bf16"
    tmp = Path(tempfile.mkdtemp(prefix="stepvideo-streaming-", dir=args.tmp))
    try:
        folder = tmp / "transformer"
        counts = write_checkpoint(folder, m, bf16)
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        warm_s = _read_all(folder)
        per_block_fp32 = counts["block"] * (2 if bf16 else 1) // m.blocks
        other_fp32 = counts["other"] * (2 if bf16 else 1)
        jit = not args.eager
        runs = [("1 process, resident", [_run_probe(folder, "resident", steps, jit)]),
                ("1 process, --offload blocks", [_run_probe(folder, "streamed", steps, jit)])]
        if not args.no_msrun:
            runs.append(("2 ranks (Ulysses 2), resident", _run_probe_msrun(folder, "resident", steps, jit, 2)))
            runs.append(("2 ranks (Ulysses 2), --offload blocks", _run_probe_msrun(folder, "streamed", steps, jit, 2)))
    finally:
        shutil.rmtree(tmp)
    resident = runs[0][1][0]
    # Activations + runtime (compiled graphs, buffers): what the resident run holds beyond its weights.
    activations = resident["peak"] - resident["loaded_bytes"]
    bound = other_fp32 + 3 * per_block_fp32 + activations
    rows = []
    for i, (name, results) in enumerate(runs):
        # "vs resident": against the resident run of the same layout and rank (the run before a streamed one)
        for rank, r in enumerate(results):
            reference = runs[i - 1][1][rank] if r["mode"] == "streamed" else r
            sm = r["smaps_peak"]
            stream = r["stream"]
            step = statistics.median(r["step_s"])
            files = r["files_peak"]
            rows.append([name + (f", rank {r['rank']}" if len(results) > 1 else ""), _mib(r["loaded_bytes"]),
                         f"{r['load_s']:.1f}", _mib(r["peak"]), _mib(sm["Rss"]), _mib(sm["Pss"]),
                         _mib(sm["Anonymous"]), f"{_mib(files['Rss'])} / {_mib(files['Shared_Clean'])} / "
                         f"{_mib(files['Pss'])}", f"{r['first_call_s']:.1f}",
                         f"{step:.2f}", f"{step / statistics.median(reference['step_s']):.2f}",
                         "-" if stream is None else f"{stream['wait_s'] / len(r['step_s']):.3f}"])
    text = table(["run", "weights loaded MiB", "load s", "peak RSS growth MiB", "max Rss MiB", "max Pss MiB",
                  "max Anonymous MiB", "mapped shards: max Rss / Shared_Clean / Pss MiB", "first call s",
                  "median step s", "vs resident",
                  "compute waited for fills, s per step"], rows)
    streamed_peak = runs[1][1][0]["peak"]
    text += "\n\n" + table(["bound (issue 17, item 4)", "MiB"], [
        [f"non-block weights (fp32)", _mib(other_fp32)],
        [f"3 blocks (fp32, {_mib(per_block_fp32)} MiB each)", _mib(3 * per_block_fp32)],
        ["activations + runtime (resident peak growth - resident weights)", _mib(activations)],
        ["bound: non-block + 3 blocks + activations", _mib(bound)],
        ["streamed peak RSS growth (1 process)", _mib(streamed_peak)],
        ["streamed peak within the bound", "yes" if streamed_peak <= bound else "NO"],
    ])
    text += (f"\n\nModel: {m.blocks} blocks of {m.heads} x {m.head_dim} heads (D = {m.heads * m.head_dim}), caption "
             f"channels {CHANNELS[0]}/{CHANNELS[1]}; {args.file_dtype} safetensors, one shard per block + one for the "
             f"rest, {disk / 1e9:.2f} GB on disk ({disk / 2**30:.2f} GiB), {_mib(other_fp32 + m.blocks * per_block_fp32)}"
             f" MiB of fp32 parameters. Page cache warmed by reading the files once ({warm_s:.1f} s) before the runs. "
             f"A step is one {'eager' if args.eager else 'compiled'} DiT call on the CFG batch (2 x {TOKENS[0] * TOKENS[1] * TOKENS[2]} video tokens, "
             f"{LLM_TOKENS + CLIP_TOKENS} text tokens), median of {steps} after one warm-up call. "
             "Peak RSS growth: VmHWM after the run minus RSS before loading (after the process group under msrun). "
             "Rss / Pss / Anonymous: maxima of /proc/self/smaps_rollup sampled every 50 ms (Pss divides each "
             "shared page by the number of processes mapping it); 'mapped shards': maxima over the mappings of the "
             "checkpoint files only (/proc/self/smaps every 200 ms). 'Compute waited': time the block loop "
             "spent waiting for a fill that was not done (the part of the streaming not hidden behind compute).")
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
    notes = (f"Formulas (`streaming_projection()` in scripts/benchmark_streaming.py, on top of "
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
             "was measured on Ascend, and the streaming code's Ascend path (copy stream + events) has not run.")
    return memory + "\n\n" + timing + "\n\n" + notes


# ============================================================================ main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "probe":  # internal: one measured process (or msrun worker)
        print("PROBE_RESULT " + json.dumps(probe(argv[1], argv[2], int(argv[3]), argv[4] == "1")), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("cpu", "ascend"))
    p.add_argument("--quick", action="store_true", help="cpu: 3 small blocks, one timed step (CI)")
    p.add_argument("--blocks", type=int, default=64, help="cpu: DiT blocks of 8 x 128 heads (64: 4.3 GB in fp32)")
    p.add_argument("--file_dtype", choices=("fp32", "bf16"), default="fp32", help="cpu: dtype of the safetensors")
    p.add_argument("--steps", type=int, default=3, help="cpu: timed DiT calls per run")
    p.add_argument("--no_msrun", action="store_true", help="cpu: skip the 2-rank runs")
    p.add_argument("--eager", action="store_true",
                   help="cpu: run the DiT op by op. Compiled, each block's graph keeps its own intermediates on CPU "
                        "(~430 MiB per block at 2 x 512 tokens, D = 1024): 64 blocks need ~27 GiB either way")
    p.add_argument("--tmp", default=None, help="cpu: folder for the temporary checkpoint (default: the system's)")
    p.add_argument("--append", metavar="FILE", help="append the printed section to this Markdown file")
    args = p.parse_args(argv)
    shown = [a for i, a in enumerate(argv) if a != "--append" and (i == 0 or argv[i - 1] != "--append")]
    header = machine_line("streaming " + " ".join(shown)).replace("`benchmark.py streaming", "`benchmark_streaming.py")
    body = cmd_cpu(args) if args.command == "cpu" else cmd_ascend(args)
    section = f"\n{header}\n\n{body}\n"
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
