"""scripts/benchmark streaming: the CPU measurement at a small size meets the memory bound, and the Ascend
projection's memory follows from the published model's shapes (counted here independently)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark"  # a package run as a program (its __main__.py)


def run(*args) -> str:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(SCRIPT), "streaming", *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, f"{args}: rc={out.returncode}\n{out.stderr[-3000:]}"
    return out.stdout


def row(text: str, first_cell: str) -> list:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


@pytest.mark.slow
def test_cpu_quick_streamed_peak_is_within_the_bound(tmp_path):
    """Two fresh processes (resident, streamed) on a 3-block DiT; no msrun (the 2-rank parity test has its own job)."""
    out = run("cpu", "--quick", "--no-msrun", "--tmp", str(tmp_path))
    assert re.search(r"`benchmark streaming cpu --quick --no-msrun --tmp \S+` on \d{4}-\d\d-\d\d: ", out), out
    assert row(out, "streamed peak within the bound")[1] == "yes", out
    resident = row(out, "1 process, resident")
    streamed = row(out, "1 process, --offload blocks")
    assert float(streamed[1]) < float(resident[1])  # weights loaded: only the non-block ones
    assert float(streamed[3].replace(",", "")) < float(resident[3].replace(",", ""))  # peak RSS growth
    assert list(tmp_path.iterdir()) == []  # the checkpoint was deleted


def test_ascend_projection_memory_from_the_published_shapes():
    out = run("ascend")
    d, blocks = 48 * 128, 48
    # One block: attn1 wqkv 3D^2 + wo D^2, attn2 wq D^2 + wkv 2D^2 + wo D^2, FFN 2 x 4D^2; norms and tables.
    block = 16 * d * d + 2 * 2 * d + 4 * 128 + 6 * d  # norm1/norm2 weight+bias, q/k norms, scale_shift_table
    one_npu = row(out, "1 NPU, --offload blocks")
    resident_sp4 = row(out, "4 NPUs, Ulysses 4 (sp4), resident")
    non_block = float(one_npu[1]) - 2 * block * 2 / 2**30  # bf16
    assert 0.5 < non_block < 0.8, one_npu  # embeddings, caption projection (6144 -> 6144 x 2), output layer
    assert abs(float(resident_sp4[1]) - (non_block + blocks * block * 2 / 2**30)) < 0.02, resident_sp4
    timing = out.split("| layout |", 1)[1]  # the time table repeats the layout names
    copy_ms = float(row(timing, "1 NPU, --offload blocks")[2])
    assert abs(copy_ms - block * 2 / 25e9 * 1e3) < 1
    assert re.search(r"block copy = 1\.21 GB / 25 GB/s", out)
