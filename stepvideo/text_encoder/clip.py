"""HunyuanCLIP: the BERT text tower Step-Video uses as its second text encoder.

    clip = HunyuanClip("<model_dir>/hunyuan_clip", max_length=77)
    last_hidden_state, pooler_output = clip(["a cat", ""])     # (b, 77, 1024), (b, 1024) float32

Folder layout (the checkpoint's, with the weights converted to safetensors by `convert.py`):

    hunyuan_clip/clip_text_encoder/{config.json, model.safetensors}
    hunyuan_clip/tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}

`BertModel` is our own small encoder with the semantics and parameter names of
transformers' `BertModel` (post-LN layers, GELU with erf, pooler on [CLS]). It
computes in float32 on every device. Tokenisation is
transformers' python `BertTokenizer` (no torch needed): lower-case, accents
stripped, CJK split, WordPiece, [CLS] ... [SEP], truncated and padded to
max_length with [PAD]; token types are all zero.

A `model.safetensors` written by an older transformers may also hold the
`embeddings.position_ids` buffer; it is accepted when it is the positions
0..max_position_embeddings-1 that BERT uses anyway, and refused otherwise.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from stepvideo import backend
from stepvideo.checkpoint import CheckpointError, load_weights, read_config, weight_map
from stepvideo.contracts import check_prompts
from stepvideo.layers import Embedding, LayerNorm, Linear
from stepvideo.utils import safetensors_io as st

log = logging.getLogger(__name__)

POSITION_IDS = "embeddings.position_ids"
FP32 = ms.float32


def tanh(x: Tensor) -> Tensor:
    """tanh as 2 sigmoid(2x) - 1: the CPU tanh kernel is off by 1e-4, sigmoid is accurate."""
    return 2.0 * ops.sigmoid(2.0 * x) - 1.0


def gelu_erf(x: Tensor) -> Tensor:
    """GELU, exact (erf) form: x/2 (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


class BertEmbeddings(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, type_vocab_size: int,
                 eps: float):
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        self.word_embeddings = Embedding(vocab_size, hidden_size, dtype=FP32)
        self.position_embeddings = Embedding(max_position_embeddings, hidden_size, dtype=FP32)
        self.token_type_embeddings = Embedding(type_vocab_size, hidden_size, dtype=FP32)
        self.LayerNorm = LayerNorm(hidden_size, eps=eps, dtype=FP32)

    def construct(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(b, s) ids and token types -> (b, s, hidden)."""
        s = input_ids.shape[1]
        if s > self.max_position_embeddings:
            raise ValueError(f"input of {s} tokens is longer than max_position_embeddings "
                             f"{self.max_position_embeddings}")
        positions = ops.arange(s, dtype=ms.int64).expand_dims(0)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = Linear(hidden_size, hidden_size, dtype=FP32)
        self.key = Linear(hidden_size, hidden_size, dtype=FP32)
        self.value = Linear(hidden_size, hidden_size, dtype=FP32)
        # Called as core_attention(q, k, v, mask=keep), each (b, s, heads, head_dim) fp32; replaceable.
        self.core_attention = backend.attention

    def construct(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        """x (b, s, hidden), keep (b, 1, s) bool (True = attend) or None -> (b, s, hidden)."""
        b, s, hidden = x.shape
        heads = (b, s, self.num_heads, hidden // self.num_heads)
        out = self.core_attention(self.query(x).reshape(heads), self.key(x).reshape(heads),
                                  self.value(x).reshape(heads), mask=keep)
        return out.contiguous().reshape(b, s, hidden)


class BertOutput(nn.Cell):
    """LayerNorm(dense(x) + residual), dense `in_size` -> `hidden_size` (after the FFN: in_size = intermediate)."""

    def __init__(self, hidden_size: int, in_size: int, eps: float):
        super().__init__()
        self.dense = Linear(in_size, hidden_size, dtype=FP32)
        self.LayerNorm = LayerNorm(hidden_size, eps=eps, dtype=FP32)

    def construct(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class BertSelfOutput(BertOutput):
    """After the attention: the same with a square dense layer."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, hidden_size, eps)


class BertAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads)
        self.output = BertSelfOutput(hidden_size, eps)

    def construct(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size, dtype=FP32)

    def construct(self, x: Tensor) -> Tensor:
        return gelu_erf(self.dense(x))


class BertLayer(nn.Cell):
    """Post-LN: h = LN(x + attn(x)); out = LN(h + W2 gelu(W1 h))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, eps)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(hidden_size, intermediate_size, eps)

    def construct(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        h = self.attention(x, keep)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Cell):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layer = nn.CellList([BertLayer(**layer_kwargs) for _ in range(num_layers)])

    def construct(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        for layer in self.layer:
            x = layer(x, keep)
        return x


class BertPooler(nn.Cell):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size, dtype=FP32)

    def construct(self, hidden_states: Tensor) -> Tensor:
        """tanh(dense(h[:, 0])): (b, s, hidden) -> (b, hidden)."""
        return tanh(self.dense(hidden_states[:, 0]))


class BertModel(nn.Cell):
    """transformers' `BertModel` (with pooler) for inference, built from its config.json fields."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int = 2,
                 layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 position_embedding_type: str = "absolute"):
        super().__init__()
        if hidden_act != "gelu":
            raise ValueError(f"hidden_act={hidden_act!r}: only 'gelu' (the erf form) is supported")
        if position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type={position_embedding_type!r}: only 'absolute' is supported")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_attention_heads}")
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps)
        self.encoder = BertEncoder(num_hidden_layers, hidden_size=hidden_size, num_heads=num_attention_heads,
                                   intermediate_size=intermediate_size, eps=layer_norm_eps)
        self.pooler = BertPooler(hidden_size)

    @classmethod
    def from_config_dict(cls, config: dict) -> "BertModel":
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")
        optional = ("type_vocab_size", "layer_norm_eps", "hidden_act", "position_embedding_type")
        missing = [k for k in required if k not in config]
        if missing:
            raise CheckpointError(f"BERT config lacks field(s) {missing}")
        return cls(**{k: config[k] for k in required + optional if k in config})

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "BertModel":
        """Build from `folder/config.json` and load `folder/model.safetensors` strictly."""
        folder = Path(folder)
        net = cls.from_config_dict(read_config(folder))
        if not list(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").is_file():
            raise CheckpointError(f"{folder} holds only pytorch_model.bin; convert it first: python convert.py "
                                  f"--pt_filename {folder / 'pytorch_model.bin'} --sf_filename "
                                  f"{folder / 'model.safetensors'} --config_path {folder / 'config.json'}")
        _check_position_ids(folder, net.embeddings.max_position_embeddings)
        report = load_weights(net, folder, key_filter=lambda name: name != POSITION_IDS)
        log.info("BertModel: loaded %d tensors from %s in %.2fs", report.tensors, folder, report.seconds)
        net.set_train(False)
        return net

    def construct(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                  token_type_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """input_ids (b, s) -> (last_hidden_state (b, s, hidden), pooler_output (b, hidden)), float32.

        attention_mask (b, s): 1 = attend, 0 = padding (keys only; every query is computed).
        """
        if token_type_ids is None:
            token_type_ids = ops.zeros(input_ids.shape, ms.int64)
        keep = None if attention_mask is None else (attention_mask != 0).expand_dims(1)
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), keep)
        return hidden, self.pooler(hidden)


