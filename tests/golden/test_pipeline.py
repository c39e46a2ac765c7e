"""StepVideoPipeline's denoising loop against the original (golden/pipeline).

The fixture ran the original `StepVideoPipeline.__call__` for 3 steps with a
1-layer DiT; only its two HTTP calls were bypassed: `encode_prompt` returned the
stored embeddings and `output_type="latent"` skipped the VAE. We do the same: a
text encoding that replays the stored caption rows, and output_type="latent".
"""
import pytest

from pipeline_fixtures import StoredCaptions as ReplayedCaptions
from pipeline_fixtures import golden_pipeline_dir
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
from stepvideo.diffusion.video_pipeline import StepVideoPipeline
from stepvideo.modules.model import StepVideoModel
from support import assert_parity, cases, load

INPUTS = load("pipeline", "inputs")
OUTPUTS = load("pipeline", "outputs")
CASES = {c["name"]: c for c in cases("pipeline")["cases"]}
PROMPT, POS, NEG = "a prompt", " +pos", "neg"


class StoredCaptions(ReplayedCaptions):
    """The fixture's caption rows: row 0 = prompt + pos_magic, row 1 = neg_magic, asked for together."""

    def __init__(self, case):
        super().__init__(INPUTS, case, [PROMPT + POS, NEG])

    def encode(self, prompts):
        assert prompts == [PROMPT + POS, NEG]
        return super().encode(prompts)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return golden_pipeline_dir("pipeline", tmp_path_factory.mktemp("pipeline_model"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_denoising_loop_matches_the_original(model_dir, case, in_tmp):
    spec = CASES[case]
    pipe = StepVideoPipeline.from_pretrained(model_dir, text_encoding=StoredCaptions(case))
    assert isinstance(pipe.transformer, StepVideoModel)
    assert isinstance(pipe.scheduler, FlowMatchDiscreteScheduler)
    latents = INPUTS[f"{case}.latents"]
    f, h, w = spec["latent_fhw"]
    steps = []
    out = pipe(prompt=PROMPT, pos_magic=POS, neg_magic=NEG, height=16 * h, width=16 * w, latents=latents,
               num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"],
               time_shift=spec["time_shift"], output_type="latent", progress=False,
               callback=lambda i, t: steps.append({k: v.asnumpy() for k, v in t.items()}))
    assert len(steps) == spec["num_inference_steps"]
    assert_parity(pipe.scheduler.timesteps, OUTPUTS[f"{case}.timesteps"], f"{case}.timesteps")
    assert_parity(pipe.scheduler.sigmas, OUTPUTS[f"{case}.sigmas"], f"{case}.sigmas")
    for i, got in enumerate(steps):
        assert_parity(got["model_input"], OUTPUTS[f"{case}.step{i}.model_input"], f"{case}.step{i}.model_input")
        assert_parity(got["timestep"], OUTPUTS[f"{case}.step{i}.model_timestep"], f"{case}.step{i}.model_timestep")
        assert_parity(got["noise_pred"], OUTPUTS[f"{case}.step{i}.noise_pred_guided"],
                      f"{case}.step{i}.noise_pred_guided")
        assert_parity(got["latents"], OUTPUTS[f"{case}.step{i}.latents_after"], f"{case}.step{i}.latents_after")
    assert_parity(out.video, OUTPUTS[f"{case}.final_latents"], f"{case}.final_latents")
    print(f"{case}: {pipe.seconds_per_step * 1000:.1f} ms per denoising step (tiny DiT, CPU fp32)")
