"""HunyuanClip against the golden fixtures of the original (clip b0..b3), and its strict loading."""
import math
import shutil

import numpy as np
import pytest
from mindspore import Tensor

from ascend_standins import kernel_table  # noqa: F401 (fixture: each golden case with the CPU and the Ascend table)
from stepvideo.checkpoint import CheckpointError, named_parameters
from stepvideo.text_encoder.clip import HunyuanClip, gelu_erf, tanh
from stepvideo.utils import safetensors_io as st
from support import assert_parity, cases, golden, load

BATCHES = cases("clip")["batches"]
WEIGHTS = golden("clip") / "hunyuan_clip" / "clip_text_encoder" / "model.safetensors"


@pytest.fixture(scope="module")
def clip():
    return HunyuanClip(golden("clip") / "hunyuan_clip", max_length=77)


@pytest.fixture(scope="module")
def outputs():
    return load("clip", "outputs")


def copy_clip(tmp_path, tensors=None, drop_weights=False):
    """A writable copy of the fixture's hunyuan_clip folder, optionally with other weights."""
    folder = tmp_path / "hunyuan_clip"
    shutil.copytree(golden("clip") / "hunyuan_clip", folder)
    weights = folder / "clip_text_encoder" / "model.safetensors"
    weights.chmod(0o644)
    if drop_weights:
        weights.unlink()
    elif tensors is not None:
        weights.unlink()
        st.save_file(weights, tensors)
    return folder


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_clip_batch(clip, outputs, batch, kernel_table):
    input_ids, attention_mask = clip.tokenize(BATCHES[batch])
    np.testing.assert_array_equal(input_ids, outputs[f"{batch}.input_ids"])
    np.testing.assert_array_equal(attention_mask, outputs[f"{batch}.attention_mask"])
    assert input_ids.dtype == np.int64 and attention_mask.dtype == np.int64
    last_hidden_state, pooler_output = clip(BATCHES[batch])
    assert_parity(last_hidden_state, outputs[f"{batch}.last_hidden_state"], f"{batch}.last_hidden_state")
    assert_parity(pooler_output, outputs[f"{batch}.pooler_output"], f"{batch}.pooler_output")


def test_inputs_fixture_matches_tokenizer(clip):
    """The tokens the reference model was fed (token types all zero, as the encoder assumes)."""
    inputs = load("clip", "inputs")
    for batch, prompts in BATCHES.items():
        ids, mask = clip.tokenize(prompts)
        np.testing.assert_array_equal(ids, inputs[f"{batch}.input_ids"])
        np.testing.assert_array_equal(mask, inputs[f"{batch}.attention_mask"])
        assert not inputs[f"{batch}.token_type_ids"].any()


def test_parameter_names_are_the_file_keys(clip):
    with st.SafetensorsFile(WEIGHTS) as f:
        assert set(named_parameters(clip.text_encoder)) == set(f.keys())


def test_string_prompt_and_bad_prompts(clip, outputs):
    last_hidden_state, _ = clip(BATCHES["b1"][0])
    assert_parity(last_hidden_state, outputs["b1.last_hidden_state"], "b1.last_hidden_state from a str")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        clip(["ok", 3])
    with pytest.raises(TypeError, match="got dict"):
        clip({"prompt": "a"})
    with pytest.raises(ValueError, match="at least one prompt"):
        clip([])


def test_padding_mask_matters(clip, outputs):
    """Without the mask the [PAD] keys are attended to, so the short prompt's output changes."""
    unmasked, _ = clip(BATCHES["b3"], with_mask=False)
    assert np.abs(unmasked.asnumpy() - outputs["b3.last_hidden_state"]).max() > 1e-2


def test_gelu_and_tanh_against_float64():
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    x64 = x.astype(np.float64)
    gelu_ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64])
    assert np.abs(gelu_erf(Tensor(x)).asnumpy() - gelu_ref).max() < 1e-6
    assert np.abs(tanh(Tensor(x)).asnumpy() - np.tanh(x64)).max() < 1e-5


def test_position_ids_buffer(tmp_path, clip, outputs):
    """An `embeddings.position_ids` buffer is accepted if it is arange(max_positions), refused otherwise."""
    tensors = st.load_file(WEIGHTS)
    tensors["embeddings.position_ids"] = np.arange(80, dtype=np.int64)[None]
    with_buffer = HunyuanClip(copy_clip(tmp_path / "ok", tensors))
    assert_parity(with_buffer(BATCHES["b0"])[0], outputs["b0.last_hidden_state"], "b0 with position_ids")

    tensors["embeddings.position_ids"] = np.arange(1, 81, dtype=np.int64)[None]
    with pytest.raises(CheckpointError, match="position_ids.*is not the buffer arange"):
        HunyuanClip(copy_clip(tmp_path / "shifted", tensors))


def test_strict_loading(tmp_path):
    tensors = st.load_file(WEIGHTS)
    tensors["text_projection"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*text_projection"):
        HunyuanClip(copy_clip(tmp_path / "extra", tensors))
    del tensors["text_projection"], tensors["pooler.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys.*pooler.dense.bias"):
        HunyuanClip(copy_clip(tmp_path / "missing", tensors))


def test_unconverted_folder_names_convert_py(tmp_path):
    folder = copy_clip(tmp_path, drop_weights=True)
    (folder / "clip_text_encoder" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="holds only pytorch_model.bin; convert it first: python convert.py"):
        HunyuanClip(folder)
