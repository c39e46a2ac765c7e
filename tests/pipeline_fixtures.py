"""Shared by the golden pipeline tests (T2V and TI2V): the fixture's model folder and its stored captions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from stepvideo.diffusion.interfaces import CaptionOutput
from support import golden


def golden_pipeline_dir(component: str, root: Path) -> Path:
    """`root` made a model folder (model_index.json, transformer/, scheduler/) for golden `component`'s
    1-layer DiT: its configs copied, its weights linked. Returns `root`."""
    (root / "transformer").mkdir(parents=True)
    (root / "scheduler").mkdir()
    shutil.copy(golden(component) / "config.json", root / "transformer" / "config.json")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(golden(component) / "weights.safetensors")
    shutil.copy(golden(component) / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StepVideoPipeline", "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
        "transformer": ["stepvideo", "StepVideoModel"]}))
    return root


class StoredCaptions:
    """A text encoding replaying the caption rows a pipeline fixture stored for `case`: row i answers
    `stored_prompts[i]` (the fixture's prompt + pos_magic, then neg_magic); another prompt is a KeyError."""

    def __init__(self, inputs: dict, case: str, stored_prompts: Sequence[str]):
        self.inputs, self.case = inputs, case
        self.rows = {p: i for i, p in enumerate(stored_prompts)}

    def encode(self, prompts) -> CaptionOutput:
        rows = [self.rows[p] for p in prompts]
        c = self.case
        return CaptionOutput(self.inputs[f"{c}.prompt_embeds"][rows], self.inputs[f"{c}.prompt_attention_mask"][rows],
                             self.inputs[f"{c}.clip_embedding"][rows])
