"""Helpers shared by the tests: where the golden fixtures are, and the parity rule."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stepvideo.utils import safetensors_io as st

ROOT = Path(__file__).resolve().parents[1]
# CI clones main with shared/ beside it; STEPVIDEO_GOLDEN overrides.
GOLDEN = Path(os.environ.get("STEPVIDEO_GOLDEN", ROOT.parent / "shared/golden"))


def golden(component: str) -> Path:
    path = GOLDEN / component
    if not path.is_dir():
        raise FileNotFoundError(f"golden fixtures not found at {path} (set STEPVIDEO_GOLDEN)")
    return path


def load(component: str, name: str) -> dict:
    """inputs/outputs/weights of a golden component as {name: np.ndarray}."""
    return st.load_file(golden(component) / f"{name}.safetensors")


def cases(component: str) -> dict:
    return json.loads((golden(component) / "cases.json").read_text())


def to_np(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def parity_error(port, ref) -> float:
    """max|port - ref| / max(1, max|ref|): the golden README's rule, as a ratio to 1e-4."""
    port, ref = to_np(port), np.asarray(ref)
    assert port.shape == ref.shape, f"shape {port.shape} != reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    return float(np.abs(port.astype(np.float64) - ref.astype(np.float64)).max() / scale) if ref.size else 0.0


def assert_parity(port, ref, what: str, tol: float = 1e-4) -> float:
    """Assert `max|port - ref| <= tol * max(1, max|ref|)`; returns the scaled error."""
    err = parity_error(port, ref)
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"
    print(f"parity {what}: {err:.3e}")
    return err
