"""scripts/benchmark layouts: the Ascend layout projection agrees with the independent pipeline projection
(`benchmark ascend`) where both apply, and its terms scale as the formulas say."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
from benchmark import layouts  # noqa: E402


def test_pp2_sp2_matches_the_pipeline_projection():
    ours = layouts.layout_projection(pp=2, cfg=1, tp=1, u=2)
    theirs = benchmark.ascend_projection(u=2, pp=2)
    assert ours["total"] == pytest.approx(theirs["times"][0][1], rel=1e-3)
    assert ours["weights"] == theirs["weights"]


def test_terms_scale_with_the_layout():
    base = layouts.layout_projection(pp=1, cfg=1, tp=1, u=4)
    tp = layouts.layout_projection(pp=1, cfg=1, tp=4, u=1)
    cfg = layouts.layout_projection(pp=2, cfg=2, tp=1, u=1)
    # the same four devices share the GEMMs and the attention evenly in every layout
    for p in (tp, cfg):
        # (the unsplit embeddings differ: < 0.1%)
        assert p["t_gemm"] == pytest.approx(base["t_gemm"], rel=1e-3)
        assert p["t_attention"] == pytest.approx(base["t_attention"])
    assert base["t_all_reduce"] == 0 and tp["t_all_to_all"] == 0 and tp["t_all_reduce"] > 0
    assert base["bubble_factor"] == 1 and cfg["bubble_factor"] == 2  # one row per CFG group through 2 stages
    # tensor parallelism cuts the block projections: 4 ranks hold a bit more than a quarter of the weights
    assert base["weights"] / 4 < tp["weights"] < base["weights"] / 4 * 1.05


def test_ascend_tables_name_the_best_layouts():
    text = layouts.ascend_tables()
    assert "| best 4-device layout that fits |" in text and "| best 8-device layout that fits |" in text
    assert "| pp2 x sp2 | 27.7 |" in text and "2,492 |" in text
