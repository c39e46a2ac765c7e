"""The distributed DiT under real msrun jobs, on the tiny checkpoint (6 heads, 6 blocks), CPU fp32.

One checkpoint and single-process references serve every job:
- video A: 1 latent frame of 5 x 7 = 35 tokens (no Ulysses degree divides it: padding);
- video C: 1 latent frame of 2 x 5 = 10 tokens (divisible by 2).
Each layout's final latents (rank 0 writes them) must equal the single-process
run within 1e-5 relative for the same seed; the DiT runs compiled (the default),
and once eagerly (--eager) against the compiled single-process run. The 4-rank job also checks the
per-rank weight memory, the counted traffic against `step_traffic`, and the
pipeline idle time. Failure jobs check that a raising rank or a bad layout ends
the job quickly with the error on the console. Every job runs in a temp folder;
no process may survive it.

The parity runs (the single-process ones and the layouts) are listed in parity_runs.py: those with the
same number of workers share one launch with test_tensor_cfg_parallel.py's.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from msrun_support import PEER_WAIT, ROOT, free_port, run_command, run_msrun
from parity_runs import PROMPT, RUNS, STEPS, VIDEOS, run_args
from stepvideo.utils import safetensors_io as st

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN_PARALLEL = ROOT / "run_parallel.py"
LAYERS = 6
FIRST_STAGE_KEYS = ("pos_embed.", "adaln_single.", "caption_projection.", "clip_projection.")
LAST_STAGE_KEYS = ("proj_out.", "scale_shift_table")
PARITY = 1e-5  # max|parallel - single| <= PARITY * max(1, max|single|)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    """The tiny model folder with 6 DiT blocks, CLIP converted."""
    return tiny_checkpoint(LAYERS)


@pytest.fixture(scope="module")
def single(parity_runs):
    """Single-process final latents per video, compiled."""
    return {video: parity_runs.latents(f"single_{video}") for video in VIDEOS}


def assert_close(name, port, ref):
    assert port.shape == ref.shape, f"{name}: shape {port.shape} != {ref.shape}"
    err = float(np.abs(port.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))
    print(f"parity {name}: {err:.2e} (max |latent| {np.abs(ref).max():.2f})")
    assert err <= PARITY, f"{name}: relative error {err:.2e} > {PARITY:.0e}"


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["sp2", "sp3", "pp3_uneven"])
def test_layout_matches_single_process(parity_runs, single, name):
    _, video, workers, layout = RUNS[name]
    assert_close(name, parity_runs.latents(name), single[video])
    if "--layer_split" in layout:
        job = parity_runs.job(name)
        logs = "".join(job.run_log(name, r) for r in range(workers))
        for rank, holds in enumerate(["input embeddings + blocks 0-0", "blocks 1-3", "blocks 4-5 + output layer"]):
            assert f"rank {rank} (stage {rank} of 3, sp rank 0 of 1) holds {holds}" in logs


def test_eager_flag_matches_compiled(parity_runs):
    """--eager runs the DiT op by op; the default compiles it. Both must give the same latents."""
    assert_close("eager vs compiled", parity_runs.latents("single_A_eager"), parity_runs.latents("single_A"))


def test_launcher_script_runs_pp2(model_dir, workdir, single):
    """scripts/run_parallel.sh (free port, log folder) with ULYSSES=1 PP=2 on CPU, writing the mp4 on rank 0."""
    latents = workdir / "launcher_pp2.safetensors"
    log_dir = workdir / "launcher_logs"
    args = run_args(model_dir, "A", latents)
    args = args[:args.index("--device")] + args[args.index("--device") + 2:]  # the script passes DEVICE
    args[args.index("--output_type") + 1] = "mp4"  # rank 0 decodes with the tiny VAE and writes the video
    args += ["--save_path", str(workdir / "videos")]
    env = {"MODEL_DIR": str(model_dir), "ULYSSES": "1", "PP": "2", "DEVICE": "cpu", "LOG_DIR": str(log_dir),
           **PEER_WAIT}  # stage 1 waits for stage 0 to compile its 3 blocks
    job = run_command(["bash", str(ROOT / "scripts" / "run_parallel.sh"), *args[2:]], workdir, 240, env, log_dir)
    print(f"launcher pp2: {job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert f"logs in {log_dir}" in job.console
    assert_close("pp2 (launcher)", st.load_file(latents)["latents"], single["A"])
    assert "holds input embeddings + blocks 0-2" in job.worker_log(0)
    assert "holds blocks 3-5 + output layer" in job.worker_log(1)
    videos = list((workdir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0, videos
    assert f"video written to {videos[0]}" in job.worker_log(0)


def test_launcher_refuses_a_busy_port_at_once(workdir):
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        job = run_command(["bash", str(ROOT / "scripts" / "run_parallel.sh"), "--prompt", "x"], workdir, 60,
                          {"MASTER_PORT": str(port), "DEVICE": "cpu"}, workdir)
    assert job.returncode != 0 and job.seconds < 20
    assert f"MASTER_PORT={port} is already in use" in job.console


def checkpoint_bytes(model_dir: Path):
    """fp32 bytes per parameter, from the checkpoint's own headers (independent of the code under test)."""
    sizes = {}
    folder = model_dir / "transformer"
    for shard in folder.glob("*.safetensors"):
        with st.SafetensorsFile(shard) as f:
            for key, info in f.tensors.items():
                sizes[key] = int(np.prod(info.shape)) * 4
    return sizes


