"""One msrun job with the Ascend kernel table on the CPU: the tiny checkpoint on Ulysses 2 x pipeline 2
(35 tokens: padded shards), HCCL's all_to_all / send / recv replaced by their stand-ins, the DiT compiled
with the stand-in kernels inside. Its latents must equal the single-process CPU run within 1e-5."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from msrun_support import PEER_WAIT, ROOT, no_leftovers, run_msrun, run_single
from stepvideo.utils import safetensors_io as st

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STANDIN_RUN = Path(__file__).with_name("standin_run_parallel.py")
PARITY = 1e-5  # as tests/distributed/test_parallel_dit.py


def test_sp2_pp2_on_standins_matches_single_process(tmp_path, tiny_checkpoint):
    model_dir = tiny_checkpoint(4)

    def args(latents):
        return ["--model_dir", str(model_dir), "--local_models", "--prompt", "A cat walks on the grass.",
                "--infer_steps", "2", "--num_frames", "1", "--height", "80", "--width", "112", "--seed", "42",
                "--output_type", "latent", "--latents_out", str(latents), "--device", "cpu"]

    with no_leftovers(tmp_path):
        single = run_single(ROOT / "run_parallel.py", args(tmp_path / "single.safetensors") +
                            ["--ulysses_degree", "1"], tmp_path)
        assert single.returncode == 0, single.console[-3000:]
        job = run_msrun(STANDIN_RUN, args(tmp_path / "standin.safetensors") + ["--ulysses_degree", "2",
                                                                               "--pp_degree", "2"], 4, tmp_path,
                        env=PEER_WAIT)  # stage 1 waits for stage 0's first compile
        print(f"stand-in sp2 x pp2: {job.seconds:.1f} s")
        assert job.returncode == 0, job.console[-5000:]

    logs = [job.worker_log(rank) for rank in range(4)]
    for rank, log in enumerate(logs):
        found = re.search(r"kernel table ascend-standin; stand-in collectives \{'all_to_all': (\d+), "
                          r"'send': (\d+), 'recv': (\d+)\}", log)
        assert found, f"rank {rank} did not report the stand-in table:\n{log[-2000:]}"
        all_to_all, send, recv = map(int, found.groups())
        # 2 steps x 2 CFG rows x 2 blocks per stage x 2 all-to-alls; the hand-off from stage 0 to 1
        assert all_to_all == 16, (rank, found.group(0))
        assert (send > 0) == (rank < 2) and (recv > 0) == (rank >= 2), (rank, found.group(0))

    ref = st.load_file(tmp_path / "single.safetensors")["latents"].astype(np.float64)
    port = st.load_file(tmp_path / "standin.safetensors")["latents"]
    err = float(np.abs(port - ref).max() / max(1.0, float(np.abs(ref).max())))
    print(f"parity stand-in sp2 x pp2 vs single-process CPU: {err:.2e}")
    assert err <= PARITY
