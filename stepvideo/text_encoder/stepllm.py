"""Step-LLM, the 48-layer decoder Step-Video uses as its main text encoder.

    encoder = STEP1TextEncoder("<model_dir>/step_llm", max_length=320)
    y, y_mask = encoder(["a cat walks on the grass", ""])   # (b, 320, 6144), (b, 320) int64

`Step1Model` is a llama-style decoder without position embeddings and without a
final norm; its parameter names are the checkpoint keys:

    tok_embeddings.word_embeddings.weight                       (padded_vocab, hidden)
    transformer.layers.N.attention_norm.weight                  RMSNorm before attention
    transformer.layers.N.attention.wqkv.weight                  (hidden + 2 * groups * head_dim, hidden)
    transformer.layers.N.attention.wo.weight
    transformer.layers.N.ffn_norm.weight                        RMSNorm before the MLP
    transformer.layers.N.feed_forward.w1.weight                 (2 * ffn, hidden): [gate | up]
    transformer.layers.N.feed_forward.w2.weight                 (hidden, ffn)

Attention (through `MultiQueryAttention.core_attention`, default `backend.attention`
with an additive bias): grouped-query, causal, scale 1/sqrt(head_dim), plus an
ALiBi bias with square-root distance,

    score[h, i, j] = q_i . k_j / sqrt(d) - slope_h * sqrt(i - j)     (j <= i).

The padding mask is not used: padding is on the right and attention is causal,
so valid positions never see padded ones; padded positions are computed like any
other token. A mask that is not right padding is refused. The model runs batch-first.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
from mindspore import Tensor, nn

from stepvideo import backend
from stepvideo.checkpoint import PretrainedMixin
from stepvideo.layers import Embedding, Linear, RMSNorm
from stepvideo.text_encoder.tokenizer import Wrapped_StepChatTokenizer

TOKENIZER_FILE = "step1_chat_tokenizer.model"

log = logging.getLogger(__name__)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes (float64), also for head counts that are not powers of two.

    n = largest power of two <= heads: 2^(-8(h+1)/n) for h < n, then 2^(-4(2j+1)/n)
    for the remaining heads j = 0, 1, ... (the odd members of the 2n-head series).
    """
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    slopes += [2.0 ** (-4.0 * (2 * j + 1) / n) for j in range(num_heads - n)]
    return np.asarray(slopes, dtype=np.float64)


def alibi_bias(num_heads: int, seq_len: int) -> Tensor:
    """(1, heads, s, s) float32 additive bias -slope_h * sqrt(i - j); zero above the diagonal (masked anyway)."""
    pos = np.arange(seq_len, dtype=np.float64)
    distance = np.sqrt(np.maximum(pos[:, None] - pos[None, :], 0.0))  # (s_q, s_k)
    bias = -alibi_slopes(num_heads)[:, None, None] * distance[None]
    return Tensor(bias[None].astype(np.float32))


class LLaMaEmbedding(nn.Cell):
    """Token embedding only (no position embedding, no scaling)."""

    def __init__(self, hidden_size: int, padded_vocab_size: int):
        super().__init__()
        self.word_embeddings = Embedding(padded_vocab_size, hidden_size)

    def construct(self, input_ids: Tensor) -> Tensor:
        """(b, s) int -> (b, s, hidden)."""
        return self.word_embeddings(input_ids)


class MultiQueryAttention(nn.Cell):
    """Grouped-query attention with the fused `wqkv` = [all q | per group (k, v)]."""

    def __init__(self, hidden_size: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = hidden_size // num_heads
        self.wqkv = Linear(hidden_size, hidden_size + 2 * num_groups * self.head_dim, bias=False)
        self.wo = Linear(hidden_size, hidden_size, bias=False)
        # Called as core_attention(q, k, v, causal=True, bias=alibi), each (b, s, heads, head_dim); replaceable.
        self.core_attention = backend.attention

    def construct(self, x: Tensor, alibi: Tensor) -> Tensor:
        """x (b, s, hidden), alibi (1, heads, s, s) -> (b, s, hidden)."""
        b, s, hidden = x.shape
        hd, groups = self.head_dim, self.num_groups
        qkv = self.wqkv(x)
        q = qkv[..., :hidden].contiguous().reshape(b, s, self.num_heads, hd)
        kv = qkv[..., hidden:].contiguous().reshape(b, s, groups, 2 * hd)
        k = kv[..., :hd].contiguous()  # (b, s, groups, hd)
        v = kv[..., hd:].contiguous()
        # Query head h reads KV group h // (heads / groups): repeat each group for its heads.
        per_group = self.num_heads // groups
        if per_group > 1:
            k = k.expand_dims(3).broadcast_to((b, s, groups, per_group, hd)).reshape(b, s, self.num_heads, hd)
            v = v.expand_dims(3).broadcast_to((b, s, groups, per_group, hd)).reshape(b, s, self.num_heads, hd)
        out = self.core_attention(q, k, v, causal=True, bias=alibi).contiguous()
        return self.wo(out.reshape(b, s, hidden))


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(a) * b) with [a | b] = w1(x); the width is rounded up to a multiple of 256."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256):
        super().__init__()
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.hidden_dim = hidden_dim
        self.w1 = Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)

    def construct(self, x: Tensor) -> Tensor:
        gate_up = self.w1(x)
        gate, up = gate_up[..., :self.hidden_dim], gate_up[..., self.hidden_dim:]
        return self.w2(backend.silu(gate) * up)


