"""Helpers shared by the tests: where the golden fixtures are, the parity rule, a golden pipeline's model folder."""
from __future__ import annotations

import json
import os
import shutil
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


def golden_pipeline_dir(component: str, root: Path) -> Path:
    """`root` made a model folder (model_index.json, transformer/, scheduler/) for golden `component`'s
    1-layer DiT: its configs copied, its weights linked. Returns `root`."""
    (root / "transformer").mkdir()
    (root / "scheduler").mkdir()
    shutil.copy(golden(component) / "config.json", root / "transformer" / "config.json")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(golden(component) / "weights.safetensors")
    shutil.copy(golden(component) / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StepVideoPipeline", "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
        "transformer": ["stepvideo", "StepVideoModel"]}))
    return root
