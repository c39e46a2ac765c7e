"""--offload blocks under a real 2-rank msrun job: the streamed DistributedDiT equals the resident one bit for bit.

One job (streaming_worker.py) checks two layouts on the same 3-block bf16 checkpoint as
tests/unit/test_streaming.py: Ulysses 2 (both ranks stream all blocks, Ulysses attention
between the two compiled halves of each block) and pipeline 2 (each rank streams its stage:
blocks 0-1 and block 2, the odd stage hands activations on).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from msrun_support import PEER_WAIT, leftover_processes, run_msrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_streaming import DIT, write  # noqa: E402

from stepvideo.modules.model import StepVideoModel  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("streaming_worker.py")


def test_streamed_equals_resident_in_two_layouts(tmp_path):
    folder = write(tmp_path / "transformer", StepVideoModel(**DIT), DIT, "diffusion_pytorch_model", bf16=True)
    job = run_msrun(WORKER, [str(folder)], 2, tmp_path, env=PEER_WAIT)
    print(f"2-rank streaming job: {job.seconds:.1f} s")
    assert job.returncode == 0, job.console[-5000:]
    assert not leftover_processes(str(tmp_path))
    results = {}
    for rank in range(2):
        line = next(l for l in job.worker_log(rank).splitlines() if l.startswith("STREAMING_RESULT "))
        results[rank] = json.loads(line.split(" ", 1)[1])
    for rank, r in results.items():
        for layout in ("sp2", "pp2"):
            assert r[layout]["equal"] == [True, True], (rank, layout, r[layout])
            # Only the weights outside the blocks were loaded; the stage's blocks were streamed.
            assert r[layout]["streamed_load"]["bytes"] < r[layout]["resident_bytes"]
            assert r[layout]["streamed_load"]["streamed_bytes"] > 0
    assert [results[r]["sp2"]["blocks"] for r in range(2)] == [[0, 3], [0, 3]]
    assert [results[r]["pp2"]["blocks"] for r in range(2)] == [[0, 2], [2, 3]]
