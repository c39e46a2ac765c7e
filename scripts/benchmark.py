"""Speed and memory of the Step-Video port, measured on this machine; tables in Markdown.

    python scripts/benchmark.py dit   [--quick] [--append docs/performance.md]
    python scripts/benchmark.py vae | text | step | comm | load   [--quick] [--append FILE]
    python scripts/benchmark.py ascend [--append FILE]     (the paper projection for Ascend 910B)

Every sub-command prints one Markdown table (plus a header line saying what was run,
on which machine and under what load) and, with --append, appends exactly that text
to the given file. --quick uses small sizes and few repeats (CI: well under a minute).

Timing: a median of N runs after warm-up. Each model run is paired with one run of a
reference GEMM (2048x1024 @ 1024x4096, fp32) right before it, so the "fraction of the
GEMM rate" compares like with like even when other processes share the two cores.
FLOPs are counted from the shapes (a multiply-add is 2 FLOPs); see `dit_flops`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GEMM_SHAPE = (2048, 1024, 4096)  # (m, k, n) of the reference GEMM
GEMMS_PER_RUN = 3  # reference GEMMs timed before each model run


# ============================================================================ FLOP formulas


@dataclass(frozen=True)
class DitShape:
    """One DiT forward: b rows (2 with CFG), n video tokens, L text tokens after the cut."""

    layers: int
    heads: int
    head_dim: int
    batch: int
    video_tokens: int
    text_tokens: int  # CLIP + LLM tokens entering cross-attention
    llm_tokens: int = 0  # caption tokens through caption_projection (0: not counted)
    clip_tokens: int = 0
    llm_channels: int = 6144
    clip_channels: int = 1024
    in_channels: int = 64
    out_channels: int = 64
    patch: int = 1

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def block_flops(s: DitShape) -> Dict[str, float]:
    """FLOPs of one transformer block, split into GEMMs (weights) and attention (scores and mixing).

    GEMM: self-attn wqkv 3D^2 + wo D^2, cross wq D^2 + wo D^2 per video token, cross wkv 2D^2
          per text token, FFN 2 x 4D^2 per video token  ->  2 b (14 n D^2 + 2 L D^2)
    attention: QK^T and PV, each 2 n n D (self) and 2 n L D (cross)  ->  4 b D n (n + L)
    """
    b, n, l, d = s.batch, s.video_tokens, s.text_tokens, s.dim
    return {"gemm": 2.0 * b * (14 * n * d * d + 2 * l * d * d),
            "attention": 4.0 * b * d * n * (n + l)}


def dit_flops(s: DitShape) -> Dict[str, float]:
    """Whole forward: blocks + patch embedding, timestep MLP, caption/CLIP projections, output projection."""
    per_block = block_flops(s)
    b, n, d = s.batch, s.video_tokens, s.dim
    edges = 2.0 * b * (n * s.in_channels * s.patch ** 2 * d  # patch embedding
                       + 256 * d + d * d + 6 * d * d  # adaLN-single
                       + s.llm_tokens * (s.llm_channels * d + d * d)  # caption projection (2 layers)
                       + s.clip_tokens * s.clip_channels * d  # CLIP projection
                       + n * d * s.patch ** 2 * s.out_channels)  # proj_out
    return {"gemm": s.layers * per_block["gemm"] + edges, "attention": s.layers * per_block["attention"]}


# ============================================================================ measuring


def load_average() -> float:
    return os.getloadavg()[0]


def machine_line(what: str) -> str:
    import mindspore as ms
    return (f"`benchmark.py {what}` on {datetime.date.today().isoformat()}: "
            f"{os.cpu_count()} CPU(s) {platform.processor() or platform.machine()}, MindSpore {ms.__version__}, "
            f"load average {load_average():.2f} at start")


class GemmReference:
    """The machine's fp32 GEMM rate, measured next to each model run."""

    def __init__(self):
        from mindspore import Tensor
        rng = np.random.default_rng(0)
        m, k, n = GEMM_SHAPE
        self.a = Tensor(rng.standard_normal((m, k), dtype=np.float32))
        self.b = Tensor(rng.standard_normal((k, n), dtype=np.float32))
        self.flops = 2.0 * m * k * n

    def run(self) -> float:
        from mindspore import ops
        t = time.perf_counter()
        ops.matmul(self.a, self.b).asnumpy()
        return time.perf_counter() - t


