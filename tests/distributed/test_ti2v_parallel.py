"""The TI2V DiT (golden ti2v_dit) split over Ulysses 2 x pipeline 2 under a real msrun job, CPU fp32.

The condition latent joins the latent before the patch embedding, so its tokens are sharded over
the SP group and handed from stage to stage as the video tokens are; every rank must receive the
original's prediction for each case (CFG pair, batch 1, one latent frame) within the parity rule.
"""
import shutil
import subprocess

import pytest

from msrun_support import ROOT, leftover_processes, run_msrun
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
