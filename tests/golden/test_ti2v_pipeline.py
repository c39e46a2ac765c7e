"""Step-Video-TI2V's pipeline (first image -> resize + centre crop -> VAE -> condition latent -> loop)
against golden/ti2v_pipeline.

The fixture ran the original TI2V `StepVideoPipeline.__call__` for 3 steps with a 1-layer DiT; its two
HTTP calls were bypassed: `encode_prompt` returned the stored embeddings and `encode_vae` recorded the
image it was given (`preprocessed_image`) and returned the stored `image_latent`. We do the same with a
caption replay and an image encoding that records its input and answers the stored latent.
"""
import numpy as np
import pytest

from pipeline_fixtures import StoredCaptions, golden_pipeline_dir
from stepvideo.diffusion import image_condition
from stepvideo.diffusion.video_pipeline import StepVideoPipeline
from support import assert_parity, cases, load

INPUTS = load("ti2v_pipeline", "inputs")
OUTPUTS = load("ti2v_pipeline", "outputs")
CASES = {c["name"]: c for c in cases("ti2v_pipeline")["cases"]}
PROMPT, POS, NEG = "a prompt", " +pos", "neg"


class StoredImageLatent:
    """The VAE's image encode as the fixture bypassed it: records the image, answers the stored latent."""

    def __init__(self, case):
        self.case = case
        self.images = []

    def encode(self, video, seed):
        assert isinstance(seed, int)
        self.images.append(np.array(video))
        return INPUTS[f"{self.case}.image_latent"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return golden_pipeline_dir("ti2v_pipeline", tmp_path_factory.mktemp("ti2v_pipeline_model"))


def run(model_dir, case, **overrides):
    spec = CASES[case]
    images = StoredImageLatent(case)
    pipe = StepVideoPipeline.from_pretrained(model_dir, text_encoding=StoredCaptions(INPUTS, case, [PROMPT + POS, NEG]), image_encoding=images)
    steps = []
    kwargs = dict(prompt=PROMPT, pos_magic=POS, neg_magic=NEG, height=spec["height"], width=spec["width"],
                  num_frames=spec["num_frames"], latents=INPUTS[f"{case}.latents"],
                  num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"],
                  time_shift=spec["time_shift"], motion_score=spec["motion_score"], output_type="latent",
                  progress=False, first_image=INPUTS[f"{case}.first_image"],
                  callback=lambda i, t: steps.append({k: v.asnumpy() for k, v in t.items()}))
    kwargs.update(overrides)
    out = pipe(**kwargs)
    return pipe, images, steps, out.video


@pytest.mark.parametrize("case", sorted(CASES))
def test_ti2v_pipeline_matches_the_original(model_dir, case, in_tmp):
    pipe, images, steps, final = run(model_dir, case)
    assert len(images.images) == 1
    assert_parity(images.images[0], OUTPUTS[f"{case}.preprocessed_image"], f"ti2v {case}.preprocessed_image")
    assert len(steps) == CASES[case]["num_inference_steps"]
    assert_parity(pipe.scheduler.timesteps, OUTPUTS[f"{case}.timesteps"], f"ti2v {case}.timesteps")
    assert_parity(pipe.scheduler.sigmas, OUTPUTS[f"{case}.sigmas"], f"ti2v {case}.sigmas")
    for i, got in enumerate(steps):
        assert_parity(got["condition"], OUTPUTS[f"{case}.condition_hidden_states"],
                      f"ti2v {case}.step{i}.condition_hidden_states")
        assert_parity(got["model_input"], OUTPUTS[f"{case}.step{i}.model_input"], f"ti2v {case}.step{i}.model_input")
        assert_parity(got["timestep"], OUTPUTS[f"{case}.step{i}.model_timestep"],
                      f"ti2v {case}.step{i}.model_timestep")
        assert_parity(got["noise_pred"], OUTPUTS[f"{case}.step{i}.noise_pred_guided"],
                      f"ti2v {case}.step{i}.noise_pred_guided")
        assert_parity(got["latents"], OUTPUTS[f"{case}.step{i}.latents_after"], f"ti2v {case}.step{i}.latents_after")
    assert_parity(final, OUTPUTS[f"{case}.final_latents"], f"ti2v {case}.final_latents")
    print(f"ti2v {case}: {pipe.seconds_per_step * 1000:.1f} ms per denoising step (tiny DiT, CPU fp32)")


def test_ti2v_several_videos_each_follow_the_original(model_dir, in_tmp):
    """Two videos of one prompt from the same noise: the condition has 4 rows and each video is the fixture's."""
    case = "c1"
    two = np.concatenate([INPUTS[f"{case}.latents"]] * 2)
    _, images, steps, final = run(model_dir, case, latents=two, num_videos_per_prompt=2)
    assert len(images.images) == 1 and steps[0]["condition"].shape[0] == 4
    for v in range(2):
        assert_parity(final[v:v + 1], OUTPUTS[f"{case}.final_latents"], f"ti2v {case} video {v} of 2")


def test_ti2v_without_guidance_is_the_conditional_branch(model_dir, in_tmp):
    """guidance_scale <= 1 runs batch 1 (the original's doubled condition crashed); with guidance 1 the
    guided CFG prediction is the conditional one, so both paths must agree."""
    case = "c0"
    _, _, plain, final = run(model_dir, case, guidance_scale=1.0)
    assert plain[0]["model_input"].shape[0] == 1 and plain[0]["condition"].shape[0] == 1
    _, _, cfg, final_cfg = run(model_dir, case, guidance_scale=1.0 + 1e-7)
    assert cfg[0]["model_input"].shape[0] == 2
    assert_parity(final, final_cfg, f"ti2v {case} guidance 1 (batch 1) vs CFG pair")


def test_ti2v_takes_a_path_and_a_pil_image(model_dir, tmp_path, in_tmp):
    """An image file and a PIL image give the float image ToTensor()*2-1 would, then the same crop."""
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(61, 50, 3), dtype=np.uint8)
    path = tmp_path / "first.png"
    Image.fromarray(pixels).save(path)
    as_float = pixels.transpose(2, 0, 1).astype(np.float64) / 255 * 2 - 1
    expected = image_condition.resize_and_crop(as_float.astype(np.float32), 32, 80)
    for given in (str(path), Image.open(path), pixels):
        _, images, _, _ = run(model_dir, "c1", first_image=given, num_inference_steps=1)
        assert_parity(images.images[0][0, 0], expected, f"first_image as {type(given).__name__}")


def test_image_kind_and_checkpoint_kind_must_match(model_dir, in_tmp):
    with pytest.raises(ValueError, match="image-to-video \\(Step-Video-TI2V\\) checkpoint; give the first frame"):
        run(model_dir, "c0", first_image=None)
    with pytest.raises(FileNotFoundError, match="no image file at"):
        run(model_dir, "c0", first_image="/nonexistent/first.png")
