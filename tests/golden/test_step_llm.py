"""STEP1TextEncoder against the golden fixtures of the original (step_llm b0..b3, layer-0 intermediate).

The model folder is built in tmp from the fixture's files, once with the weights as one
`model.safetensors` and once as bf16 shards + `model.safetensors.index.json` (the layout of
the published step_llm/; the fixture's weights are bf16-exact, so the shards are lossless).
"""
import json
import shutil

import numpy as np
import pytest
from mindspore import Tensor

from ascend_standins import kernel_table  # noqa: F401 (fixture: each golden case with the CPU and the Ascend table)
from stepvideo.checkpoint import CheckpointError, named_parameters, save_sharded
from stepvideo.text_encoder.stepllm import STEP1TextEncoder, Step1Model, alibi_slopes
from support import assert_parity, cases, golden, load

BATCHES = cases("step_llm")["encoder_batches"]


def model_folder(path, layout):
    """step_llm/ with config.json, the tokenizer and the fixture's weights in `layout`."""
    path.mkdir(parents=True)
    for name in ("config.json", "step1_chat_tokenizer.model"):
        shutil.copy(golden("step_llm") / name, path / name)
    if layout == "single":
        shutil.copy(golden("step_llm") / "weights.safetensors", path / "model.safetensors")
    else:
        shards = save_sharded(load("step_llm", "weights"), path, "model", max_shard_bytes=2**20, bf16=True)
        assert len(shards) >= 2
    return path


@pytest.fixture(scope="module", params=["single", "sharded_bf16"])
def encoder(request, tmp_path_factory):
    return STEP1TextEncoder(model_folder(tmp_path_factory.mktemp("llm") / "step_llm", request.param))


@pytest.fixture(scope="module")
def outputs():
    return load("step_llm", "outputs")


def test_config_and_parameter_names(encoder):
    model = encoder.text_encoder
    assert set(named_parameters(model)) == set(load("step_llm", "weights"))
    # ffn_hidden_size 200 is rounded up to a multiple of 256.
    assert model.transformer.layers[0].feed_forward.hidden_dim == 256
    assert model.transformer.layers[0].attention.head_dim == 64


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_encoder_batch(encoder, outputs, batch, kernel_table):
    y, y_mask = encoder(BATCHES[batch])
    assert y.shape == (len(BATCHES[batch]), 320, 256)
    assert_parity(y, outputs[f"{batch}.y"], f"{batch}.y")
    np.testing.assert_array_equal(y_mask.asnumpy(), outputs[f"{batch}.y_mask"])
    assert y_mask.asnumpy().dtype == np.int64


def test_layer0_output(encoder, outputs, kernel_table):
    """The first block's output for b0, against the original's sequence-first intermediate."""
    model = encoder.text_encoder
    ids = encoder.text_tokenizer(BATCHES["b0"]).input_ids
    x = model.tok_embeddings(Tensor(ids))
    x = model.transformer.layers[0](x, model.transformer.alibi(x.shape[1]))
    assert_parity(x.transpose(1, 0, 2), outputs["b0.layer0_out_sbh"], "b0.layer0_out_sbh")


def test_causal_prefix_is_independent_of_max_length(encoder, outputs):
    """A shorter max_length only truncates: the positions before the new EOS are unchanged."""
    y, y_mask = encoder(BATCHES["b0"], max_length=40)
    assert y.shape == (2, 40, 256) and y_mask.asnumpy().tolist() == [[1] * 40] * 2
    assert_parity(y[:, :39], outputs["b0.y"][:, :39], "b0.y prefix at max_length 40")


def test_string_prompt_is_one_row(encoder, outputs):
    y, y_mask = encoder(BATCHES["b1"][0])
    assert_parity(y, outputs["b1.y"], "b1.y from a str")


@pytest.mark.parametrize("bad, where", [(42, "got int"), (["fine", None], r"prompts\[1\]")])
def test_bad_prompts(encoder, bad, where):
    with pytest.raises(TypeError, match=where):
        encoder(bad)


def test_mask_must_be_right_padding(encoder):
    ids = Tensor(np.ones((2, 5), np.int64))
    encoder.text_encoder(ids, attention_mask=Tensor(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])))
    with pytest.raises(ValueError, match=r"rows \[1\] are not right-padded"):
        encoder.text_encoder(ids, attention_mask=Tensor(np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])))


def test_alibi_slopes():
    """The README's slopes: 4 heads, and the real 48-head model (n = 32, then 16 interleaved)."""
    np.testing.assert_array_equal(alibi_slopes(4), [2**-2, 2**-4, 2**-6, 2**-8])
    expected = [2 ** (-(h + 1) / 4) for h in range(32)] + [2 ** (-(2 * j + 1) / 8) for j in range(16)]
    np.testing.assert_allclose(alibi_slopes(48), expected, rtol=1e-15)
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-15)


def test_real_config_fields_are_read(tmp_path):
    """The published config.json has many more fields; only the model's own are used."""
    config = json.loads((golden("step_llm") / "config.json").read_text())
    config.update({"architectures": ["Step1Model"], "attention_impl": "GQA", "kv_channels": 64,
                   "ffn_hidden_size": 300, "params_dtype": "torch.bfloat16", "virtual_pipeline_model_parallel_size": 3})
    model = Step1Model.from_config_dict(config)
    assert model.transformer.layers[1].feed_forward.hidden_dim == 512
    assert len(model.transformer.layers) == config["num_layers"]


def test_missing_and_misshapen_weights(tmp_path):
    folder = model_folder(tmp_path / "step_llm", "sharded_bf16")
    weights = load("step_llm", "weights")
    del weights["transformer.layers.1.ffn_norm.weight"]
    weights["transformer.layers.0.attention.wo.weight"] = weights["transformer.layers.0.attention.wo.weight"][:, :8]
    for p in folder.glob("model*"):
        p.unlink()
    save_sharded(weights, folder, "model", max_shard_bytes=2**20)
    with pytest.raises(CheckpointError, match=r"missing keys.*ffn_norm.*wrong shapes.*attention.wo.weight"):
        STEP1TextEncoder(folder)
