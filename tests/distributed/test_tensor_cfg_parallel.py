"""Tensor, CFG and multi-node parallelism under real msrun jobs: tiny checkpoint (6 heads, 3 blocks), CPU fp32.

Every layout's final latents (2 steps, rank 0 writes them) must equal the single-process run within
1e-5 relative for the same seed. The video has 1 latent frame of 5 x 7 = 35 tokens, so Ulysses 3
pads. The layouts run eagerly (--eager: op by op, the tensor-parallel all-reduce through the timed
collectives) except tp2 and tp2 x sp3, which run compiled (the all-reduce inside the block graphs; with
Ulysses, inside the graph after the eager all-to-all attention). From
--stats_dir the jobs also check each rank's block weights (1/T of the checkpoint's, counted from the
shards' own headers), the counted traffic against `step_traffic`, and which CFG rows each rank ran.
The two-"node" job runs scripts/run_parallel.sh twice on loopback, as two machines would.
The single-process run and the layouts are listed in parity_runs.py: those with the same number of workers
share one launch with test_parallel_dit.py's.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from msrun_support import ROOT, free_port, run_command
from parity_runs import PROMPT, RUNS, STEPS, run_args
from stepvideo.utils import safetensors_io as st

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYERS = 3
LAYOUTS = ["tp2", "tp3", "tp2_sp3", "tp2_pp2", "cfg2", "cfg2_pp2", "cfg2_tp2"]  # in parity_runs.RUNS
PARITY = 1e-5  # max|parallel - single| <= PARITY * max(1, max|single|)
# Projections cut by the tensor-parallel split (stepvideo/parallel/tensor.py); every other block
# parameter (norms, QK-norm weights, the modulation table) is whole on every rank.
SLICED = ("attn1.wqkv.weight", "attn1.wo.weight", "attn2.wq.weight", "attn2.wkv.weight", "attn2.wo.weight",
          "ff.net.0.proj.weight", "ff.net.2.weight")


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint(LAYERS)


@pytest.fixture(scope="module")
def single(parity_runs):
    return parity_runs.latents("single_3_blocks")


def relative_error(port, ref) -> float:
    assert port.shape == ref.shape, f"shape {port.shape} != {ref.shape}"
    return float(np.abs(port.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


def block_sizes(model_dir: Path):
    """fp32 bytes of every block parameter, from the checkpoint's own headers."""
    sizes = {}
    for shard in (model_dir / "transformer").glob("*.safetensors"):
        with st.SafetensorsFile(shard) as f:
            for key, info in f.tensors.items():
                if key.startswith("transformer_blocks."):
                    sizes[key] = int(np.prod(info.shape)) * 4
    return sizes


