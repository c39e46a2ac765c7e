"""`ascend`: the paper projection for Ascend 910B (nothing here is measured).

Time, memory and traffic of 544x992x204, 50 steps with CFG, on Ulysses 2 x pipeline 2
devices, from the model's shapes (`flops`), the bytes `DistributedDiT` hands to each
collective (`stepvideo.parallel.pipeline.step_traffic`) and the device numbers in
`AscendAssumptions` (peak, utilisations, bandwidths), which every table states.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmark.flops import DitShape, block_flops, dit_flops, published_config
from benchmark.measure import table


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


def run(args) -> str:
    """`ascend`: the projection's tables (FLOPs, memory, traffic, time) for 544x992x204 on 4 devices."""
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
    return "\n\n".join(parts) + ("\n\nComputed by `ascend_projection()` in scripts/benchmark/ascend.py from the "
                                 "shapes and the stated assumptions (peak, utilisations, bandwidths); nothing here "
                                 "was measured on Ascend.")
