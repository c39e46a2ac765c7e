"""Step-Video-TI2V's DiT (StepVideoModel with use_additional_conditions=True) against ti2v_dit c0..c2.

The fixture ran the original TI2V `StepVideoModel` with a condition latent (image latent in frame 0,
zeros elsewhere) and a motion score; the weights load through the real `from_pretrained` from a
`transformer/` folder, unchanged (patch embedding with 2*C input channels, motion-score embedder).
"""
import shutil

import numpy as np
import pytest
from mindspore import Tensor

from ascend_standins import kernel_table  # noqa: F401 (fixture: each golden case with the CPU and the Ascend table)
from stepvideo.modules.model import StepVideoModel
from support import assert_parity, cases, golden, load

SPEC = {c["name"]: c for c in cases("ti2v_dit")["cases"]}
INPUTS = load("ti2v_dit", "inputs")
OUTPUTS = load("ti2v_dit", "outputs")


def ti2v_transformer_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(golden("ti2v_dit") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(golden("ti2v_dit") / "weights.safetensors")
    return folder


def ti2v_kwargs(case: str) -> dict:
    def t(name):
        return Tensor(INPUTS[f"{case}.{name}"])

    return dict(hidden_states=t("hidden_states"), timestep=t("timestep"),
                encoder_hidden_states=t("encoder_hidden_states"),
                encoder_attention_mask=t("encoder_attention_mask"),
                encoder_hidden_states_2=t("encoder_hidden_states_2"),
                condition_hidden_states=t("condition_hidden_states"), motion_score=SPEC[case]["motion_score"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return StepVideoModel.from_pretrained(ti2v_transformer_folder(tmp_path_factory.mktemp("ti2v") / "transformer"))


def test_ti2v_checkpoint_loads_unchanged(model):
    weights = load("ti2v_dit", "weights")
    assert model.config.use_additional_conditions is True
    assert weights["pos_embed.proj.weight"].shape[1] == 2 * model.config.in_channels
    params = {p.name: p for p in model.get_parameters()}
    assert set(params) == set(weights)  # strict: every checkpoint tensor has its parameter and back
    for key in ("adaln_single.emb.motion_score_embedder.linear_1.weight",
                "adaln_single.emb.motion_score_embedder.linear_2.bias", "pos_embed.proj.weight"):
        np.testing.assert_array_equal(params[key].asnumpy(), weights[key])


@pytest.mark.parametrize("case", sorted(SPEC))
def test_ti2v_dit_matches_the_original(model, case, kernel_table):
    kw = ti2v_kwargs(case)
    joined = model.join_condition(kw["hidden_states"], kw["condition_hidden_states"])
    assert_parity(model.patchfy(joined), OUTPUTS[f"{case}.patch_embed"], f"ti2v {case}.patch_embed")
    modulation, embedded = model.adaln_single(kw["timestep"], model.motion_scores(kw["motion_score"],
                                                                                  kw["timestep"].shape[0]))
    assert_parity(embedded, OUTPUTS[f"{case}.adaln_embedded_timestep"], f"ti2v {case}.adaln_embedded_timestep")
    assert_parity(modulation, OUTPUTS[f"{case}.adaln_timestep"], f"ti2v {case}.adaln_timestep")
    assert_parity(model(**kw, return_dict=False), OUTPUTS[f"{case}.output"], f"ti2v {case}.output")


def test_ti2v_dit_compiled_matches_the_original(tmp_path, kernel_table):
    """Built inside the table: its compiled graphs keep the kernels they were compiled with."""
    case = "c0"  # one shape: each shape compiles anew (~5 s)
    model = StepVideoModel.from_pretrained(ti2v_transformer_folder(tmp_path / "transformer")).set_jit(True)
    assert_parity(model(**ti2v_kwargs(case), return_dict=False), OUTPUTS[f"{case}.output"],
                  f"ti2v {case}.output (compiled, {kernel_table.name} kernels)")


def test_ti2v_model_names_missing_conditions(model):
    kw = ti2v_kwargs("c1")
    with pytest.raises(ValueError, match="condition_hidden_states: this image-to-video model"):
        model(**{**kw, "condition_hidden_states": None}, return_dict=False)
    with pytest.raises(ValueError, match="motion_score: this image-to-video model needs a finite number"):
        model(**{**kw, "motion_score": None}, return_dict=False)
    with pytest.raises(ValueError, match=r"condition_hidden_states: expected shape \(1, 3, 8, 2, 5\)"):
        model(**{**kw, "condition_hidden_states": kw["condition_hidden_states"][:, :1]}, return_dict=False)


def test_t2v_model_refuses_an_image_condition(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(golden("dit") / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(golden("dit") / "weights.safetensors")
    t2v = StepVideoModel.from_pretrained(folder)
    kw = ti2v_kwargs("c1")
    with pytest.raises(ValueError, match="this is a text-to-video model"):
        t2v(**kw, return_dict=False)


def test_ti2v_dit_with_streamed_blocks_matches_the_original(tmp_path):
    """--offload blocks: the blocks come from the memory-mapped checkpoint one at a time; the TI2V inputs
    (condition latent, motion score) are embedded by the resident layers as before."""
    import json

    from stepvideo.streaming import dit_streaming

    folder = ti2v_transformer_folder(tmp_path / "transformer")
    model = StepVideoModel.from_config_dict(json.loads((folder / "config.json").read_text()))
    _, streamer = dit_streaming(model, folder, range(model.config.num_layers))
    model.set_train(False)
    try:
        for case in sorted(SPEC):
            assert_parity(model(**ti2v_kwargs(case), return_dict=False), OUTPUTS[f"{case}.output"],
                          f"ti2v {case}.output (streamed blocks)")
        assert streamer.stats.fills >= model.config.num_layers
    finally:
        streamer.close()
