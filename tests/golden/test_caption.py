"""The caption packing the DiT expects, alone and through CaptionEncoder on the golden encoders."""
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from stepvideo import backend
from stepvideo.text_encoder.caption import CaptionEncoder, pack_caption
from support import assert_parity, cases, golden, load

LLM_BATCHES = cases("step_llm")["encoder_batches"]


def test_pack_caption_values():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y_mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.int64)
    clip = rng.standard_normal((2, 3, 6)).astype(np.float32)
    out = pack_caption(Tensor(y), Tensor(y_mask), Tensor(clip))
    assert set(out) == {"y", "y_mask", "clip_embedding"}
    np.testing.assert_array_equal(out["y"].asnumpy(), y)
    assert out["y_mask"].dtype == ms.int64
    np.testing.assert_array_equal(out["y_mask"].asnumpy(), [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    assert out["clip_embedding"].dtype == backend.compute_dtype()
    np.testing.assert_array_equal(out["clip_embedding"].asnumpy(), clip)


def test_pack_caption_casts_clip_to_the_dit_dtype():
    clip = np.array([[[1.0, 1 + 2**-7 + 2**-10, -3.0]]], np.float32)  # bf16 keeps 7 fraction bits
    out = pack_caption(Tensor(np.zeros((1, 2, 3), np.float32)), Tensor(np.ones((1, 2), np.int64)),
                       Tensor(clip), dtype=ms.bfloat16)
    assert out["clip_embedding"].dtype == ms.bfloat16
    assert out["clip_embedding"].astype(ms.float32).asnumpy().tolist() == [[[1.0, 1 + 2**-7, -3.0]]]


@pytest.mark.parametrize("y_shape, mask_shape, clip_shape, match", [
    ((2, 5, 4), (2, 4), (2, 3, 6), "y_mask must have shape"),
    ((2, 5, 4), (2, 5), (1, 3, 6), "clip_embedding has 1 rows but y has 2"),
    ((2, 5), (2, 5), (2, 3, 6), "must be \\(b, tokens, channels\\)"),
])
def test_pack_caption_shape_errors(y_shape, mask_shape, clip_shape, match):
    with pytest.raises(ValueError, match=match):
        pack_caption(Tensor(np.zeros(y_shape, np.float32)), Tensor(np.ones(mask_shape, np.int64)),
                     Tensor(np.zeros(clip_shape, np.float32)))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    (root / "step_llm").mkdir()
    for name in ("config.json", "step1_chat_tokenizer.model"):
        shutil.copy(golden("step_llm") / name, root / "step_llm" / name)
    shutil.copy(golden("step_llm") / "weights.safetensors", root / "step_llm" / "model.safetensors")
    shutil.copytree(golden("clip") / "hunyuan_clip", root / "hunyuan_clip")
    return CaptionEncoder(root)


@pytest.mark.parametrize("batch", ["b0", "b3"])
def test_caption_encoder(encoder, batch):
    """Both encoders on the same prompts (the fixtures share them), packed."""
    llm, clip = load("step_llm", "outputs"), load("clip", "outputs")
    assert cases("clip")["batches"][batch] == LLM_BATCHES[batch]
    out = encoder(LLM_BATCHES[batch])
    b = len(LLM_BATCHES[batch])
    assert out["y"].shape == (b, 320, 256) and out["clip_embedding"].shape == (b, 77, 32)
    assert_parity(out["y"], llm[f"{batch}.y"], f"caption {batch}.y")
    assert_parity(out["clip_embedding"], clip[f"{batch}.last_hidden_state"], f"caption {batch}.clip_embedding")
    expected_mask = np.concatenate([np.ones((b, 77), np.int64), llm[f"{batch}.y_mask"]], axis=1)
    np.testing.assert_array_equal(out["y_mask"].asnumpy(), expected_mask)


def test_caption_encoder_bad_prompts(encoder):
    with pytest.raises(ValueError, match="at least one prompt"):
        encoder([])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        encoder([None])
