"""Step-Video-TI2V under real msrun jobs (Ulysses 2 x pipeline 2), CPU fp32.

1. The golden TI2V DiT (ti2v_dit) split over the mesh: the condition latent joins the latent before
   the patch embedding, so its tokens are sharded over the SP group and handed from stage to stage as
   the video tokens are; every rank must receive the original's prediction for each case (CFG pair,
   batch 1, one latent frame) within the parity rule.
2. run_parallel.py --first_image on the tiny TI2V checkpoint (in-process encoders): rank 0 encodes the
   image and broadcasts its latent; the final latents must equal the single-process run's.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msrun_support import ROOT, job_env, leftover_processes, run_msrun, run_single
from stepvideo.utils import safetensors_io as st
from support import assert_parity, cases, golden, load

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = ROOT / "tests" / "distributed" / "ti2v_dit_worker.py"


def test_ti2v_dit_sp2_pp2_matches_the_original(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(golden("ti2v_dit") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(golden("ti2v_dit") / "weights.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    try:
        job = run_msrun(WORKER, [str(out), str(folder), "2", "2"], 4, tmp_path, timeout=180)
    finally:
        left = leftover_processes(str(tmp_path))
        for pid, _ in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    print(f"ti2v sp2 x pp2: msrun job of 4 workers took {job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert not left, f"processes left behind: {left}"
    logs = "".join(job.worker_log(r) for r in range(4))
    assert "rank 0: stage 0 holds input embeddings + blocks 0-0" in logs
    assert "rank 3: stage 1 holds blocks 1-1 + output layer" in logs
    ref = load("ti2v_dit", "outputs")
    for rank in range(4):
        got = st.load_file(out / f"rank{rank}.safetensors")
        for spec in cases("ti2v_dit")["cases"]:
            key = f"{spec['name']}.output"
            assert_parity(got[key], ref[key], f"ti2v sp2xpp2 rank {rank} {key}")


def test_run_parallel_ti2v_sp2_pp2_equals_single_process(tmp_path):
    from PIL import Image

    model_dir = tmp_path / "tiny-ti2v"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(model_dir), "--ti2v",
                    "--convert"], check=True, env=job_env(), capture_output=True, timeout=180)
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(image)

    def args(latents):
        return ["--model_dir", str(model_dir), "--local_models", "--prompt", "A cat smiles", "--first_image",
                str(image), "--motion_score", "10", "--infer_steps", "2", "--num_frames", "17", "--height", "32",
                "--width", "80", "--seed", "7", "--output_type", "latent", "--latents_out", str(latents),
                "--device", "cpu"]

    try:
        single = run_single(ROOT / "run_parallel.py", args(tmp_path / "single.safetensors") +
                            ["--ulysses_degree", "1"], tmp_path)
        assert single.returncode == 0, single.console[-3000:]
        job = run_msrun(ROOT / "run_parallel.py", args(tmp_path / "sp2pp2.safetensors") +
                        ["--ulysses_degree", "2", "--pp_degree", "2"], 4, tmp_path, timeout=240)
    finally:
        left = leftover_processes(str(tmp_path))
        for pid, _ in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    print(f"run_parallel ti2v: single {single.seconds:.1f} s, msrun sp2 x pp2 {job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert not left, f"processes left behind: {left}"
    assert "image-to-video (Step-Video-TI2V) from" in job.worker_log(0)
    ref = st.load_file(tmp_path / "single.safetensors")["latents"]
    assert ref.shape == (1, 3, 64, 2, 5)
    assert_parity(st.load_file(tmp_path / "sp2pp2.safetensors")["latents"], ref,
                  "run_parallel ti2v sp2 x pp2 vs single process", tol=1e-5)
