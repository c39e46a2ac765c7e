"""The DiT transformer block and its parts, with the checkpoint's parameter names.

Shapes: b batch, n video tokens (frame-major), L text tokens, D = heads * head_dim.

Layouts that the checkpoint fixes (and the golden fixtures check):
- `attn1.wqkv` output is (b, n, heads, 3*head_dim): per head [q | k | v], i.e.
  the weight rows are grouped by head, not a q block, then k, then v.
- `attn2.wkv` output is (b, L, heads, 2*head_dim): per head [k | v].
- q/k RMSNorm runs over one head's channels with one weight shared by all heads.
- `ff.net` is [GELU-tanh projection, Identity, Linear], so the checkpoint keys
  are `ff.net.0.proj.weight` and `ff.net.2.weight`.

Attention hooks: `SelfAttention.core_attention` and `CrossAttention.core_attention`
are attributes with `backend.attention`'s signature (default: `backend.attention`)
that parallel code may replace per block. The self-attention hook is called
between the block's compiled pieces, so a replacement may communicate (Ulysses
does); the cross-attention hook runs inside the compiled `after_attn1`. Every
per-token input (tokens, RoPE positions, cross-attention mask rows) can be
sliced along the sequence axis by the caller.

`.contiguous()` before a reshape that needs a copy: in MindSpore 2.7 (CPU,
pynative) reshaping a non-contiguous view (a transpose, a slice) into a shape
that cannot be a view corrupts the heap (glibc aborts the process at exit).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from mindspore import Parameter, Tensor, nn, ops

from stepvideo import backend
from stepvideo.layers import Conv2d, LayerNorm, Linear, RMSNorm, jit_method, lazy_parameter
from stepvideo.modules.rope import RoPE3D

# The RoPE input of a block: the (n, 3) / (b, n, 3) integer position grid, or the (cos, sin)
# tables `SelfAttention.rope_tables` makes from it.
RopeInput = Union[Tensor, Tuple[Tensor, Tensor], None]


class SelfAttention(nn.Cell):
    """Full self-attention over the video tokens with QK-RMSNorm and 3-D RoPE.

    Split into `qkv` (projection, q/k norm, RoPE), `core_attention` (the
    replaceable softmax attention) and `out` (output projection) so that the
    block can run the two projections as compiled graphs around the hook.
    """

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
        # Called as core_attention(q, k, v), each (b, n, heads, head_dim) -> (b, n, heads, head_dim).
        self.core_attention = backend.attention

    def rope_tables(self, rope: RopeInput, dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The (cos, sin) tables for `qkv`, shaped (1|b, n, 1, d) to broadcast over the heads.

        `rope` is the (n, 3) / (b, n, 3) integer grid, or tables already made by this
        method (`StepVideoModel.block_forward` makes them once for all blocks).
        """
        if not self.with_rope:
            return None, None
        if isinstance(rope, tuple):
            return rope
        if rope is None:
            raise ValueError("rope: SelfAttention with RoPE needs the (n, 3) token positions")
        cos, sin = self.rope_3d.tables(rope, self.rope_ch_split, dtype)
        if rope.ndim == 2:
            cos, sin = cos.expand_dims(0), sin.expand_dims(0)
        return cos.expand_dims(2), sin.expand_dims(2)

    def qkv(self, x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """x (b, n, D) -> q, k, v (b, n, heads, head_dim), q/k normalised and rotated.

        `unstack` gives q, k and v as contiguous tensors in one pass; slicing them out
        of the per-head [q|k|v] rows is a much slower strided copy on CPU.
        """
        b, n, _ = x.shape
        q, k, v = ops.unstack(self.wqkv(x).reshape(b, n, self.n_heads, 3, self.head_dim), 3)
        if self.with_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.with_rope:
            q = RoPE3D.rotate(q, cos, sin, self.rope_ch_split)
            k = RoPE3D.rotate(k, cos, sin, self.rope_ch_split)
        return q, k, v

    def out(self, attn: Tensor) -> Tensor:
        """(b, n, heads, head_dim) -> (b, n, D)."""
        b, n = attn.shape[0], attn.shape[1]
        # (contiguous: a replaced kernel may return a view; see the note on views above)
        return self.wo(attn.contiguous().reshape(b, n, -1))

    def construct(self, x: Tensor, rope: RopeInput = None) -> Tensor:
        """x (b, n, D), rope (n, 3) integer (frame, row, col) of each token (or its tables) -> (b, n, D)."""
        cos, sin = self.rope_tables(rope, x.dtype)
        return self.out(self.core_attention(*self.qkv(x, cos, sin)))


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
        # Called as core_attention(q, k, v, mask=attn_mask): q (b, n, heads, head_dim), k, v (b, L, heads,
        # head_dim) -> (b, n, heads, head_dim); runs inside the block's compiled graph.
        self.core_attention = backend.attention

    def construct(self, x: Tensor, encoder_hidden_states: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x (b, n, D), encoder_hidden_states (b, L, D), attn_mask bool (b, 1|n, L) True = attend -> (b, n, D)."""
        b, n, _ = x.shape
        q = self.wq(x).reshape(b, n, self.n_heads, self.head_dim)
        k, v = ops.unstack(self.wkv(encoder_hidden_states).reshape(b, encoder_hidden_states.shape[1],
                                                                   self.n_heads, 2, self.head_dim), 3)
        if self.with_qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        out = self.core_attention(q, k, v, mask=attn_mask).contiguous()
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


def modulate(norm: LayerNorm, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """norm(x) * (1 + scale) + shift."""
    return backend.modulated_layer_norm(x, norm.weight, norm.bias, norm.eps, scale, shift)


class StepVideoTransformerBlock(nn.Cell):
    """adaLN-modulated self-attention, un-normalised ungated cross-attention, modulated feed-forward.

        x += gate1 * attn1(LN1(x) * (1 + scale1) + shift1)
        x += attn2(x, text)
        x += gate2 * ff(LN2(x) * (1 + scale2) + shift2)

    with (shift1, scale1, gate1, shift2, scale2, gate2) = scale_shift_table + modulation,
    the (b, 6D) output of the model's `adaln_single` (the original calls it `timestep`).

    The forward is two pieces around `attn1.core_attention`: `attn1_inputs` and
    `after_attn1`; with the default kernel the block is the one piece `whole_block`.
    With `jit_enabled` each piece is a compiled graph (`layers.jit_method`); the
    hook between the pieces stays a plain call, so a replacement may communicate.
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
        self.jit_enabled = False

    def set_jit(self, enabled: bool) -> "StepVideoTransformerBlock":
        """Run the block's pieces as compiled graphs (one compile per input shape) or eagerly."""
        self.jit_enabled = enabled
        return self

    def _modulation(self, modulation: Tensor) -> Tensor:
        """(b, 6D) -> (b, 6, D): rows shift1, scale1, gate1, shift2, scale2, gate2."""
        return self.scale_shift_table.expand_dims(0) + modulation.reshape(-1, 6, self.dim)

    @jit_method
    def whole_block(self, x: Tensor, text: Tensor, modulation: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                    attn_mask: Optional[Tensor]) -> Tensor:
        """The block with the default self-attention kernel: one graph when compiled."""
        attn = backend.attention(*self.attn1_inputs(x, modulation, cos, sin))
        return self.after_attn1(x, attn, text, modulation, attn_mask)

    @jit_method
    def attn1_inputs(self, x: Tensor, modulation: Tensor, cos: Optional[Tensor], sin: Optional[Tensor]):
        """x (b, n, D), modulation (b, 6D) -> q, k, v (b, n, heads, head_dim) for the self-attention."""
        mod = self._modulation(modulation)
        shift_msa, scale_msa = mod[:, 0:1], mod[:, 1:2]
        return self.attn1.qkv(modulate(self.norm1, x, scale_msa, shift_msa), cos, sin)

    @jit_method
    def after_attn1(self, x: Tensor, attn: Tensor, text: Tensor, modulation: Tensor,
                    attn_mask: Optional[Tensor]) -> Tensor:
        """x (b, n, D) block input, attn (b, n, heads, head_dim) self-attention core output,
        text (b, L, D), modulation (b, 6D), attn_mask (b, 1|n, L) -> block output (b, n, D)."""
        mod = self._modulation(modulation)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, 2:3], mod[:, 3:4], mod[:, 4:5], mod[:, 5:6]
        x = gate_msa * self.attn1.out(attn) + x
        x = self.attn2(x, text, attn_mask) + x
        x = gate_mlp * self.ff(modulate(self.norm2, x, scale_mlp, shift_mlp)) + x
        return x

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, modulation: Tensor,
                  attn_mask: Optional[Tensor] = None, rope: RopeInput = None) -> Tensor:
        """hidden_states (b, n, D) video tokens, encoder_hidden_states (b, L, D) text tokens,
        modulation (b, 6D), attn_mask bool (b, 1|n, L) True = attend, rope (n, 3) positions or
        their `SelfAttention.rope_tables` -> (b, n, D)."""
        cos, sin = self.attn1.rope_tables(rope, hidden_states.dtype)
        if self.attn1.core_attention is backend.attention:
            return self.whole_block(hidden_states, encoder_hidden_states, modulation, cos, sin, attn_mask)
        q, k, v = self.attn1_inputs(hidden_states, modulation, cos, sin)
        attn = self.attn1.core_attention(q, k, v)
        return self.after_attn1(hidden_states, attn, encoder_hidden_states, modulation, attn_mask)


class PatchEmbed(nn.Cell):
    """Non-overlapping patches of each image -> tokens: (n, c, h, w) -> (n, (h/p)*(w/p), D), row-major."""

    def __init__(self, patch_size: int = 64, in_channels: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.proj = Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def construct(self, latent: Tensor) -> Tensor:
        x = self.proj(latent)  # (n, D, h/p, w/p)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1).contiguous()
