"""`text`: the Step-LLM forward at the service's 320 tokens."""
from __future__ import annotations

import numpy as np

from benchmark.measure import GemmReference, fill_synthetic, measure, table


def run(args) -> str:
    """`text`: a Step-LLM forward of 320 tokens against the GEMM rate."""
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
    fill_synthetic(model)
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
    return text + (f"\n\nWeights by the golden rule generator, pynative fp32, batch 1, median of {repeats} after 2 "
                   "warm-up calls.")
