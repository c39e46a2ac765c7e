"""Step-Video-TI2V under real msrun jobs, CPU fp32.

1. The golden TI2V DiT (ti2v_dit: 2 heads, 2 blocks) split over one 4-worker job's meshes, built one after
   another in the same processes: Ulysses 2 x pipeline 2 (resident, then streamed blocks), tensor 2 x
   pipeline 2, CFG 2 x Ulysses 2 and CFG 2 x tensor 2 (2 heads allow no tensor x Ulysses). The condition
   latent joins the latent before
   the patch embedding, so its tokens are sharded over the SP group, handed from stage to stage, given
   whole to every tensor slice and cut into CFG rows exactly as the video tokens are; every rank must
   receive the original's prediction for each case (CFG pair, batch 1, one latent frame) within the
   parity rule.
2. run_parallel.py --first_image --prompt_file (2 prompts) --num_videos 2 on the tiny TI2V checkpoint
   (in-process encoders and VAE) under CFG 2 x tensor 2: rank 0 encodes the image once per prompt and
   broadcasts its latent; every video's final latents must equal the single-process run's.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msrun_support import PEER_WAIT, ROOT, job_env, leftover_processes, run_msrun, run_single
from stepvideo.utils import safetensors_io as st
from support import assert_parity, cases, golden, load

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = ROOT / "tests" / "distributed" / "ti2v_dit_worker.py"


# layout -> what one of its ranks must report: its coordinates (rank = ((stage * C + cfg) * T + tp) * U + sp),
# its part of the 2 blocks, its sliced block projections (7 per block with tensor parallelism, tensor.py) and
# whether its blocks were streamed from the mapped checkpoint (none resident) or loaded
LAYOUTS = {
    "sp2_pp2": "rank 2 (sp2_pp2): stage 1 cfg 0 tp 0 sp 0 holds blocks 1-1 + output layer, 0 sliced tensors",
    "sp2_pp2_offload": "rank 1 (sp2_pp2_offload): stage 0 cfg 0 tp 0 sp 1 holds input embeddings + blocks 0-0, "
                       "0 sliced tensors, blocks streamed",
    "tp2_pp2": "rank 3 (tp2_pp2): stage 1 cfg 0 tp 1 sp 0 holds blocks 1-1 + output layer, 7 sliced",
    "cfg2_sp2": "rank 3 (cfg2_sp2): stage 0 cfg 1 tp 0 sp 1 holds input embeddings + blocks 0-1 + output layer, "
                "0 sliced",
    "cfg2_tp2": "rank 2 (cfg2_tp2): stage 0 cfg 1 tp 0 sp 0 holds input embeddings + blocks 0-1 + output layer, "
                "14 sliced",
}


def test_ti2v_dit_in_every_layout_matches_the_original(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(golden("ti2v_dit") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(golden("ti2v_dit") / "weights.safetensors")
    out = tmp_path / "out"
    try:
        job = run_msrun(WORKER, [str(out), str(folder), *LAYOUTS], 4, tmp_path, timeout=240, env=PEER_WAIT)
    finally:
        left = leftover_processes(str(tmp_path))
        for pid, _ in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    print(f"ti2v dit: one msrun job of 4 workers, {len(LAYOUTS)} layouts, took {job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert not left, f"processes left behind: {left}"
    logs = "".join(job.worker_log(r) for r in range(4))
    print("\n".join(line for line in logs.splitlines() if line.startswith("rank ") and " holds " in line))
    ref = load("ti2v_dit", "outputs")
    worst = {}
    for layout, placement in LAYOUTS.items():
        assert placement in logs, f"{layout}: expected the line {placement!r} in the workers' logs"
        for rank in range(4):
            got = st.load_file(out / layout / f"rank{rank}.safetensors")
            for spec in cases("ti2v_dit")["cases"]:
                key = f"{spec['name']}.output"
                err = assert_parity(got[key], ref[key], f"ti2v {layout} rank {rank} {key}")
                worst[layout, key] = max(err, worst.get((layout, key), 0.0))
    for (layout, key), err in worst.items():
        print(f"ti2v {layout} {key}: worst rank {err:.2e}")


def test_run_parallel_ti2v_prompts_and_videos_under_cfg2_tp2_equal_single_process(tmp_path):
    """Two prompts (--prompt_file) x two videos each: CFG group 0 runs the 2 conditional rows, group 1 the 2
    unconditional ones, each tensor-split; the condition latent has those 4 rows. Every video's latents
    (written before its mp4) must equal the single-process run's, and the mp4 must read back."""
    from PIL import Image

    from stepvideo.utils.video_process import read_mp4

    model_dir = tmp_path / "tiny-ti2v"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(model_dir), "--ti2v",
                    "--convert"], check=True, env=job_env(), capture_output=True, timeout=180)
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A cat smiles\nA dog runs\n", encoding="utf-8")

    def args(save_path):
        return ["--model_dir", str(model_dir), "--local_models", "--prompt_file", str(prompts), "--num_videos", "2",
                "--first_image", str(image), "--motion_score", "10", "--infer_steps", "1", "--num_frames", "17",
                "--height", "32", "--width", "80", "--seed", "7", "--save_path", str(save_path), "--name_suffix",
                "t", "--device", "cpu", "--eager"]

    try:
        single = run_single(ROOT / "run_parallel.py", args(tmp_path / "single") + ["--ulysses_degree", "1"], tmp_path)
        assert single.returncode == 0, single.console[-3000:]
        job = run_msrun(ROOT / "run_parallel.py", args(tmp_path / "cfg2tp2") +
                        ["--ulysses_degree", "1", "--cfg_parallel_degree", "2", "--tensor_parallel_degree", "2"], 4,
                        tmp_path, timeout=240, env=PEER_WAIT)
    finally:
        left = leftover_processes(str(tmp_path))
        for pid, _ in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    print(f"run_parallel ti2v, 2 prompts x 2 videos: single {single.seconds:.1f} s, msrun cfg2 x tp2 "
          f"{job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert not left, f"processes left behind: {left}"
    log0 = job.worker_log(0)
    assert "image-to-video (Step-Video-TI2V) from" in log0 and "summary: 4 of 4 video(s) written" in log0
    assert log0.count("first image (80x32) encoded to a latent of shape (1, 1, 64, 2, 5)") == 2  # once per prompt
    names = ["A_cat_smiles_v0-t", "A_cat_smiles_v1-t", "A_dog_runs_v0-t", "A_dog_runs_v1-t"]
    assert sorted(f.stem for f in (tmp_path / "cfg2tp2").glob("*.mp4")) == names
    for name in names:
        ref = st.load_file(tmp_path / "single" / f"{name}.safetensors")["latents"]
        assert ref.shape == (1, 3, 64, 2, 5)
        assert_parity(st.load_file(tmp_path / "cfg2tp2" / f"{name}.safetensors")["latents"], ref,
                      f"run_parallel ti2v cfg2 x tp2 vs single process, {name}", tol=1e-5)
        frames, _ = read_mp4(tmp_path / "cfg2tp2" / f"{name}.mp4")
        assert frames.shape == (17, 32, 80, 3), frames.shape
    # each video has its own noise: the two videos of a prompt differ
    a, b = (st.load_file(tmp_path / "single" / f"A_cat_smiles_v{i}-t.safetensors")["latents"] for i in (0, 1))
    assert np.abs(a - b).max() > 0.1
