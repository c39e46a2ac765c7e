"""Shared by the DiT tests: the golden DiT checkpoint laid out as a real `transformer/` folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mindspore import Tensor

from stepvideo.modules.model import StepVideoModel
from support import golden, load


def transformer_folder(folder: Path) -> Path:
    """config.json + the golden weights as `diffusion_pytorch_model.safetensors`, like a one-file checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(golden("dit") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(golden("dit") / "weights.safetensors")
    return folder


def call_kwargs(inputs: dict, case: str, rows=slice(None)) -> dict:
    """The pipeline's keyword call for one golden case (optionally a subset of batch rows)."""
    def t(name):
        return Tensor(inputs[f"{case}.{name}"][rows])

    return dict(hidden_states=t("hidden_states"), timestep=t("timestep"),
                encoder_hidden_states=t("encoder_hidden_states"),
                encoder_attention_mask=t("encoder_attention_mask"),
                encoder_hidden_states_2=t("encoder_hidden_states_2"))


def dit_inputs() -> dict:
    return load("dit", "inputs")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The golden DiT loaded through the real from_pretrained (import this fixture into a test module)."""
    return StepVideoModel.from_pretrained(transformer_folder(tmp_path_factory.mktemp("dit") / "transformer"))


@pytest.fixture(scope="module")
def fixtures():
    """(inputs, outputs) of the golden DiT cases."""
    return load("dit", "inputs"), load("dit", "outputs")
