"""Wrapped_StepChatTokenizer against the golden tokenizer cases of the original (step_llm tok.*),
plus its checks of the model file and of the input."""
import io

import numpy as np
import pytest

from stepvideo.text_encoder.tokenizer import (CONTROL_TOKENS, MASK_TOKENS, TokenizerError,
                                              Wrapped_StepChatTokenizer)
from support import cases, golden, load

TOKENIZER_CASES = cases("step_llm")["tokenizer_prompts"]
RAW = cases("step_llm")["tokenizer_raw"]


@pytest.fixture(scope="module")
def tokenizer():
    return Wrapped_StepChatTokenizer(golden("step_llm") / "step1_chat_tokenizer.model")


@pytest.fixture(scope="module")
def outputs():
    return load("step_llm", "outputs")


@pytest.mark.parametrize("name", sorted(TOKENIZER_CASES))
def test_golden_tokenizer_case(tokenizer, outputs, name):
    tokens = tokenizer(TOKENIZER_CASES[name], max_length=320)
    for what in ("input_ids", "attention_mask", "cu_seqlens"):
        ref = outputs[f"tok.{name}.{what}"]
        got = getattr(tokens, what)
        assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, got.shape)
        np.testing.assert_array_equal(got, ref, err_msg=f"tok.{name}.{what}")
    assert tokens.max_seq_len == RAW[name]["max_seq_len"]
    valid = outputs[f"tok.{name}.input_ids"][outputs[f"tok.{name}.attention_mask"] != 0]
    np.testing.assert_array_equal(tokens.cu_input_ids, valid[None])


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_sentencepiece_ids(tokenizer, name):
    assert [tokenizer.tokenize(p) for p in RAW[name]["prompts"]] == RAW[name]["sentencepiece_ids"]


def test_layout_rules(tokenizer):
    """BOS 1 / EOS 2 / PAD 2, truncation to max_length - 2 pieces, "" and [] as one [BOS, EOS] row."""
    t = tokenizer(["", "hello"], max_length=6)
    assert t.input_ids[0].tolist() == [1, 2, 2, 2, 2, 2]
    assert t.attention_mask[0].tolist() == [1, 1, 0, 0, 0, 0]
    pieces = tokenizer.tokenize("hello")
    assert t.input_ids[1].tolist()[:len(pieces) + 2] == [1] + pieces + [2]
    long = tokenizer(RAW["long"]["prompts"], max_length=10)
    assert long.input_ids[0].tolist() == [1] + RAW["long"]["sentencepiece_ids"][0][:8] + [2]
    assert long.attention_mask.tolist() == [[1] * 10] and long.cu_seqlens.tolist() == [0, 10]
    np.testing.assert_array_equal(tokenizer([], max_length=6).input_ids, tokenizer("", max_length=6).input_ids)
    # A bare string is one prompt (the original's encoder wrapped it in a list).
    np.testing.assert_array_equal(tokenizer("hello").input_ids, tokenizer(["hello"]).input_ids)


@pytest.mark.parametrize("bad, where", [(123, "got int"), (None, "got NoneType"), (["ok", 5], r"prompts\[1\]"),
                                        (("ok", "fine", b"bytes"), r"prompts\[2\]")])
def test_non_string_prompts_are_type_errors(tokenizer, bad, where):
    with pytest.raises(TypeError, match=where):
        tokenizer(bad)


@pytest.mark.parametrize("kwargs, match", [({"max_length": 1}, "max_length"), ({"max_length": 3.0}, "max_length"),
                                           ({"padding": "longest"}, "padding"), ({"truncation": False}, "truncation")])
def test_unsupported_options(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenizer(["a"], **kwargs)


def _train(tmp_path, control, user_defined):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a cat walks on the grass", "hello world 123", "one two three four"] * 20),
        model_writer=model, vocab_size=60, model_type="bpe", control_symbols=list(control),
        user_defined_symbols=list(user_defined), num_threads=1, minloglevel=2)
    path = tmp_path / "sp.model"
    path.write_bytes(model.getvalue())
    return path


def test_complete_vocabulary_is_accepted(tmp_path):
    tok = Wrapped_StepChatTokenizer(_train(tmp_path, CONTROL_TOKENS, MASK_TOKENS))
    assert tok.vocab["<|BOT|>"] in tok.inv_vocab and tok.vocab_size == 60


def test_missing_control_token(tmp_path):
    with pytest.raises(TokenizerError, match=r"'<\|THINK_END\|>' not found"):
        Wrapped_StepChatTokenizer(_train(tmp_path, CONTROL_TOKENS[:-1], MASK_TOKENS))


def test_control_token_that_is_an_ordinary_piece(tmp_path):
    with pytest.raises(TokenizerError, match=r"'<\|EOT\|>' is an ordinary piece; expected a control token"):
        Wrapped_StepChatTokenizer(_train(tmp_path, [t for t in CONTROL_TOKENS if t != "<|EOT|>"],
                                         MASK_TOKENS + ("<|EOT|>",)))


def test_missing_mask_token(tmp_path):
    with pytest.raises(TokenizerError, match=r"'<\|UNMASK_1e69f\|>' not found"):
        Wrapped_StepChatTokenizer(_train(tmp_path, CONTROL_TOKENS, MASK_TOKENS[:1]))


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="step1_chat_tokenizer.model"):
        Wrapped_StepChatTokenizer(tmp_path / "nothing.model")