def test_sp2_pp2_parity_memory_traffic_idle(model_dir, parity_runs, single):
    from stepvideo.checkpoint import read_config
    from stepvideo.config import NEG_MAGIC, POS_MAGIC
    from stepvideo.parallel.pipeline import step_traffic
    from stepvideo.diffusion.interfaces import LocalCaption

    assert_close("sp2 x pp2", parity_runs.latents("sp2pp2"), single["A"])
    stats = parity_runs.stats("sp2pp2")
    assert [(s["stage"], s["sp_rank"]) for s in stats] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    # Weight memory: each rank's RSS growth from loading <= 1/P of the model + its own embeddings.
    sizes = checkpoint_bytes(model_dir)
    model = sum(sizes.values())
    for s in stats:
        lo, hi = s["blocks"]
        blocks = sum(v for k, v in sizes.items()
                     if k.startswith("transformer_blocks.") and lo <= int(k.split(".")[1]) < hi)
        inputs = sum(v for k, v in sizes.items() if s["first"] and k.startswith(FIRST_STAGE_KEYS))
        outputs = sum(v for k, v in sizes.items() if s["last"] and k.startswith(LAST_STAGE_KEYS))
        assert s["load"]["bytes"] == blocks + inputs + outputs, s
        growth = s["load"]["rss_growth"]
        limit = model / 2 + inputs + outputs
        print(f"rank {s['rank']}: weight RSS growth {growth / 2**20:.1f} MiB = {growth / model:.3f} of the model "
              f"({model / 2**20:.1f} MiB); limit 1/P of the model + own embeddings = {limit / 2**20:.1f} MiB")
        assert growth <= limit

    # Traffic of the last denoising step, counted by the collectives, equals the formula.
    cfg = read_config(model_dir / "transformer")
    text = LocalCaption.from_model_dir(model_dir).encode([PROMPT + POS_MAGIC, NEG_MAGIC])
    text_tokens = int(text.y_mask.sum(axis=1).max())
    expected = step_traffic(cfg, (1, 1, cfg["in_channels"], 5, 7), text_tokens, 2, 2, itemsize=4)
    for s in stats:
        counted = {op: v["bytes"] for op, v in s["traffic_last_step"].items()}
        assert counted == expected[s["stage"]], (s["rank"], counted, expected[s["stage"]])

    # Idle time: with 2 micro-batches and 2 equal stages the bubble is about 1/3 of a step.
    for s in stats:
        t = s["timing"]
        print(f"rank {s['rank']} (stage {s['stage']}): idle {t['idle_fraction']:.2f}, pipeline wait "
              f"{t['pipeline_wait_s']:.2f} s, sp comm {t['sp_comm_s']:.2f} s, compute {t['compute_s']:.2f} s "
              f"over {t['calls']} steps")
        assert 0.0 < t["idle_fraction"] < 0.8
        assert t["calls"] == STEPS


# ---------------------------------------------------------------------------------- failures


def test_a_raising_rank_ends_the_job_fast_with_its_error(model_dir, workdir):
    driver = workdir / "fail_on_rank1.py"
    driver.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from stepvideo.modules.model import StepVideoModel
        from stepvideo import job

        block_forward = StepVideoModel.block_forward

        def failing(self, *args, **kwargs):
            if os.environ.get("RANK_ID") == "1":
                raise RuntimeError("injected failure on rank 1")
            return block_forward(self, *args, **kwargs)

        StepVideoModel.block_forward = failing
        sys.exit(job.main())
    """))
    job = run_msrun(driver, run_args(model_dir, "A", workdir / "never.safetensors", "--ulysses_degree", "1",
                                     "--pp_degree", "2"), 2, workdir, timeout=120)
    print(f"failing job: rc {job.returncode} after {job.seconds:.1f} s")
    assert job.returncode != 0
    assert job.seconds < 60
    first_error = re.search(r"\[(rank \d+|scheduler)\] error", job.console)
    assert first_error and first_error.group(1) == "rank 1", job.console[-3000:]
    assert "RuntimeError: injected failure on rank 1" in job.console
    assert not (workdir / "never.safetensors").exists()


def test_bad_layout_stops_at_start_up_with_the_possible_layouts(model_dir, workdir):
    job = run_msrun(RUN_PARALLEL, run_args(model_dir, "A", workdir / "never.safetensors", "--ulysses_degree", "4",
                                           "--pp_degree", "1"), 2, workdir, timeout=120)
    print(f"bad layout: rc {job.returncode} after {job.seconds:.1f} s")
    assert job.returncode != 0
    assert job.seconds < 30
    assert "pp x cfg x tensor x ulysses = 1 x 1 x 1 x 4 = 4, but the job has 2 rank(s)" in job.console
    assert "heads / tensor_parallel_degree / ulysses_degree = 6 / 1 / 4 is not whole" in job.console
    assert ("possible layouts are: --pp_degree 1 --cfg_parallel_degree 1 --tensor_parallel_degree 1 "
            "--ulysses_degree 2; --pp_degree 1 --cfg_parallel_degree 1 --tensor_parallel_degree 2 "
            "--ulysses_degree 1; --pp_degree 1 --cfg_parallel_degree 2 --tensor_parallel_degree 1 "
            "--ulysses_degree 1; --pp_degree 2 --cfg_parallel_degree 1 --tensor_parallel_degree 1 "
            "--ulysses_degree 1" in job.console)
