"""Speed and memory of the Step-Video port, measured on this machine; tables in Markdown.

    python scripts/benchmark dit   [--quick] [--append docs/performance.md]
    python scripts/benchmark vae | text | step | comm | load   [--quick] [--append FILE]
    python scripts/benchmark ascend [--append FILE]     (the paper projection for Ascend 910B)
    python scripts/benchmark parallel [--repeats N] [--append FILE]   (two msrun workers: pp2, sp2, tp2, cfg2)
    python scripts/benchmark layouts [--append FILE]    (every 4- and 8-device layout, on paper)
    python scripts/benchmark streaming cpu [--blocks N] [--eager] [--no-msrun] [--append FILE]   (--offload blocks)
    python scripts/benchmark streaming ascend [--append FILE]   (block streaming on Ascend 910B, on paper)

One module per measurement (dit, vae, text, step, load, comm), each with `run(args) -> str`;
the FLOP model in `flops`, the timing and table helpers in `measure`, the Ascend projection
in `ascend` (and for every parallel layout in `layouts`); `load_probe.py`, `comm_worker.py` and
`streaming_probe.py` are the programs the load, comm and streaming measurements start in fresh
processes (or msrun workers). Weights come from the golden fixtures' generation
rule (`scripts/synthetic_weights.py`).

Every sub-command prints one Markdown table (plus a header line saying what was run,
on which machine and under what load) and, with --append, appends exactly that text
to the given file. --quick uses small sizes and few repeats (CI: well under a minute).

Timing: a median of N runs after warm-up. Each model run is paired with one run of a
reference GEMM (2048x1024 @ 1024x4096, fp32) right before it, so the "fraction of the
GEMM rate" compares like with like even when other processes share the two cores.
FLOPs are counted from the shapes (a multiply-add is 2 FLOPs); see `flops.dit_flops`.
"""
from benchmark.ascend import AscendAssumptions, ascend_projection  # noqa: F401
from benchmark.flops import DitShape, block_flops, dit_flops, published_config  # noqa: F401