class TransformerBlock(nn.Cell):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, hidden_size: int, num_heads: int, num_groups: int, ffn_hidden_size: int, eps: float):
        super().__init__()
        self.attention = MultiQueryAttention(hidden_size, num_heads, num_groups)
        self.feed_forward = FeedForward(hidden_size, ffn_hidden_size)
        self.attention_norm = RMSNorm(hidden_size, eps=eps)
        self.ffn_norm = RMSNorm(hidden_size, eps=eps)

    def construct(self, x: Tensor, alibi: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), alibi)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Cell):
    def __init__(self, num_layers: int, **block_kwargs):
        super().__init__()
        self.num_heads = block_kwargs["num_heads"]
        self.layers = nn.CellList([TransformerBlock(**block_kwargs) for _ in range(num_layers)])
        # (layer index) -> context around that layer giving the cell that computes it (default: the layer);
        # weight streaming puts the layer's weights in place there.
        self.layer_hook = self.resident_layer

    def resident_layer(self, index: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self.layers[index])

    def alibi(self, seq_len: int) -> Tensor:
        """The attention bias every layer shares for a sequence of `seq_len` tokens."""
        return alibi_bias(self.num_heads, seq_len)

    def construct(self, hidden_states: Tensor) -> Tensor:
        """(b, s, hidden) -> (b, s, hidden)."""
        alibi = self.alibi(hidden_states.shape[1])
        for i in range(len(self.layers)):
            with self.layer_hook(i) as cell:
                hidden_states = cell(hidden_states, alibi)
        return hidden_states


def check_right_padded(attention_mask) -> None:
    """Refuse a mask whose valid tokens are not a prefix of each row (the model cannot honour it)."""
    mask = attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask: expected shape (b, s), got {mask.shape}")
    valid = mask != 0
    prefix = np.cumprod(valid, axis=1).astype(bool)
    bad = np.flatnonzero((valid != prefix).any(axis=1))
    if bad.size:
        raise ValueError(f"attention_mask rows {bad.tolist()} are not right-padded (1...1 0...0); Step-LLM "
                         f"attention is causal without a mask, so only right padding is supported")


class Step1Model(nn.Cell, PretrainedMixin):
    """The Step-LLM decoder. Fields of the checkpoint's config.json that the model does not use are ignored."""

    def __init__(self, hidden_size: int, num_layers: int, num_attention_heads: int, num_attention_groups: int,
                 ffn_hidden_size: int, layernorm_epsilon: float, padded_vocab_size: int):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_attention_heads}")
        if num_attention_heads % num_attention_groups:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_attention_groups {num_attention_groups}")
        self.hidden_size = hidden_size
        self.padded_vocab_size = padded_vocab_size
        self.tok_embeddings = LLaMaEmbedding(hidden_size, padded_vocab_size)
        self.transformer = Transformer(num_layers, hidden_size=hidden_size, num_heads=num_attention_heads,
                                       num_groups=num_attention_groups, ffn_hidden_size=ffn_hidden_size,
                                       eps=layernorm_epsilon)

    @classmethod
    def from_pretrained_streaming(cls, folder: Union[str, os.PathLike]) -> "Step1Model":
        """The model from `folder` with its decoder layers streamed from the mapped checkpoint
        (`stepvideo.streaming`; the embeddings stay loaded). `model.streamer` is the BlockStreamer."""
        from stepvideo.checkpoint import read_config
        from stepvideo.streaming import load_streaming

        model = cls.from_config_dict(read_config(folder))
        layers = range(len(model.transformer.layers))
        report, streamer = load_streaming(model, folder, {i: f"transformer.layers.{i}." for i in layers},
                                          {i: model.transformer.layers[i] for i in layers},
                                          what=f"Step-LLM ({folder})")
        model.transformer.layer_hook = streamer.block
        model.streamer = streamer
        model.set_train(False)
        log.info("Step1Model: %d resident tensors (%.1f MiB) loaded from %s in %.2fs; %d layers streamed "
                 "(%.1f MiB per layer slot)", report.tensors, report.bytes / 2**20, folder, report.seconds,
                 len(layers), streamer.slot_bytes() / 2**20)
        return model

    def construct(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (b, s) int64 -> hidden states (b, s, hidden) of the last layer.

        attention_mask (b, s), optional: only checked to be right padding (see the module docstring).
        """
        if attention_mask is not None:
            check_right_padded(attention_mask)
        return self.transformer(self.tok_embeddings(input_ids))


class STEP1TextEncoder(nn.Cell):
    """Prompts -> (y (b, max_length, hidden) in the compute dtype, y_mask (b, max_length) int64)."""

    def __init__(self, model_dir: Union[str, os.PathLike], max_length: int = 320, offload: bool = False):
        """offload: stream the decoder layers from the mapped checkpoint (stepvideo/streaming.py)
        instead of holding them: memory for the embeddings + 2 layers, same numbers."""
        super().__init__()
        self.max_length = max_length
        self.text_tokenizer = Wrapped_StepChatTokenizer(os.path.join(model_dir, TOKENIZER_FILE))
        if offload:
            self.text_encoder = Step1Model.from_pretrained_streaming(model_dir)
        else:
            self.text_encoder = Step1Model.from_pretrained(model_dir)
        if self.text_tokenizer.vocab_size > self.text_encoder.padded_vocab_size:
            raise ValueError(f"{model_dir}: the tokenizer has {self.text_tokenizer.vocab_size} pieces but the "
                             f"model only {self.text_encoder.padded_vocab_size} embedding rows")

    def construct(self, prompts: Union[str, Sequence[str]], max_length: Optional[int] = None):
        """A prompt or a list of prompts -> (y, y_mask); `max_length` overrides the constructor's."""
        tokens = self.text_tokenizer(prompts, max_length=self.max_length if max_length is None else max_length)
        y = self.text_encoder(Tensor(tokens.input_ids))
        return y, Tensor(tokens.attention_mask)
