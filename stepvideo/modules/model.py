"""`StepVideoModel`: the Step-Video-T2V diffusion transformer (30B with the published config).

Call (as the pipeline does):

    model(hidden_states=(b, f, c, h, w), timestep=(b,), encoder_hidden_states=(b, L, C_llm),
          encoder_attention_mask=(b, L_clip + L), encoder_hidden_states_2=(b, L_clip, C_clip),
          return_dict=False) -> (b, f, c_out, h, w)         (return_dict=True: {"x": output})

The forward is split into named steps so that parallel code can drive it from
outside without this file knowing about ranks:

    e = model.embed(...)                          # first pipeline stage
    x = model.block_forward(e.hidden_states, e.encoder_hidden_states, e.modulation,
                            e.rope_grid, e.attn_mask, blocks=range(i, j))   # every stage
    out = model.final_layer(x, e.embedded_timestep, e.frames, e.height, e.width)  # last stage

Tokens, the RoPE grid (n, 3) and the cross-attention mask rows can all be
sliced along the token axis by the caller; `SelfAttention.core_attention` is
the per-block hook for an all-to-all attention. `block_hook(i)` is a context
entered around block i that gives the cell computing it (default: block i
itself); weight streaming (stepvideo/streaming.py) puts block i's weights in
place there and gives the cell whose parameters hold them.

Compiling: `model.set_jit(True)` is the one switch. The patch embedding, the text
projection, each block's pieces around the attention hook and the output layer
are `layers.jit_method`s, so `construct` and a pipeline stage calling `embed`,
`block_forward` or `final_layer` from outside run the same compiled graphs (one
compile per input shape; the numbers are the eager path's).

Text conditioning: the CLIP tokens come first, then the Step-LLM tokens. The
attention mask is used only through its per-row counts: valid tokens are
assumed to be a prefix, the first max(count) key/value positions are kept and
row b attends to its first count[b] positions. The counts are summed in integers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Union

import mindspore as ms
import numpy as np
from mindone.diffusers.configuration_utils import ConfigMixin, register_to_config
from mindspore import Tensor, nn, ops

from stepvideo import backend
from stepvideo.checkpoint import PretrainedMixin
from stepvideo.layers import LayerNorm, Linear, jit_method, lazy_parameter
from stepvideo.modules.blocks import PatchEmbed, StepVideoTransformerBlock
from stepvideo.modules.normalization import AdaLayerNormSingle, PixArtAlphaTextProjection
from stepvideo.modules.rope import RoPE3D


@dataclass
class Embedded:
    """Everything the transformer blocks and the output layer need, from `StepVideoModel.embed`."""

    hidden_states: Tensor  # (b, f*h*w, D) video tokens, frame-major
    encoder_hidden_states: Tensor  # (b, L_kv, D) CLIP then LLM tokens, cut to the longest valid row
    attn_mask: Tensor  # (b, 1, L_kv) bool, True = attend
    modulation: Tensor  # (b, 6D) the blocks' adaLN modulation
    embedded_timestep: Tensor  # (b, D) the output layer's modulation input
    rope_grid: Tensor  # (f*h*w, 3) int32 (frame, row, col) of each token
    frames: int  # token grid after patching
    height: int
    width: int

    @property
    def timestep(self) -> Tensor:
        """`modulation` under the original's name (its blocks take it as `timestep`)."""
        return self.modulation


def _shape_error(name: str, expected: str, value: Tensor) -> ValueError:
    return ValueError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")


