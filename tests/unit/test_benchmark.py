"""scripts/benchmark --quick: every sub-command prints one well-formed Markdown table (header line, table,
note); --append writes exactly the printed section; the FLOP formulas are the written ones.

The quick sub-commands run through the command line's `main` in this process, which has MindSpore imported
already (a subprocess each would import it again: ~5 s of the ~20 s each took); the program itself, as a user
starts it (`python scripts/benchmark ...`), runs in test_ascend_projection_and_append."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark"  # a package run as a program (its __main__.py)
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
from benchmark.cli import main  # noqa: E402

# Columns each sub-command must print (first table of the section) and a column holding a number.
EXPECTED = {
    "dit": ("fraction of GEMM rate (median / best)", "median s"),
    "vae": ("fraction of GEMM rate (median / best)", "GFLOP (conv + linear)"),
    "text": ("fraction of GEMM rate (median / best)", "median s"),
    "step": ("outside share", "median step s"),
    "comm": ("MiB handed per step", "MiB handed per step"),
    "load": ("peak / weights", "peak / weights"),
    "ascend": ("FLOP", "share"),
}


def run(*args, cwd=None):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=180)
    assert out.returncode == 0, f"{args}: rc={out.returncode}\n{out.stderr[-3000:]}"
    return out.stdout


def tables(text):
    """Markdown tables in `text` as lists of rows (lists of cell strings); the separator row is checked."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    for t in found:
        assert len(t) >= 3, f"a table needs a header, a separator and a row: {t}"
        assert all(re.fullmatch(r"-{3,}", c) for c in t[1]), f"bad separator row {t[1]}"
        assert all(len(row) == len(t[0]) for row in t), f"rows of unequal width in {t}"
    return found


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dit", "vae", "text", "step", "comm", "load"])
def test_quick_mode_prints_a_table(command, in_tmp, capsys):
    assert main([command, "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"`benchmark {command} --quick` on \d{{4}}-\d\d-\d\d: .*MindSpore 2\.7\.2, load average",
                     out), out
    first = tables(out)[0]
    column, numeric = EXPECTED[command]
    assert column in first[0] and numeric in first[0], first[0]
    col = first[0].index(numeric)
    for row in first[2:]:
        assert re.search(r"\d", row[col]), f"{command}: no number in column {numeric!r}: {row}"
    if command in ("dit", "vae", "text"):
        frac = first[0].index("fraction of GEMM rate (median / best)")
        assert all(re.fullmatch(r"\d+% / \d+%", row[frac]) for row in first[2:]), first
    print(out)


def test_ascend_projection_and_append(tmp_path):
    """The paper projection prints its tables; --append writes exactly what was printed."""
    target = tmp_path / "perf.md"
    target.write_text("# existing\n")
    out = run("ascend", "--append", str(target), cwd=tmp_path)
    assert target.read_text() == "# existing\n" + out.rstrip("\n") + "\n"
    found = tables(out)
    assert len(found) == 5
    flops = {row[0]: row[1] for row in found[0][2:]}
    assert flops["total"] == "21.36 PFLOP"
    assert any("~3,847" in row for t in found for row in t) and any("743" in row for t in found for row in t)


def test_flop_formulas_are_the_written_ones():
    """2 b (14 n D^2 + 2 L D^2) for the GEMMs and 4 b D n (n + L) for attention, per block."""
    s = benchmark.DitShape(layers=1, heads=8, head_dim=128, batch=2, video_tokens=2048, text_tokens=128)
    d = 1024
    per_block = benchmark.block_flops(s)
    qkv, wo, wq, wkv, wo2, ffn = 3 * d * d, d * d, d * d, 2 * d * d, d * d, 8 * d * d
    assert per_block["gemm"] == 2 * 2 * (2048 * (qkv + wo + wq + wo2 + ffn) + 128 * wkv)
    assert per_block["attention"] == 2 * (2 * 2 * 2048 * 2048 * d + 2 * 2 * 2048 * 128 * d)
    published = benchmark.ascend_projection()
    f = published["flops"]
    assert f["attention"] == pytest.approx(48 * 4 * 2 * 6144 * 75888 * (75888 + 397))