def _check_position_ids(folder: Path, max_positions: int) -> None:
    """Accept a stored `embeddings.position_ids` buffer only if it holds the positions BERT uses."""
    files = weight_map(folder)
    if POSITION_IDS not in files:
        return
    with st.SafetensorsFile(files[POSITION_IDS]) as f:
        info = f.tensors[POSITION_IDS]
        value = f.read_raw(POSITION_IDS)
    expected = np.arange(max_positions)[None]
    if not info.dtype.startswith("I") or value.shape != expected.shape or not np.array_equal(value, expected):
        raise CheckpointError(f"{files[POSITION_IDS]}: {POSITION_IDS} ({info.dtype} {list(value.shape)}) is not "
                              f"the buffer arange({max_positions}) of shape [1, {max_positions}]")


class HunyuanClip(nn.Cell):
    """BertTokenizer + BertModel from a `hunyuan_clip` folder; float32 outputs."""

    def __init__(self, model_dir: Union[str, os.PathLike], max_length: int = 77):
        super().__init__()
        from transformers import BertTokenizer

        self.max_length = max_length
        tokenizer_dir = os.path.join(model_dir, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"{tokenizer_dir} not found: a hunyuan_clip folder needs tokenizer/ and "
                                    f"clip_text_encoder/")
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
        self.text_encoder = BertModel.from_pretrained(os.path.join(model_dir, "clip_text_encoder"))

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Tuple[np.ndarray, np.ndarray]:
        """-> (input_ids, attention_mask), each (b, max_length) int64."""
        prompts = check_prompts(prompts)
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_attention_mask=True, return_tensors="np")
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    def construct(self, prompts: Union[str, Sequence[str]], with_mask: bool = True) -> Tuple[Tensor, Tensor]:
        """-> (last_hidden_state (b, max_length, hidden), pooler_output (b, hidden)), float32."""
        input_ids, attention_mask = self.tokenize(prompts)
        return self.text_encoder(Tensor(input_ids), Tensor(attention_mask) if with_mask else None)