def _sync(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    out.asnumpy()


@dataclass
class Timing:
    seconds: List[float]
    gemm_seconds: List[float] = field(default_factory=list)
    first_call: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def gemm_rate(self, gemm: GemmReference) -> float:
        return gemm.flops / statistics.median(self.gemm_seconds)

    def best_gemm_rate(self, gemm: GemmReference) -> float:
        return gemm.flops / min(self.gemm_seconds)

    def fractions(self, flops: float, gemm: GemmReference) -> str:
        """'median / best' model run against the machine's GEMM rate (the fastest reference GEMM: other
        processes share the cores, and a disturbed reference would flatter the model)."""
        ref = self.best_gemm_rate(gemm)
        return f"{flops / self.median / ref:.0%} / {flops / self.best / ref:.0%}"


def measure(fn: Callable[[], object], repeats: int, warmup: int, gemm: Optional[GemmReference]) -> Timing:
    t = time.perf_counter()
    _sync(fn())
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        _sync(fn())
    timing = Timing(seconds=[], first_call=first)
    for _ in range(repeats):
        if gemm is not None:
            timing.gemm_seconds += [gemm.run() for _ in range(GEMMS_PER_RUN)]
        t = time.perf_counter()
        _sync(fn())
        timing.seconds.append(time.perf_counter() - t)
    return timing


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fill_random(net, seed: int, std: float = 0.02) -> int:
    """Random weights (norm weights around 1), streamed parameter by parameter; returns bytes."""
    from mindspore import Tensor
    rng = np.random.default_rng(seed)
    total = 0
    for name, p in net.parameters_and_names():
        a = rng.standard_normal(p.shape, dtype=np.float32) * std
        if "norm" in name and name.endswith("weight"):
            a += 1
        p.set_data(Tensor.from_numpy(a))
        total += a.nbytes
    return total


# ============================================================================ dit


def dit_inputs(s: DitShape, frames: int, height: int, width: int, llm_tokens: int, clip_tokens: int, seed: int = 1):
    from mindspore import Tensor
    rng = np.random.default_rng(seed)
    b = s.batch
    return dict(
        hidden_states=Tensor(rng.standard_normal((b, frames, s.in_channels, height, width), dtype=np.float32)),
        timestep=Tensor(np.linspace(0.9, 0.1, b).astype(np.float32)),
        encoder_hidden_states=Tensor(rng.standard_normal((b, llm_tokens, s.llm_channels), dtype=np.float32)),
        encoder_attention_mask=Tensor(np.ones((b, clip_tokens + llm_tokens), np.float32)),
        encoder_hidden_states_2=Tensor(rng.standard_normal((b, clip_tokens, s.clip_channels), dtype=np.float32)),
        return_dict=False)


def build_dit(s: DitShape, seed: int = 0):
    from stepvideo.modules.model import StepVideoModel
    model = StepVideoModel(num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=s.in_channels,
                           out_channels=s.out_channels, num_layers=s.layers, patch_size=s.patch,
                           caption_channels=[s.llm_channels, s.clip_channels])
    fill_random(model, seed)
    model.set_train(False)
    return model


def enable_graph_kernel_fusion() -> None:
    """MindSpore's graph-kernel fusion (AKG) for the compiled graphs; its CPU compiler needs `decorator`."""
    import importlib.util

    import mindspore as ms
    if importlib.util.find_spec("decorator") is None:
        raise SystemExit("--graph-kernel: MindSpore's AKG kernel compiler needs the `decorator` package "
                         "(not in requirements.txt); install it or put it on PYTHONPATH")
    ms.set_context(enable_graph_kernel=True)
    # The kernel compiler writes akg_kernel_meta/ and a lock file into the working directory.
    import atexit
    import shutil
    work = tempfile.mkdtemp(prefix="stepvideo-akg-")
    atexit.register(shutil.rmtree, work, True)
    os.chdir(work)


def cmd_dit(args) -> str:
    from stepvideo import backend
    backend.init("cpu")
    if args.graph_kernel:
        enable_graph_kernel_fusion()
    if args.quick:
        layers, heads, frames, height, width, llm, clip, repeats = 1, 2, 1, 16, 16, 24, 8, 2
    else:
        layers, heads, frames, height, width, llm, clip, repeats = 4, 8, 2, 32, 32, 96, 32, args.repeats
    s = DitShape(layers=layers, heads=heads, head_dim=128, batch=1, video_tokens=frames * height * width,
                 text_tokens=llm + clip, llm_tokens=llm, clip_tokens=clip, llm_channels=256, clip_channels=128)
    model = build_dit(s)
    inputs = dit_inputs(s, frames, height, width, llm, clip)
    gemm = GemmReference()
    flops = dit_flops(s)
    total = flops["gemm"] + flops["attention"]
    # MindSpore's CPU kernels pick their thread count by trying several over their first calls
    # (a kernel's time drops after ~5 calls), so the steady state needs this many warm-up calls.
    warmup = 2 if args.quick else 8
    rows = []
    for mode in args.modes:
        model.set_jit(mode == "jit")
        timing = measure(lambda: model(**inputs), repeats=repeats, warmup=warmup, gemm=gemm)
        rate = total / timing.median
        ref = timing.best_gemm_rate(gemm)
        rows.append([mode + (" + graph-kernel fusion" if args.graph_kernel and mode == "jit" else ""),
                     f"{s.layers} x {s.heads}x{s.head_dim}", f"{s.video_tokens} + {s.text_tokens}",
                     f"{flops['gemm'] / 1e9:.1f} + {flops['attention'] / 1e9:.1f}",
                     f"{timing.first_call:.2f}", f"{timing.median:.3f}", f"{timing.best:.3f}", f"{rate / 1e9:.0f}",
                     f"{ref / 1e9:.0f}", timing.fractions(total, gemm)])
    text = table(["mode", "layers x heads x d", "video + text tokens", "GFLOP (GEMM + attention)",
                  "first call s", "median s", "best s", "GFLOP/s (median)", "GEMM GFLOP/s (best, same run)",
                  "fraction of GEMM rate (median / best)"], rows)
    text += (f"\n\nMedian of {repeats} forwards after {warmup} warm-up calls, fp32, batch 1. {GEMMS_PER_RUN} reference "
             "GEMMs are timed right before each forward; the fractions compare the median and the fastest forward "
             "with the fastest reference GEMM.")
    if args.profile:
        model.set_jit(True)
        text += "\n\n" + profile_table(lambda: model(**inputs), flops, gemm)
    return text


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def profile_table(fn: Callable[[], object], flops: Dict[str, float], gemm: GemmReference, calls: int = 2) -> str:
    """Per-op-type kernel time of `fn` (MindSpore profiler, after the warm-up above), with GEMM efficiencies."""
    import csv
    import glob

    import mindspore as ms
    with tempfile.TemporaryDirectory() as out:
        prof = ms.Profiler(output_path=out)
        t = time.perf_counter()
        for _ in range(calls):
            _sync(fn())
        wall = (time.perf_counter() - t) / calls
        prof.stop()
        with _stdout_to_stderr():  # the analysis prints progress (also from child processes) to stdout
            prof.analyse()
        rows = []
        for path in glob.glob(os.path.join(out, "**", "cpu_op_detail_info_0.csv"), recursive=True):
            with open(path) as f:
                rows += list(csv.DictReader(f))
    by_type: Dict[str, float] = {}
    for r in rows:
        by_type[r["op_type"]] = by_type.get(r["op_type"], 0.0) + float(r["op_total_time(ms)"]) / calls
    kernels = sum(by_type.values())
    ref = gemm.flops / min(gemm.run() for _ in range(5))
    # MatMul kernels run the projections (flops["gemm"]), BatchMatMul the attention products.
    done = {"MatMul": flops["gemm"], "BatchMatMul": flops["attention"]}
    out_rows = []
    for op, ms_ in sorted(by_type.items(), key=lambda kv: -kv[1]):
        if ms_ < 0.005 * kernels:
            continue
        eff = f"{done[op] / (ms_ / 1e3) / 1e9:.0f} GFLOP/s ({done[op] / (ms_ / 1e3) / ref:.0%})" if op in done else ""
        out_rows.append([op, f"{ms_:.1f}", f"{ms_ / kernels:.1%}", eff])
    other = sum(v for k, v in by_type.items() if k not in done)
    out_rows.append(["all non-GEMM kernels", f"{other:.1f}", f"{other / kernels:.1%}", ""])
    out_rows.append(["all kernels (wall per forward under the profiler)", f"{kernels:.1f} ({wall * 1e3:.0f})", "100%",
                     f"reference GEMM {ref / 1e9:.0f} GFLOP/s"])
    return table(["op type (jit, MindSpore profiler)", "ms per forward", "share", "achieved rate (of reference GEMM)"],
                 out_rows) + "\n\nKernel times summed per op type over the compiled forward (types below 0.5% omitted)."


# ============================================================================ vae


class FlopCounter:
    """Counts 2 * out_elements * fan_in for every convolution / linear layer a forward runs.

    fan_in = weight.size / weight.shape[0] for conv (out, in, k...) and linear (out, in) weights alike.
    The VAE's mid-block attention (a few hundred tokens) and the norms are not counted.
    """

    def __init__(self, net):
        self.flops = 0.0
        self.handles = []
        for _, cell in net.cells_and_names():
            weight = getattr(cell, "weight", None)
            if weight is not None and len(weight.shape) >= 2 and not list(cell.cells()):
                self.handles.append(cell.register_forward_hook(self._hook))

    def _hook(self, cell, inputs, output):
        w = cell.weight
        self.flops += 2.0 * float(np.prod(output.shape)) * float(np.prod(w.shape[1:]))

    def remove(self):
        for h in self.handles:
            h.remove()


def cmd_vae(args) -> str:
    from mindspore import Tensor

    from stepvideo import backend
    from synthetic_weights import rule_tensor
    from stepvideo.vae.vae import AutoencoderKL, VaeConfig

    backend.init("cpu")
    config = VaeConfig.tiny() if args.quick else VaeConfig()
    vae = AutoencoderKL(config=config)
    nbytes = 0
    for name, p in vae.parameters_and_names():
        if not name.startswith("encoder."):  # only the decoder side runs
            w = rule_tensor(name, p.shape, salt="benchmark:")
            p.set_data(Tensor.from_numpy(w))
            nbytes += w.nbytes
    z_shape = (1, 3, 64, 2, 2)  # the golden d0 case: one chunk of 3 latents -> 17 frames of 32x32
    z = np.random.default_rng(0).standard_normal(z_shape, dtype=np.float32)
    counter = FlopCounter(vae)
    video = vae.decode(z)
    flops, counter.flops = counter.flops, 0.0
    counter.remove()
    gemm = GemmReference()
    repeats = 2 if args.quick else args.repeats
    timing = measure(lambda: vae.decode(z), repeats=repeats, warmup=1, gemm=gemm)
    rate, ref = flops / timing.median, timing.best_gemm_rate(gemm)
    rows = [["published widths" if not args.quick else "tiny widths", f"{nbytes / 2**20:.0f}",
             f"{tuple(z_shape)} -> {tuple(video.shape)}", f"{flops / 1e9:.1f}", f"{timing.median:.3f}",
             f"{timing.best:.3f}", f"{rate / 1e9:.0f}", f"{ref / 1e9:.0f}", timing.fractions(flops, gemm)]]
    text = table(["VAE decoder", "decoder MiB (fp32)", "latents -> video", "GFLOP (conv + linear)", "median s",
                  "best s", "GFLOP/s (median)", "GEMM GFLOP/s (best, same run)",
                  "fraction of GEMM rate (median / best)"], rows)
    return text + (f"\n\nWeights by the golden rule generator (salt 'benchmark:'), pynative fp32, median of {repeats} "
                   "decodes after one warm-up. FLOPs are counted by hooks on every conv/linear layer that ran.")


# ============================================================================ text


def cmd_text(args) -> str:
    from mindspore import Tensor

    from stepvideo import backend
    from stepvideo.text_encoder.stepllm import Step1Model

    backend.init("cpu")
    if args.quick:
        cfg = dict(hidden_size=256, num_layers=1, num_attention_heads=2, num_attention_groups=1,
                   ffn_hidden_size=512, layernorm_epsilon=1e-5, padded_vocab_size=1024)
    else:
        cfg = dict(hidden_size=1024, num_layers=4, num_attention_heads=8, num_attention_groups=2,
                   ffn_hidden_size=2816, layernorm_epsilon=1e-5, padded_vocab_size=4096)
    tokens = 320
    model = Step1Model(**cfg)
    fill_random(model, seed=0)
    model.set_train(False)
    ids = Tensor(np.random.default_rng(0).integers(0, cfg["padded_vocab_size"], (1, tokens)).astype(np.int64))
    d, s = cfg["hidden_size"], tokens
    hd = d // cfg["num_attention_heads"]
    ffn = 256 * ((cfg["ffn_hidden_size"] + 255) // 256)
    gemm_flops = cfg["num_layers"] * 2.0 * s * (d * (d + 2 * cfg["num_attention_groups"] * hd) + d * d + 3 * d * ffn)
    attn_flops = cfg["num_layers"] * 4.0 * s * s * d  # full score matrix, as computed (causal by masking)
    gemm = GemmReference()
    repeats = 2 if args.quick else args.repeats
    timing = measure(lambda: model(ids), repeats=repeats, warmup=2, gemm=gemm)
    total = gemm_flops + attn_flops
    rate, ref = total / timing.median, timing.best_gemm_rate(gemm)
    rows = [[f"{cfg['num_layers']} x {d} ({cfg['num_attention_heads']} heads, {cfg['num_attention_groups']} groups, "
             f"FFN {ffn})", tokens, f"{gemm_flops / 1e9:.2f} + {attn_flops / 1e9:.2f}", f"{timing.median:.3f}",
             f"{timing.best:.3f}", f"{rate / 1e9:.0f}", f"{ref / 1e9:.0f}", timing.fractions(total, gemm)]]
    text = table(["Step-LLM config", "tokens", "GFLOP (GEMM + attention)", "median s", "best s", "GFLOP/s (median)",
                  "GEMM GFLOP/s (best, same run)", "fraction of GEMM rate (median / best)"], rows)
    return text + f"\n\nRandom weights, pynative fp32, batch 1, median of {repeats} after 2 warm-up calls."


# ============================================================================ step


class _StubText:
    """Fixed caption embeddings in the shapes of the services (77 CLIP + 320 LLM tokens)."""

    def __init__(self, llm_channels: int, clip_channels: int, llm_valid: int):
        self.llm_channels, self.clip_channels, self.llm_valid = llm_channels, clip_channels, llm_valid

    def encode(self, prompts):
        from stepvideo.diffusion.interfaces import CaptionOutput
        rng = np.random.default_rng(0)
        b = len(prompts)
        mask = np.zeros((b, 77 + 320), np.int64)
        mask[:, :77 + self.llm_valid] = 1
        return CaptionOutput(y=rng.standard_normal((b, 320, self.llm_channels), dtype=np.float32), y_mask=mask,
                             clip_embedding=rng.standard_normal((b, 77, self.clip_channels), dtype=np.float32))


class _TimedTransformer:
    """The DiT with the wall time of every call recorded (the output is synced before the clock stops)."""

    def __init__(self, model):
        self.model = model
        self.seconds: List[float] = []

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def __call__(self, **kwargs):
        t = time.perf_counter()
        out = self.model(**kwargs)
        _sync(out)
        self.seconds.append(time.perf_counter() - t)
        return out


def cmd_step(args) -> str:
    from stepvideo import backend
    from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
    from stepvideo.diffusion.video_pipeline import StepVideoPipeline

    backend.init("cpu")
    if args.quick:
        layers, heads, size, steps = 1, 2, 128, 3
    else:
        layers, heads, size, steps = 4, 8, 416, 1 + args.repeats
    s = DitShape(layers=layers, heads=heads, head_dim=128, batch=2, video_tokens=3 * (size // 16) ** 2,
                 text_tokens=77 + 64, llm_channels=256, clip_channels=128)
    model = build_dit(s)
    model.set_jit(not args.quick)
    dit = _TimedTransformer(model)
    pipe = StepVideoPipeline(dit, FlowMatchDiscreteScheduler(), text_encoding=_StubText(256, 128, llm_valid=64))
    ends: List[float] = []
    pipe(prompt="a cat", height=size, width=size, num_frames=17, num_inference_steps=steps, guidance_scale=9.0,
         output_type="latent", seed=0, progress=False, callback=lambda i, _: ends.append(time.perf_counter()))
    # Step i >= 1 runs from the end of step i-1 to the end of step i (step 0 also compiles).
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    dit_s = dit.seconds[1:]
    outside = [st - dt for st, dt in zip(step_s, dit_s)]
    med_step, med_out = statistics.median(step_s), statistics.median(outside)
    rows = [[f"{s.layers} x {s.heads}x{s.head_dim}{' (jit)' if not args.quick else ''}",
             f"17 x {size} x {size} -> {s.video_tokens} tokens, CFG batch 2", len(step_s), f"{med_step:.3f}",
             f"{statistics.median(dit_s):.3f}", f"{med_out * 1e3:.1f}", f"{med_out / med_step:.2%}"]]
    text = table(["DiT", "video", "steps timed", "median step s", "median DiT s", "outside the DiT ms",
                  "outside share"], rows)
    return text + ("\n\nOne `StepVideoPipeline` denoising step (CFG batch, guidance 9, scheduler step in fp32) with "
                   "in-process stub text embeddings; 'outside' = step wall time - DiT call wall time (first step "
                   "excluded). Target: <= 2%.")


# ============================================================================ load

_LOAD_PROBE = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[2])
    from stepvideo import backend
    backend.init("cpu")
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.checkpoint import load_weights, read_config

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    model = StepVideoModel.from_config_dict(read_config(sys.argv[1]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss0 = status("VmRSS")
    t = time.perf_counter()
    report = load_weights(model, sys.argv[1])
    seconds = time.perf_counter() - t
    print(json.dumps({"peak": status("VmHWM") - rss0, "final": status("VmRSS") - rss0, "bytes": report.bytes,
                      "tensors": report.tensors, "seconds": seconds}))
""")


def _write_dit_checkpoint(folder: Path, s: DitShape, bf16: bool, shard_mib: int) -> int:
    """A sharded transformer/ folder (config.json + shards + index) with random weights; returns file bytes."""
    from stepvideo.checkpoint import save_sharded
    from stepvideo.modules.model import StepVideoModel
    model = StepVideoModel(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.layers,
                           caption_channels=[s.llm_channels, s.clip_channels])
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(p.shape, dtype=np.float32) * 0.02 for name, p in model.parameters_and_names()}
    save_sharded(tensors, folder, "diffusion_pytorch_model", max_shard_bytes=shard_mib * 2**20, bf16=bf16)
    (folder / "config.json").write_text(json.dumps(dict(model.config), default=list))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def cmd_load(args) -> str:
    from stepvideo import backend
    backend.init("cpu")
    if args.quick:
        s = DitShape(layers=2, heads=2, head_dim=128, batch=1, video_tokens=0, text_tokens=0,
                     llm_channels=256, clip_channels=128)
        shard_mib = 4
    else:
        s = DitShape(layers=8, heads=8, head_dim=128, batch=1, video_tokens=0, text_tokens=0,
                     llm_channels=1024, clip_channels=256)
        shard_mib = 100
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (True, False):
            folder = Path(tmp) / ("bf16" if bf16 else "fp32")
            file_bytes = _write_dit_checkpoint(folder, s, bf16, shard_mib)
            shards = len(list(folder.glob("*.safetensors")))
            run = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(folder), str(ROOT)], capture_output=True,
                                 text=True, timeout=600, env=dict(os.environ, GLOG_v="3"))
            if run.returncode != 0:
                raise RuntimeError(f"load probe failed (rc={run.returncode}): {run.stderr[-2000:]}")
            probe = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append([f"{s.layers} x {s.dim} DiT", "bf16" if bf16 else "fp32", shards,
                         f"{file_bytes / 2**20:.0f}", f"{probe['bytes'] / 2**20:.0f}", f"{probe['seconds']:.2f}",
                         f"{probe['peak'] / 2**20:.0f}", f"{probe['peak'] / probe['bytes']:.2f}",
                         f"{probe['final'] / probe['bytes']:.2f}"])
    text = table(["checkpoint", "file dtype", "shards", "files MiB", "weights MiB (fp32 params)", "load s",
                  "peak RSS growth MiB", "peak / weights", "final / weights"], rows)
    return text + ("\n\nA fresh process builds the model lazily, resets VmHWM (/proc/self/clear_refs), then streams "
                   "the shards with `load_weights`; growth is measured against the RSS just before loading. "
                   "Target: peak <= 1.3x the weights.")


# ============================================================================ comm

_COMM_WORKER = textwrap.dedent("""
    import json, statistics, sys, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from mindspore import Tensor
    from stepvideo import backend
    backend.init("cpu")
    from stepvideo.parallel.collectives import init_process_group, make_collectives
    from stepvideo.parallel.mesh import Mesh
    tokens, dim, heads, repeats = (int(v) for v in sys.argv[2:6])
    world = init_process_group()
    rank = world.rank
    rng = np.random.default_rng(rank)
    result = {"rank": rank}
    # Ulysses: the q/k/v exchange (b, n/u, 3, H, d) -> (b, n, 3, H/u, d) and the output back.
    sp = make_collectives(Mesh(rank=rank, world_size=2, ulysses_degree=2, pp_degree=1))
    qkv = Tensor(rng.standard_normal((1, tokens // 2, 3, heads, dim // heads), dtype=np.float32))
    out = Tensor(rng.standard_normal((1, tokens, heads // 2, dim // heads), dtype=np.float32))
    times = []
    for i in range(repeats + 1):
        sp.barrier()
        t = time.perf_counter()
        sp.sp_all_to_all(qkv, scatter_dim=3, gather_dim=1).asnumpy()
        sp.sp_all_to_all(out, scatter_dim=1, gather_dim=2).asnumpy()
        times.append(time.perf_counter() - t)
    result["ulysses_s"] = statistics.median(times[1:])
    result["ulysses_bytes"] = int(qkv.nbytes + out.nbytes)
    # Pipeline hand-off: the hidden-state shard (b, n, D) from stage 0 (rank 0) to stage 1 (rank 1).
    pp = make_collectives(Mesh(rank=rank, world_size=2, ulysses_degree=1, pp_degree=2))
    hidden = Tensor(rng.standard_normal((1, tokens, dim), dtype=np.float32))
    times = []
    for i in range(repeats + 1):
        pp.barrier()
        t = time.perf_counter()
        if rank == 0:
            pp.send({"hidden": hidden}, 1)
        else:
            pp.recv(0)["hidden"].asnumpy()
        times.append(time.perf_counter() - t)
    result["handoff_s"] = statistics.median(times[1:])
    result["handoff_bytes"] = int(hidden.nbytes)
    pp.barrier()  # the sender's last broadcast must complete before the receiver exits
    print("COMM_RESULT " + json.dumps(result), flush=True)
""")


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_comm_job(tokens: int, dim: int, heads: int, repeats: int) -> List[dict]:
    """The exchange worker under `msrun --worker_num=2`; returns each rank's result."""
    import psutil
    msrun = Path(sys.executable).with_name("msrun")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "comm_worker.py"
        script.write_text(_COMM_WORKER)
        cmd = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True",
               "--cluster_time_out=60", f"--log_dir={tmp}/logs", str(script), str(ROOT), str(tokens), str(dim),
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


def published_config() -> Dict[str, object]:
    return {"num_attention_heads": 48, "attention_head_dim": 128, "num_layers": 48, "patch_size": 1,
            "in_channels": 64, "out_channels": 64}


def cmd_comm(args) -> str:
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
    results = _run_comm_job(tokens, dim, heads, args.repeats)
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


# ============================================================================ ascend (paper)


@dataclass(frozen=True)
class AscendAssumptions:
    """Device numbers the projection assumes (910B class; change them to re-run the arithmetic)."""

    peak_tflops: float = 313.0  # bf16 dense, per device
    hbm_gbs: float = 1600.0  # HBM bandwidth per device, GB/s
    hbm_gib: float = 64.0
    link_gbs: float = 56.0  # HCCS, one direction between two devices, GB/s
    gemm_util: float = 0.60  # of peak, large bf16 GEMMs
    flash_util: float = 0.50  # of peak, FlashAttentionScore forward, head dim 128, long sequences


def _human(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def ascend_projection(a: AscendAssumptions = AscendAssumptions(), steps: int = 50, u: int = 2, pp: int = 2) -> dict:
    """FLOPs, memory, traffic and time of 544x992x204 (50 steps, CFG) on u x pp 910B devices, from the shapes."""
    from stepvideo.parallel.pipeline import step_traffic
    s = DitShape(layers=48, heads=48, head_dim=128, batch=2, video_tokens=36 * 34 * 62, text_tokens=77 + 320,
                 llm_tokens=320, clip_tokens=77)
    d, n, L, b = s.dim, s.video_tokens, s.text_tokens, s.batch
    flops = dit_flops(s)
    per_block = block_flops(s)
    cross = 4.0 * b * d * n * L * s.layers
    devices = u * pp
    # Per device: its stage's layers, its 1/u of the tokens (GEMMs) or of the heads (attention).
    dev_gemm, dev_attn = flops["gemm"] / devices, flops["attention"] / devices
    t_gemm = dev_gemm / (a.peak_tflops * 1e12 * a.gemm_util)
    t_attn = dev_attn / (a.peak_tflops * 1e12 * a.flash_util)
    # Memory-bound passes over the local (n/u, D) bf16 activations per block and batch row (read + write):
    # adaLN/LayerNorm x2, gates/residuals x3, cross q-norm, GELU (4D wide = 4 passes), q/k norm + RoPE (fused: 2).
    one_pass = n / u * d * 2 * 2
    passes_base = 2 + 3 + 1 + 4 + 2
    layers_per_stage = s.layers // pp
    t_vector = lambda passes: passes * one_pass * b * layers_per_stage / (a.hbm_gbs * 1e9)  # noqa: E731
    traffic = step_traffic(published_config(), (1, 36, 64, 34, 62), L, u, pp, itemsize=2, batch=b)
    sp_bytes = max(t.get("sp_all_to_all", 0) for t in traffic)
    t_sp = sp_bytes * (u - 1) / u / (a.link_gbs * 1e9)  # what leaves the rank, not overlapped
    handoff_bytes = max(t.get("send", 0) for t in traffic)
    t_handoff = handoff_bytes / (a.link_gbs * 1e9)

    def step_time(micro_batches: int, extra_passes: int) -> float:
        stage = t_gemm + t_attn + t_vector(passes_base + extra_passes) + t_sp + t_handoff
        return stage * (micro_batches + pp - 1) / micro_batches  # pipeline fill/drain: (M+P-1)/M

    variants = [
        ("this design: micro-batched pipeline (2 rows), BSND FlashAttentionScore, fused QK-norm + RoPE", 2, 0),
        ("no micro-batching (one batch of 2 through the stages)", 1, 0),
        ("BNSD attention layout (4 extra transposes of q/k/v/out per block)", 2, 4),
        ("QK-norm and RoPE unfused (6 extra passes over q and k per block)", 2, 6),
        ("all three undone (the earlier port's structure)", 1, 10),
    ]
    times = [(name, steps * step_time(m, extra)) for name, m, extra in variants]
    # Memory per device (bf16): the parameters the heavier stage owns (counted on the lazily built
    # published model, which allocates nothing), activations of one micro-batch row.
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.parallel.pipeline import plan_stages
    model = StepVideoModel.from_config_dict(published_config())
    sizes = {name: int(np.prod(par.shape)) for name, par in model.parameters_and_names()}
    weights = max(sum(c for name, c in sizes.items() if plan.owns(name)) for plan in plan_stages(s.layers, pp)) * 2
    local = n // u
    act = {"hidden + residual": 2 * local * d * 2, "q, k, v (local) + exchanged": 2 * 3 * local * d * 2,
           "attention out (both layouts)": 2 * local * d * 2, "FFN inner (4D)": local * 4 * d * 2,
           "text tokens + modulation": (L + 8) * d * 2}
    act_bytes = sum(act.values())
    return {"shape": s, "flops": flops, "per_block": per_block, "cross": cross, "dev_gemm": dev_gemm,
            "dev_attn": dev_attn, "t_gemm": t_gemm, "t_attn": t_attn, "t_vector": t_vector(passes_base),
            "t_sp": t_sp, "t_handoff": t_handoff, "sp_bytes": sp_bytes, "handoff_bytes": handoff_bytes,
            "traffic": traffic, "weights": weights, "activations": act, "act_bytes": act_bytes, "times": times,
            "assumptions": a, "steps": steps, "u": u, "pp": pp}


def cmd_ascend(args) -> str:
    p = ascend_projection()
    a, s = p["assumptions"], p["shape"]
    f = p["flops"]
    total = f["gemm"] + f["attention"]
    parts = []
    parts.append(table(["per denoising step (CFG batch 2, 48 blocks)", "FLOP", "share"], [
        ["GEMMs (projections, FFN, embeddings)", _human(f["gemm"], "FLOP"), f"{f['gemm'] / total:.1%}"],
        ["self-attention QK^T + PV (75,888 tokens)", _human(f["attention"] - p["cross"], "FLOP"),
         f"{(f['attention'] - p['cross']) / total:.1%}"],
        ["cross-attention QK^T + PV (397 text tokens)", _human(p["cross"], "FLOP"), f"{p['cross'] / total:.2%}"],
        ["total", _human(total, "FLOP"), "100%"],
        [f"per device (u{p['u']} x pp{p['pp']}): GEMM / attention", f"{_human(p['dev_gemm'], 'FLOP')} / "
         f"{_human(p['dev_attn'], 'FLOP')}", ""],
    ]))
    act_rows = [[k, f"{v / 2**30:.2f}"] for k, v in p["activations"].items()]
    peak = p["weights"] + p["act_bytes"]
    parts.append(table(["memory per device (bf16)", "GiB"], [
        [f"weights: {s.layers // p['pp']} blocks + embeddings/output", f"{p['weights'] / 2**30:.2f}"]] + act_rows + [
        ["peak (weights + live activations of one row, FlashAttention: no score matrix)", f"{peak / 2**30:.2f}"],
        [f"device HBM ({a.hbm_gib:.0f} GiB) left for the framework and allocator", f"{a.hbm_gib - peak / 2**30:.1f}"],
    ]))
    tr_rows = []
    for stage, t in enumerate(p["traffic"]):
        for op, nbytes in sorted(t.items()):
            tr_rows.append([f"stage {stage}", op, f"{nbytes / 2**30:.2f}"])
    parts.append(table(["rank", "collective", "GiB handed per step"], tr_rows))
    parts.append(table(["per-device time of one step (whole batch, no bubble)", "s"], [
        [f"GEMMs at {a.gemm_util:.0%} of {a.peak_tflops:.0f} TFLOP/s", f"{p['t_gemm']:.2f}"],
        [f"FlashAttentionScore at {a.flash_util:.0%}", f"{p['t_attn']:.2f}"],
        [f"vector passes at {a.hbm_gbs:.0f} GB/s", f"{p['t_vector']:.2f}"],
        [f"Ulysses all-to-all, (u-1)/u of {p['sp_bytes'] / 2**30:.1f} GiB at {a.link_gbs:.0f} GB/s, not overlapped",
         f"{p['t_sp']:.2f}"],
        [f"stage hand-off {p['handoff_bytes'] / 2**30:.2f} GiB", f"{p['t_handoff']:.3f}"],
    ]))
    base = p["times"][0][1]
    t_rows = [[name, f"{sec:,.0f}", f"{sec / base:.2f}x"] for name, sec in p["times"]]
    t_rows += [["earlier MindSpore port, Ascend 910*, u2 x pp2 (measured, mindone README)", "~3,847", ""],
               ["original, 4 GPUs with flash-attn (measured, stepfun README)", "743", ""]]
    parts.append(table([f"{p['steps']} steps of 544x992x204 on 4 devices", "projected s", "vs this design"],
                       t_rows))
    return "\n\n".join(parts) + "\n\nComputed by `ascend_projection()` in scripts/benchmark.py from the shapes and " \
        "the stated assumptions (peak, utilisations, bandwidths); nothing here was measured on Ascend."


# ============================================================================ main

COMMANDS = {"dit": cmd_dit, "vae": cmd_vae, "text": cmd_text, "step": cmd_step, "comm": cmd_comm, "load": cmd_load,
            "ascend": cmd_ascend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--modes", nargs="+", default=["pynative", "jit"], choices=["pynative", "jit"],
                   help="DiT execution modes to measure (dit)")
    p.add_argument("--profile", action="store_true", help="dit: add a per-op-type profile of the compiled forward")
    p.add_argument("--graph-kernel", action="store_true",
                   help="dit: also fuse element-wise ops in the compiled graphs (AKG; needs `decorator`)")
    p.add_argument("--append", metavar="FILE", help="append the printed section to this Markdown file")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    shown = [a for i, a in enumerate(argv) if a != "--append" and (i == 0 or argv[i - 1] != "--append")]
    append = Path(args.append).resolve() if args.append else None
    header = machine_line(" ".join(shown))
    body = COMMANDS[args.command](args)
    section = f"\n{header}\n\n{body}\n"
    print(section)
    if append:
        with open(append, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
