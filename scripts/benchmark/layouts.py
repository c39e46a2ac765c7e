"""`layouts`: time and memory of every 4- and 8-device layout (pp x cfg x tensor x Ulysses) on paper.

544x992x204, 50 steps with CFG, on Ascend 910B class devices with the numbers of
`ascend.AscendAssumptions`; the formula of each term is in `layout_projection`'s docstring.
For pp2 x sp2 it gives the same time as `ascend.ascend_projection` (a test checks it).
Nothing here is measured.
"""
from __future__ import annotations

import functools
from typing import Dict

import numpy as np

from benchmark.ascend import AscendAssumptions
from benchmark.flops import DitShape, block_flops, dit_flops, published_config
from benchmark.measure import table

BLOCK_SLICED = ("attn1.wqkv.weight", "attn1.wo.weight", "attn2.wq.weight", "attn2.wkv.weight", "attn2.wo.weight",
                "ff.net.0.proj.weight", "ff.net.2.weight")  # cut by tensor parallelism (parallel/tensor.py)
RESERVE_GIB = 4.0  # device memory assumed taken by the framework, HCCL buffers and kernel workspaces


@functools.lru_cache(maxsize=1)
def published_parameter_sizes() -> Dict[str, int]:
    """Parameter name -> element count of the published DiT (built lazily: no weight memory)."""
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
    """One table per device count (every layout, fastest first) and the best layout that fits."""
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


def run(args) -> str:
    """`layouts`: the tables."""
    return ascend_tables()