def expected_traffic(model_dir, stats, **degrees):
    from stepvideo.checkpoint import read_config
    from stepvideo.config import NEG_MAGIC, POS_MAGIC
    from stepvideo.parallel.pipeline import step_traffic
    from stepvideo.diffusion.interfaces import LocalCaption

    cfg = read_config(model_dir / "transformer")
    text = LocalCaption.from_model_dir(model_dir).encode([PROMPT + POS_MAGIC, NEG_MAGIC])
    text_tokens = int(text.y_mask.sum(axis=1).max())
    return step_traffic(cfg, (1, 1, cfg["in_channels"], 5, 7), text_tokens, itemsize=4, **degrees)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(model_dir, parity_runs, single, name):
    blocks, _, workers, flags = RUNS[name]
    assert blocks == LAYERS
    err = relative_error(parity_runs.latents(name), single)
    print(f"parity {name} ({workers} workers): {err:.2e}")
    assert err <= PARITY, f"{name}: relative error {err:.2e} > {PARITY:.0e}"

    stats = parity_runs.stats(name)
    mesh = stats[0]
    degrees = dict(ulysses_degree=mesh["ulysses_degree"], pp_degree=mesh["pp_degree"],
                   tp_degree=mesh["tp_degree"], cfg_degree=mesh["cfg_degree"])
    # Rank order ((stage * C + cfg) * T + tp) * U + sp.
    u, t, c = degrees["ulysses_degree"], degrees["tp_degree"], degrees["cfg_degree"]
    assert [(s["stage"], s["cfg_rank"], s["tp_rank"], s["sp_rank"]) for s in stats] == \
        [(r // (u * t * c), r // (u * t) % c, r // u % t, r % u) for r in range(workers)]

    # Block weights: sliced projections at 1/T of the stored size, the rest whole.
    sizes = block_sizes(model_dir)
    for s in stats:
        lo, hi = s["blocks"]
        mine = {k: v for k, v in sizes.items() if lo <= int(k.split(".")[1]) < hi}
        expected = sum(v // t if k.endswith(SLICED) else v for k, v in mine.items())
        got = s["load"]["block_bytes"]
        print(f"{name} rank {s['rank']}: block weights {got / 2**20:.2f} MiB = {got / sum(mine.values()):.3f} of "
              f"its blocks' {sum(mine.values()) / 2**20:.2f} MiB (1/T = {1 / t:.3f})")
        assert got == expected, (s["rank"], got, expected)
        assert got <= sum(mine.values()) / t * 1.01

    # Traffic of the last step, counted by the collectives (tp all-reduces in compiled graphs by shape).
    expected = expected_traffic(model_dir, stats, **degrees)
    for s in stats:
        counted = {op: v["bytes"] for op, v in s["traffic_last_step"].items()}
        assert counted == expected[s["stage"]], (s["rank"], counted, expected[s["stage"]])
        timing = s["timing"]
        if t > 1 and "--eager" in flags:
            assert timing["tp_comm_s"] > 0
        assert timing["calls"] == STEPS


def test_two_nodes_sp2_pp2_through_the_launcher(model_dir, workdir, single):
    """scripts/run_parallel.sh twice (NODES=2, NODE_RANK 0 and 1), 2 workers each, on loopback.

    msrun starts the scheduler on the node whose own address is MASTER_ADDR; on one machine every
    address is its own, so node 1 runs with an `ip` on its PATH that lists no addresses, as a second
    machine would see node 0's address.
    """
    latents = workdir / "two_nodes.safetensors"
    args = run_args(model_dir, "A", latents, "--eager")
    args = args[:args.index("--device")] + args[args.index("--device") + 2:]  # the script passes DEVICE
    shim = workdir / "other_machine"
    shim.mkdir(exist_ok=True)
    (shim / "ip").write_text("#!/bin/sh\necho '[]'\n")
    (shim / "ip").chmod(0o755)
    port = str(free_port())
    common = {"MODEL_DIR": str(model_dir), "ULYSSES": "2", "PP": "2", "DEVICE": "cpu", "NODES": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CLUSTER_TIME_OUT": "90"}
    jobs = {}

    def node(rank: int):
        log_dir = workdir / f"node{rank}_logs"
        env = {**common, "NODE_RANK": str(rank), "LOG_DIR": str(log_dir)}
        if rank == 1:
            env["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
        jobs[rank] = run_command(["bash", str(ROOT / "scripts" / "run_parallel.sh"), *args[2:]], workdir, 300, env,
                                 log_dir)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for rank in (0, 1):
        print(f"node {rank}: rc {jobs[rank].returncode} after {jobs[rank].seconds:.1f} s")
        assert jobs[rank].returncode == 0, jobs[rank].console[-4000:]
    assert "node 0 of 2 with 2 of them" in jobs[0].console and "node 1 of 2 with 2 of them" in jobs[1].console
    # node 0 ran ranks 0, 1 (stage 0), node 1 ran ranks 2, 3 (stage 1)
    assert sorted(p.name for p in (workdir / "node0_logs").glob("worker_*.log")) == ["worker_0.log", "worker_1.log"]
    assert sorted(p.name for p in (workdir / "node1_logs").glob("worker_*.log")) == ["worker_2.log", "worker_3.log"]
    assert "holds blocks 2-2 + output layer" in jobs[1].worker_log(2)
    err = relative_error(st.load_file(latents)["latents"], single)
    print(f"parity two-node sp2 x pp2: {err:.2e}")
    assert err <= PARITY

