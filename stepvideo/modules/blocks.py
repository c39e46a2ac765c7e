"""The DiT transformer block and its parts, with the checkpoint's parameter names.

Shapes: b batch, n video tokens (frame-major), L text tokens, D = heads * head_dim.

Layouts that the checkpoint fixes (and the golden fixtures check):
- `attn1.wqkv` output is (b, n, heads, 3*head_dim): per head [q | k | v], i.e.
  the weight rows are grouped by head, not a q block, then k, then v.
- `attn2.wkv` output is (b, L, heads, 2*head_dim): per head [k | v].
- q/k RMSNorm runs over one head's channels with one weight shared by all heads.
- `ff.net` is [GELU-tanh projection, Identity, Linear], so the checkpoint keys
  are `ff.net.0.proj.weight` and `ff.net.2.weight`.

`.contiguous()` before a reshape that needs a copy: in MindSpore 2.7 (CPU,
pynative) reshaping a non-contiguous view (a transpose, a slice) into a shape
that cannot be a view corrupts the heap (glibc aborts the process at exit).

Sequence parallelism is applied from outside: `SelfAttention.core_attention`
is an attribute (default: the backend's full softmax attention) that a wrapper
can replace per block, and every per-token input (tokens, RoPE grid, cross-
attention mask rows) can be sliced along the sequence axis by the caller.
"""
from __future__ import annotations

from typing import Optional

from mindspore import Parameter, Tensor, nn, ops

from stepvideo import backend
from stepvideo.layers import Conv2d, LayerNorm, Linear, RMSNorm, lazy_parameter
from stepvideo.modules.rope import RoPE3D


class SelfAttention(nn.Cell):
    """Full self-attention over the video tokens with QK-RMSNorm and 3-D RoPE."""

    def __init__(self, hidden_dim: int, head_dim: int, bias: bool = False, with_rope: bool = True,
                 with_qk_norm: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = hidden_dim // head_dim
        self.wqkv = Linear(hidden_dim, hidden_dim * 3, bias=bias)
        self.wo = Linear(hidden_dim, hidden_dim, bias=bias)
        self.with_rope = with_rope
        self.with_qk_norm = with_qk_norm
        if with_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)
        if with_rope:
            self.rope_3d = RoPE3D(freq=1e4, F0=1.0, scaling_factor=1.0)
            # Hard-coded in the original: frame / row / col chunks of the 128 head channels.
            self.rope_ch_split = [64, 32, 32]
            if sum(self.rope_ch_split) != head_dim:
                raise ValueError(f"head_dim={head_dim}: the DiT's RoPE split {self.rope_ch_split} needs "
                                 f"head_dim {sum(self.rope_ch_split)}")
        # (q, k, v) each (b, s, heads, head_dim) -> (b, s, heads, head_dim); replaceable per block.
        self.core_attention = backend.attention

    def construct(self, x: Tensor, rope_grid: Optional[Tensor] = None) -> Tensor:
        """x (b, n, D), rope_grid (n, 3) integer (frame, row, col) of each token -> (b, n, D)."""
        xqkv = self.wqkv(x).reshape(x.shape[0], x.shape[1], self.n_heads, 3 * self.head_dim)
        d = self.head_dim
        xq, xk, xv = xqkv[..., :d], xqkv[..., d:2 * d], xqkv[..., 2 * d:]
        if self.with_qk_norm:
            xq = self.q_norm(xq)
            xk = self.k_norm(xk)
        if self.with_rope:
            if rope_grid is None:
                raise ValueError("rope_grid: SelfAttention with RoPE needs the (n, 3) token positions")
            xq = self.rope_3d.apply(xq, rope_grid, self.rope_ch_split)
            xk = self.rope_3d.apply(xk, rope_grid, self.rope_ch_split)
        out = self.core_attention(xq, xk, xv).contiguous()  # a replaced kernel may return a view
        return self.wo(out.reshape(x.shape[0], out.shape[1], -1))