class StepVideoModel(nn.Cell, ConfigMixin, PretrainedMixin):
    config_name = "config.json"
    _no_split_modules = ["StepVideoTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 128,
        in_channels: int = 64,
        out_channels: Optional[int] = 64,
        num_layers: int = 48,
        dropout: float = 0.0,
        patch_size: int = 1,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        use_additional_conditions: Optional[bool] = False,
        caption_channels: Union[int, List[int], tuple] = (6144, 1024),
        attention_type: Optional[str] = "parallel",
    ):
        super().__init__()
        if use_additional_conditions:
            raise ValueError("use_additional_conditions=True is not supported (resolution/fps conditioning is "
                             "not used by any Step-Video checkpoint); expected False")
        if attention_type not in ("parallel", "torch"):
            raise ValueError(f"attention_type={attention_type!r}: expected 'parallel' or 'torch'")
        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.in_channels = in_channels

        self.pos_embed = PatchEmbed(patch_size=patch_size, in_channels=in_channels, embed_dim=self.inner_dim)
        self.transformer_blocks = nn.CellList(
            [StepVideoTransformerBlock(dim=self.inner_dim, attention_head_dim=attention_head_dim)
             for _ in range(num_layers)])

        self.norm_out = LayerNorm(self.inner_dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.scale_shift_table = lazy_parameter((2, self.inner_dim))
        self.proj_out = Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

        self.adaln_single = AdaLayerNormSingle(self.inner_dim)

        if isinstance(caption_channels, int):
            caption_channel, self.clip_channel = caption_channels, None
        else:
            caption_channel, self.clip_channel = caption_channels
            self.clip_projection = Linear(self.clip_channel, self.inner_dim)
        self.caption_channel = caption_channel
        self.caption_norm = LayerNorm(caption_channel, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channel, hidden_size=self.inner_dim)
        self.block_hook = self.resident_block  # (block index) -> context giving its cell; see the module docstring
        self.jit_enabled = False

    @property
    def dtype(self) -> ms.dtype:
        return self.proj_out.weight.dtype

    # ----------------------------------------------------------------------- 1. inputs

    @jit_method
    def patchfy(self, hidden_states: Tensor) -> Tensor:
        """(b, f, c, h, w) -> (b*f, (h/p)*(w/p), D): each frame's patches, row-major."""
        b, f, c, h, w = hidden_states.shape
        return self.pos_embed(hidden_states.reshape(b * f, c, h, w))

    def prepare_attn_mask(self, encoder_attention_mask: Tensor, encoder_hidden_states: Tensor):
        """Cut the text tokens to the longest valid row and mask each row beyond its own count.

        encoder_attention_mask (b, L_kv) 0/1 (valid tokens first), encoder_hidden_states (b, L_kv, D)
        -> (encoder_hidden_states (b, max_count, D), mask (b, 1, max_count) bool).
        """
        # Counted in integers: summed in bf16, counts above 256 would be rounded.
        counts = encoder_attention_mask.astype(ms.int32).sum(axis=1).asnumpy().astype(np.int64)
        if counts.min() < 1:
            raise ValueError(f"encoder_attention_mask: every row needs at least one valid token, "
                             f"got counts {counts.tolist()}")
        longest = int(counts.max())
        mask = np.arange(longest)[None, None, :] < counts[:, None, None]
        return encoder_hidden_states[:, :longest], Tensor.from_numpy(mask)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                      encoder_hidden_states_2):
        if hidden_states.ndim != 5 or hidden_states.shape[2] != self.in_channels:
            raise _shape_error("hidden_states", f"(b, f, {self.in_channels}, h, w)", hidden_states)
        b = hidden_states.shape[0]
        p = self.patch_size
        if hidden_states.shape[3] % p or hidden_states.shape[4] % p:
            raise _shape_error("hidden_states", f"(b, f, c, h, w) with h and w multiples of patch_size {p}",
                               hidden_states)
        if timestep is None or timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep: expected shape ({b},), got "
                             f"{None if timestep is None else tuple(timestep.shape)}")
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or \
                encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != self.caption_channel:
            raise ValueError(f"encoder_hidden_states: expected shape ({b}, L, {self.caption_channel}), got "
                             f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}")
        n_kv = encoder_hidden_states.shape[1]
        if encoder_hidden_states_2 is not None:
            if self.clip_channel is None:
                raise ValueError("encoder_hidden_states_2: this model has no CLIP projection "
                                 "(caption_channels is an int); expected None")
            if encoder_hidden_states_2.ndim != 3 or encoder_hidden_states_2.shape[0] != b or \
                    encoder_hidden_states_2.shape[2] != self.clip_channel:
                raise _shape_error("encoder_hidden_states_2", f"({b}, L_clip, {self.clip_channel})",
                                   encoder_hidden_states_2)
            n_kv += encoder_hidden_states_2.shape[1]
        if encoder_attention_mask is None or encoder_attention_mask.ndim != 2 or \
                tuple(encoder_attention_mask.shape) != (b, n_kv):
            raise ValueError(f"encoder_attention_mask: expected shape ({b}, {n_kv}) (CLIP tokens then LLM "
                             f"tokens), got "
                             f"{None if encoder_attention_mask is None else tuple(encoder_attention_mask.shape)}")

    @jit_method
    def project_text(self, encoder_hidden_states: Tensor, encoder_hidden_states_2: Optional[Tensor] = None) -> Tensor:
        """(b, L, C_llm) [+ (b, L_clip, C_clip)] -> (b, L_clip + L, D): CLIP tokens first, then the LLM tokens."""
        text = self.caption_projection(self.caption_norm(encoder_hidden_states.astype(self.dtype)))
        if encoder_hidden_states_2 is not None:
            clip = self.clip_projection(encoder_hidden_states_2.astype(self.dtype))
            text = ops.cat((clip, text), 1)
        return text

    def embed(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
              encoder_attention_mask: Tensor, encoder_hidden_states_2: Optional[Tensor] = None) -> Embedded:
        """Patch embedding, timestep modulation, text projection and truncation, RoPE grid."""
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                           encoder_hidden_states_2)
        b, frames, _, h, w = hidden_states.shape
        height, width = h // self.patch_size, w // self.patch_size

        tokens = self.patchfy(hidden_states.astype(self.dtype))  # (b*f, h*w, D)
        tokens = tokens.reshape(b, frames * height * width, self.inner_dim)

        # Kept eager: compiled, the x1000 timestep phases round differently (1e-5 on the output).
        modulation, embedded_timestep = self.adaln_single(timestep)
        text, attn_mask = self.prepare_attn_mask(encoder_attention_mask,
                                                 self.project_text(encoder_hidden_states, encoder_hidden_states_2))

        return Embedded(hidden_states=tokens, encoder_hidden_states=text, attn_mask=attn_mask,
                        modulation=modulation, embedded_timestep=embedded_timestep,
                        rope_grid=RoPE3D.position_grid(frames, height, width),
                        frames=frames, height=height, width=width)

    # ----------------------------------------------------------------------- 2. blocks

    def block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, modulation: Tensor,
                      rope_grid: Tensor, attn_mask: Optional[Tensor] = None,
                      blocks: Optional[range] = None) -> Tensor:
        """Run the blocks `blocks` (a contiguous range of indices; default all) on the video tokens.

        hidden_states (b, n, D), encoder_hidden_states (b, L, D), modulation (b, 6D), rope_grid (n, 3)
        int positions, attn_mask (b, 1|n, L) bool True = attend -> (b, n, D).
        """
        blocks = range(len(self.transformer_blocks)) if blocks is None else blocks
        if not isinstance(blocks, range) or blocks.step != 1 or \
                (len(blocks) and (blocks.start < 0 or blocks.stop > len(self.transformer_blocks))):
            raise ValueError(f"blocks: expected a contiguous range inside range(0, {len(self.transformer_blocks)}), "
                             f"got {blocks!r}")
        if len(blocks):
            # The RoPE tables depend only on the positions: make them once for all blocks.
            rope = self.transformer_blocks[blocks.start].attn1.rope_tables(rope_grid, hidden_states.dtype)
        for i in blocks:
            with self.block_hook(i) as block:
                hidden_states = block(hidden_states, encoder_hidden_states, modulation=modulation, attn_mask=attn_mask,
                                      rope=rope)
        return hidden_states

    def resident_block(self, index: int) -> contextlib.AbstractContextManager:
        """The default `block_hook`: block `index` computes itself."""
        return contextlib.nullcontext(self.transformer_blocks[index])

    def set_jit(self, enabled: bool) -> "StepVideoModel":
        """Run the patch embedding, the text projection, each block's pieces and the output layer as
        compiled graphs (one compile per input shape) or eagerly; the numbers are the eager path's."""
        self.jit_enabled = enabled
        for block in self.transformer_blocks:
            block.set_jit(enabled)
        return self

    # ----------------------------------------------------------------------- 3. output

    @jit_method
    def final_layer(self, hidden_states: Tensor, embedded_timestep: Tensor, frames: int, height: int,
                    width: int) -> Tensor:
        """(b, f*h*w, D) tokens -> (b, f, c_out, h*p, w*p): output norm, modulation, projection, unpatchify."""
        b = hidden_states.shape[0]
        p, c = self.patch_size, self.out_channels
        # Row 0 is the shift, row 1 the scale; the same for every frame of a sample.
        shift, scale = ops.split(self.scale_shift_table.expand_dims(0) + embedded_timestep.expand_dims(1), 1, axis=1)
        # norm_out(x) * (1 + scale) + shift, as one backend function (see modulated_layer_norm)
        x = backend.modulated_layer_norm(hidden_states, self.norm_out.weight, self.norm_out.bias,
                                         self.norm_out.eps, scale, shift)
        x = self.proj_out(x)  # (b, f*h*w, p*p*c)
        # (contiguous before the final reshape: see the note on views in blocks.py)
        x = x.reshape(b, frames, height, width, p, p, c).transpose(0, 1, 6, 2, 4, 3, 5).contiguous()
        return x.reshape(b, frames, c, height * p, width * p)

    # ----------------------------------------------------------------------- full forward

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                  encoder_hidden_states_2: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
                  encoder_attention_mask: Optional[Tensor] = None, return_dict: bool = True):
        e = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                       encoder_hidden_states_2)
        x = self.block_forward(e.hidden_states, e.encoder_hidden_states, e.modulation, e.rope_grid, e.attn_mask)
        output = self.final_layer(x, e.embedded_timestep, e.frames, e.height, e.width)
        return {"x": output} if return_dict else output
