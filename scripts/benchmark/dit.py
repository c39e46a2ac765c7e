"""`dit`: the DiT forward, eager and compiled, against the machine's GEMM rate; --profile per op type."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict

import numpy as np

from benchmark.flops import DitShape, dit_flops
from benchmark.measure import (GEMMS_PER_RUN, GemmReference, fill_synthetic, measure, stdout_to_stderr, sync,
                               table)


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


def build_dit(s: DitShape):
    """A DiT of shape `s` with synthetic weights, in inference mode."""
    from stepvideo.modules.model import StepVideoModel
    model = StepVideoModel(num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=s.in_channels,
                           out_channels=s.out_channels, num_layers=s.layers, patch_size=s.patch,
                           caption_channels=[s.llm_channels, s.clip_channels])
    fill_synthetic(model)
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


def run(args) -> str:
    """`dit`: forward time of a small DiT, eager and compiled, against the GEMM rate (--profile: per op type)."""
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


def profile_table(fn: Callable[[], object], flops: Dict[str, float], gemm: GemmReference, calls: int = 2) -> str:
    """Per-op-type kernel time of `fn` (MindSpore profiler, after the warm-up above), with GEMM efficiencies."""
    import csv
    import glob

    import mindspore as ms
    with tempfile.TemporaryDirectory() as out:
        prof = ms.Profiler(output_path=out)
        t = time.perf_counter()
        for _ in range(calls):
            sync(fn())
        wall = (time.perf_counter() - t) / calls
        prof.stop()
        with stdout_to_stderr():  # the analysis prints progress (also from child processes) to stdout
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
