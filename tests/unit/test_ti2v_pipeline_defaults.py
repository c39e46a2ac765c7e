"""`StepVideoPipeline` called directly takes the defaults of the original pipeline of its checkpoint's kind.

The originals' `StepVideoPipeline.__call__` signatures (stepvideo/diffusion/video_pipeline.py):
- Step-Video-T2V (commit 675e08c): num_frames=204;
- Step-Video-TI2V (commit 27f252d): num_frames=102, motion_score=2.0;
both: height 544, width 992, 50 steps, guidance 9.0, time_shift 13.0, empty magic prompts.
204 frames are 204 // 17 * 3 = 36 latent frames, 102 frames 18. The small golden pipelines
(1-layer DiTs) run one step at a small size; the text embeddings and the image latent are the
fixtures' stored ones, as in tests/golden/test_*pipeline.py.
"""
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline_fixtures import golden_pipeline_dir
from stepvideo.diffusion.video_pipeline import StepVideoPipeline
from support import load


@dataclass
class Caption:
    y: np.ndarray
    y_mask: np.ndarray
    clip_embedding: np.ndarray


class StoredCaptions:
    """The fixture's stored rows: row 0 for the prompt, row 1 for the negative prompt."""

    def __init__(self, inputs):
        self.inputs = inputs

    def encode(self, prompts):
        rows = [0, 1][:len(prompts)]
        return Caption(self.inputs["c1.prompt_embeds"][rows], self.inputs["c1.prompt_attention_mask"][rows],
                       self.inputs["c1.clip_embedding"][rows])


class StoredImageLatent:
    """The VAE encode as the TI2V fixture bypassed it: the stored latent of case c1 (32 x 80)."""

    def __init__(self, inputs):
        self.inputs = inputs

    def encode(self, video, seed):
        return self.inputs["c1.image_latent"]


def first_step(pipe, **kwargs):
    """The model input of step 0 and the final latents of a one-step run at 32 x 80 (frames left to the default)."""
    steps = []
    out = pipe(prompt="a prompt", height=32, width=80, num_inference_steps=1, output_type="latent", seed=3,
               progress=False, callback=lambda i, t: steps.append(t["model_input"].shape), **kwargs)
    return steps[0], out.video


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    inputs = load("ti2v_pipeline", "inputs")
    root = golden_pipeline_dir("ti2v_pipeline", tmp_path_factory.mktemp("ti2v"))
    return StepVideoPipeline.from_pretrained(root, text_encoding=StoredCaptions(inputs),
                                             image_encoding=StoredImageLatent(inputs)), inputs["c1.first_image"]


def test_image_to_video_defaults_to_102_frames_and_motion_score_2(ti2v, in_tmp):
    pipe, image = ti2v
    shape, default = first_step(pipe, first_image=image)
    assert shape == (2, 18, 8, 2, 5)  # CFG pair, 102 frames = 18 latent frames
    _, two = first_step(pipe, first_image=image, num_frames=102, motion_score=2.0)
    _, five = first_step(pipe, first_image=image, num_frames=102, motion_score=5.0)
    np.testing.assert_array_equal(default, two)
    assert np.abs(default - five).max() > 1e-3  # the motion score reaches the DiT: the default is the 2.0 run


def test_text_to_video_keeps_204_frames(tmp_path, in_tmp):
    root = golden_pipeline_dir("pipeline", tmp_path / "t2v")
    pipe = StepVideoPipeline.from_pretrained(root, text_encoding=StoredCaptions(load("pipeline", "inputs")))
    shape, _ = first_step(pipe)
    assert shape == (2, 36, 8, 2, 5)  # 204 frames = 36 latent frames
