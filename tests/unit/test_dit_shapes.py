"""StepVideoModel beyond the golden cases: full-size lazy build, odd shapes, batch changes, errors."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
from mindspore import Tensor

from dit_fixtures import call_kwargs, dit_inputs, transformer_folder
from stepvideo.checkpoint import named_parameters, parameter_count
from stepvideo.modules.model import StepVideoModel
from support import assert_parity, load

ROOT = Path(__file__).resolve().parents[2]

# The published transformer/config.json (fields as diffusers writes them).
FULL_CONFIG = {
    "_class_name": "StepVideoModel", "_diffusers_version": "0.31.0", "attention_head_dim": 128,
    "attention_type": "parallel", "caption_channels": [6144, 1024], "dropout": 0.0, "in_channels": 64,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_type": "ada_norm_single",
    "num_attention_heads": 48, "num_layers": 48, "out_channels": 64, "patch_size": 1,
    "use_additional_conditions": False,
}


def expected_parameters(cfg: dict) -> dict:
    """Checkpoint key -> shape, written out from the checkpoint's key list (golden TENSORS.md, 'dit')."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hd, c_in, c_out, p = cfg["attention_head_dim"], cfg["in_channels"], cfg["out_channels"], cfg["patch_size"]
    llm, clip = cfg["caption_channels"]
    keys = {
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
        "adaln_single.linear.weight": (6 * d, d),
        "adaln_single.linear.bias": (6 * d,),
        "caption_projection.linear_1.weight": (d, llm),
        "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d),
        "caption_projection.linear_2.bias": (d,),
        "clip_projection.weight": (d, clip),
        "clip_projection.bias": (d,),
        "pos_embed.proj.weight": (d, c_in, p, p),
        "pos_embed.proj.bias": (d,),
        "proj_out.weight": (p * p * c_out, d),
        "proj_out.bias": (p * p * c_out,),
        "scale_shift_table": (2, d),
    }
    per_block = {
        "attn1.wqkv.weight": (3 * d, d), "attn1.wo.weight": (d, d),
        "attn1.q_norm.weight": (hd,), "attn1.k_norm.weight": (hd,),
        "attn2.wq.weight": (d, d), "attn2.wkv.weight": (2 * d, d), "attn2.wo.weight": (d, d),
        "attn2.q_norm.weight": (hd,), "attn2.k_norm.weight": (hd,),
        "ff.net.0.proj.weight": (4 * d, d), "ff.net.2.weight": (d, 4 * d),
        "norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "scale_shift_table": (6, d),
    }
    for i in range(cfg["num_layers"]):
        keys.update({f"transformer_blocks.{i}.{k}": s for k, s in per_block.items()})
    return keys


def test_golden_weights_have_exactly_the_derived_keys():
    """The key templates above reproduce the real checkpoint's names (as stored in the golden file)."""
    import json
    from support import golden
    cfg = json.loads((golden("dit") / "config.json").read_text())
    stored = {k: tuple(v.shape) for k, v in load("dit", "weights").items()}
    assert stored == expected_parameters(cfg)


def test_full_size_model_builds_lazily_with_checkpoint_names():
    proc = psutil.Process()
    before = proc.memory_info().rss
    model = StepVideoModel.from_config_dict(FULL_CONFIG)
    grown = (proc.memory_info().rss - before) / 2**20
    print(f"full-size StepVideoModel built; RSS grew by {grown:.1f} MiB")
    assert grown < 200, f"building the 30B model allocated {grown:.0f} MiB; parameters must stay lazy"

    params = {name: tuple(p.shape) for name, p in named_parameters(model).items()}
    assert params == expected_parameters(FULL_CONFIG)
    count = parameter_count(model)
    print(f"full-size StepVideoModel parameters: {count:,}")
    assert 29e9 < count < 31e9
    assert model.config.num_layers == 48 and model.config.in_channels == 64
    assert list(model.config.caption_channels) == [6144, 1024]


def test_defaults_are_the_published_config():
    model = StepVideoModel(num_layers=0)  # defaults; no blocks to keep it instant
    cfg = dict(model.config)
    for key, value in FULL_CONFIG.items():
        if key.startswith("_") or key == "num_layers":
            continue
        assert (list(cfg[key]) if key == "caption_channels" else cfg[key]) == value, key


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    return StepVideoModel.from_pretrained(transformer_folder(tmp_path_factory.mktemp("dit") / "transformer"))