class CrossAttention(nn.Cell):
    """Video tokens attend to the text tokens; QK-RMSNorm, no RoPE."""

    def __init__(self, hidden_dim: int, head_dim: int, bias: bool = False, with_qk_norm: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = hidden_dim // head_dim
        self.wq = Linear(hidden_dim, hidden_dim, bias=bias)
        self.wkv = Linear(hidden_dim, hidden_dim * 2, bias=bias)
        self.wo = Linear(hidden_dim, hidden_dim, bias=bias)
        self.with_qk_norm = with_qk_norm
        if with_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)

    def construct(self, x: Tensor, encoder_hidden_states: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x (b, n, D), encoder_hidden_states (b, L, D), attn_mask bool (b, 1|n, L) True = attend -> (b, n, D)."""
        b, n, _ = x.shape
        xq = self.wq(x).reshape(b, n, self.n_heads, self.head_dim)
        xkv = self.wkv(encoder_hidden_states).reshape(b, encoder_hidden_states.shape[1], self.n_heads,
                                                      2 * self.head_dim)
        xk, xv = xkv[..., :self.head_dim], xkv[..., self.head_dim:]
        if self.with_qk_norm:
            xq = self.q_norm(xq)
            xk = self.k_norm(xk)
        out = backend.attention(xq, xk, xv, mask=attn_mask).contiguous()
        return self.wo(out.reshape(b, n, -1))


class GELU(nn.Cell):
    """Linear projection followed by GELU (tanh approximation)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=bias)

    def construct(self, hidden_states: Tensor) -> Tensor:
        return backend.gelu_tanh(self.proj(hidden_states))


class FeedForward(nn.Cell):
    """net.2(gelu_tanh(net.0.proj(x))); net.1 is the original's Identity placeholder."""

    def __init__(self, dim: int, inner_dim: Optional[int] = None, dim_out: Optional[int] = None, mult: int = 4,
                 bias: bool = False):
        super().__init__()
        inner_dim = dim * mult if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        self.net = nn.CellList([GELU(dim, inner_dim, bias=bias), nn.Identity(), Linear(inner_dim, dim_out, bias=bias)])

    def construct(self, hidden_states: Tensor) -> Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class StepVideoTransformerBlock(nn.Cell):
    """adaLN-modulated self-attention, un-normalised ungated cross-attention, modulated feed-forward.

        x += gate1 * attn1(LN1(x) * (1 + scale1) + shift1)
        x += attn2(x, text)
        x += gate2 * ff(LN2(x) * (1 + scale2) + shift2)

    with (shift1, scale1, gate1, shift2, scale2, gate2) = scale_shift_table + timestep.
    """

    def __init__(self, dim: int, attention_head_dim: int, norm_eps: float = 1e-5, ff_inner_dim: Optional[int] = None,
                 ff_bias: bool = False):
        super().__init__()
        self.dim = dim
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn1 = SelfAttention(dim, attention_head_dim, bias=False, with_rope=True, with_qk_norm=True)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.attn2 = CrossAttention(dim, attention_head_dim, bias=False, with_qk_norm=True)
        self.ff = FeedForward(dim=dim, inner_dim=ff_inner_dim, dim_out=dim, bias=ff_bias)
        self.scale_shift_table: Parameter = lazy_parameter((6, dim))

    def construct(self, q: Tensor, kv: Tensor, timestep: Tensor, attn_mask: Optional[Tensor] = None,
                  rope_grid: Optional[Tensor] = None) -> Tensor:
        """q (b, n, D) video tokens, kv (b, L, D) text tokens, timestep (b, 6D), attn_mask (b, 1|n, L),
        rope_grid (n, 3) -> (b, n, D)."""
        mod = self.scale_shift_table.expand_dims(0) + timestep.reshape(-1, 6, self.dim)  # (b, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, 1, axis=1)
        q = gate_msa * self.attn1(modulate(self.norm1(q), scale_msa, shift_msa), rope_grid) + q
        q = self.attn2(q, kv, attn_mask) + q
        q = gate_mlp * self.ff(modulate(self.norm2(q), scale_mlp, shift_mlp)) + q
        return q


class PatchEmbed(nn.Cell):
    """Non-overlapping patches of each image -> tokens: (n, c, h, w) -> (n, (h/p)*(w/p), D), row-major."""

    def __init__(self, patch_size: int = 64, in_channels: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.proj = Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def construct(self, latent: Tensor) -> Tensor:
        x = self.proj(latent)  # (n, D, h/p, w/p)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1).contiguous()