def _random_call(rng, b, f, h, w, valid_llm, llm_tokens=6, clip_tokens=3):
    """Inputs of the golden model's widths (C_in 8, LLM 48, CLIP 32) with `valid_llm[i]` valid LLM tokens."""
    mask = np.zeros((b, clip_tokens + llm_tokens), np.float32)
    for i, n in enumerate(valid_llm):
        mask[i, :clip_tokens + n] = 1
    return dict(hidden_states=Tensor(rng.standard_normal((b, f, 8, h, w)).astype(np.float32)),
                timestep=Tensor(rng.uniform(0, 1, b).astype(np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((b, llm_tokens, 48)).astype(np.float32)),
                encoder_attention_mask=Tensor(mask),
                encoder_hidden_states_2=Tensor(rng.standard_normal((b, clip_tokens, 32)).astype(np.float32)))


def _row(kw, i):
    return {k: Tensor(v.asnumpy()[i:i + 1]) for k, v in kw.items()}


@pytest.mark.parametrize("fhw", [(1, 1, 1), (1, 3, 2), (3, 1, 1)])
def test_odd_shapes_batch_rows_are_independent(golden_model, fhw):
    """f, h, w = 1 and thin grids; batch 2 with different valid text lengths equals each row run alone."""
    rng = np.random.default_rng(sum(fhw))
    kw = _random_call(rng, 2, *fhw, valid_llm=[6, 2])
    both = golden_model(**kw, return_dict=False)
    assert tuple(both.shape) == (2, fhw[0], 8, fhw[1], fhw[2])
    assert np.isfinite(both.asnumpy()).all()
    for i in range(2):
        alone = golden_model(**_row(kw, i), return_dict=False)
        assert_parity(alone, both.asnumpy()[i:i + 1], f"fhw={fhw} row {i} alone vs in batch")


def test_batch_two_then_one_on_the_same_instance(golden_model):
    """The CFG pair (c1, valid 10 and 4) then each row alone: the original crashed on the second call."""
    inputs, outputs = dit_inputs(), load("dit", "outputs")
    ref = outputs["c1.output"]
    assert_parity(golden_model(**call_kwargs(inputs, "c1"), return_dict=False), ref, "c1 batch 2")
    assert_parity(golden_model(**call_kwargs(inputs, "c1", slice(1, 2)), return_dict=False), ref[1:],
                  "c1 row 1 alone (kv cut to 9)")
    assert_parity(golden_model(**call_kwargs(inputs, "c1", slice(0, 1)), return_dict=False), ref[:1],
                  "c1 row 0 alone")


def test_return_dict(golden_model):
    kw = call_kwargs(dit_inputs(), "c0")
    default = golden_model(**kw)
    assert isinstance(default, dict) and set(default) == {"x"}
    np.testing.assert_array_equal(default["x"].asnumpy(), golden_model(**kw, return_dict=False).asnumpy())


def test_text_lengths_are_counted_in_integers(golden_model):
    """A bf16 mask with 257 valid tokens keeps all 257 (the original's bf16 sum gave 256)."""
    import mindspore as ms
    mask = np.zeros((2, 300), np.float32)
    mask[0, :257] = 1
    mask[1, :3] = 1
    kv = Tensor(np.zeros((2, 300, 4), np.float32))
    cut, attn = golden_model.prepare_attn_mask(Tensor(mask).astype(ms.bfloat16), kv)
    assert tuple(cut.shape) == (2, 257, 4)
    expected = np.zeros((2, 1, 257), bool)
    expected[0, 0, :257] = True
    expected[1, 0, :3] = True
    np.testing.assert_array_equal(attn.asnumpy(), expected)


def test_patch_size_two_unpatchify_layout():
    """proj_out channels are (p, q, c) per token and land at pixel (h*p + i, w*p + j), channel c."""
    p, c = 2, 3
    model = StepVideoModel(num_attention_heads=1, attention_head_dim=128, in_channels=c, out_channels=c,
                           num_layers=0, patch_size=p, caption_channels=[16, 8])
    for name, param in named_parameters(model).items():
        param.set_data(Tensor(np.zeros(param.shape, np.float32)))
    bias = np.arange(p * p * c, dtype=np.float32)
    model.proj_out.bias.set_data(Tensor(bias))  # zero weights: every token outputs exactly `bias`
    tokens = Tensor(np.ones((1, 2 * 2 * 3, 128), np.float32))
    out = model.final_layer(tokens, Tensor(np.zeros((1, 128), np.float32)), 2, 2, 3).asnumpy()
    assert out.shape == (1, 2, c, 4, 6)
    for i in range(p):
        for j in range(p):
            for ch in range(c):
                assert (out[0, :, ch, i::p, j::p] == bias[(i * p + j) * c + ch]).all()


def test_forward_leaves_the_process_heap_intact(tmp_path):
    """Reshaping a non-contiguous view corrupts the heap in MindSpore 2.7 on CPU (abort at exit):
    a forward with patch 2, batch 2 and several frames must exit cleanly."""
    script = textwrap.dedent("""
        import numpy as np
        from mindspore import Tensor
        from stepvideo import backend
        backend.init()
        from stepvideo.modules.model import StepVideoModel
        m = StepVideoModel(num_attention_heads=1, attention_head_dim=128, in_channels=3, out_channels=3,
                           num_layers=1, patch_size=2, caption_channels=[16, 8])
        rng = np.random.default_rng(0)
        out = m(hidden_states=Tensor(rng.standard_normal((2, 2, 3, 4, 6)).astype(np.float32)),
                timestep=Tensor(np.array([0.5, 0.2], np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((2, 3, 16)).astype(np.float32)),
                encoder_attention_mask=Tensor(np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32)),
                encoder_hidden_states_2=Tensor(rng.standard_normal((2, 2, 8)).astype(np.float32)),
                return_dict=False)
        print("shape", tuple(out.shape))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"rc={run.returncode}\n{run.stdout}\n{run.stderr[-2000:]}"
    assert "shape (2, 2, 3, 4, 6)" in run.stdout


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_call():
    return call_kwargs(dit_inputs(), "c1")


@pytest.mark.parametrize("name, value, match", [
    ("hidden_states", np.zeros((2, 8, 3, 4), np.float32), r"hidden_states: expected shape \(b, f, 8, h, w\)"),
    ("hidden_states", np.zeros((2, 2, 7, 3, 4), np.float32), r"hidden_states: expected shape \(b, f, 8, h, w\)"),
    ("timestep", np.zeros((2, 1), np.float32), r"timestep: expected shape \(2,\)"),
    ("encoder_hidden_states", np.zeros((2, 12, 40), np.float32),
     r"encoder_hidden_states: expected shape \(2, L, 48\)"),
    ("encoder_hidden_states_2", np.zeros((2, 5, 31), np.float32),
     r"encoder_hidden_states_2: expected shape \(2, L_clip, 32\)"),
    ("encoder_attention_mask", np.ones((2, 12), np.float32), r"encoder_attention_mask: expected shape \(2, 17\)"),
    ("encoder_attention_mask", np.zeros((2, 17), np.float32), r"encoder_attention_mask: every row"),
])
def test_wrong_inputs_raise_value_error(golden_model, good_call, name, value, match):
    kw = dict(good_call, **{name: Tensor(value)})
    with pytest.raises(ValueError, match=match):
        golden_model(**kw, return_dict=False)


def test_wrong_block_range_and_config_raise(golden_model):
    e = golden_model.embed(**call_kwargs(dit_inputs(), "c0"))
    with pytest.raises(ValueError, match=r"blocks: expected a contiguous range inside range\(0, 2\)"):
        golden_model.block_forward(e.hidden_states, e.encoder_hidden_states, e.timestep, e.rope_grid, e.attn_mask,
                                   blocks=range(1, 3))
    with pytest.raises(ValueError, match="head_dim=64"):
        StepVideoModel(num_attention_heads=2, attention_head_dim=64, num_layers=1)
    # use_additional_conditions=True is Step-Video-TI2V (tests/golden/test_ti2v_dit.py); a T2V model refuses
    # the TI2V inputs.
    with pytest.raises(ValueError, match="this is a text-to-video model"):
        golden_model(**call_kwargs(dit_inputs(), "c0"), motion_score=2.0, return_dict=False)
    with pytest.raises(ValueError, match="attention_type"):
        StepVideoModel(num_layers=0, attention_type="flash")
