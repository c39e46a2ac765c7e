"""FLOPs of the DiT from its shapes (a multiply-add is 2 FLOPs), and the published model's configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class DitShape:
    """One DiT forward: b rows (2 with CFG), n video tokens, L text tokens after the cut."""

    layers: int
    heads: int
    head_dim: int
    batch: int
    video_tokens: int
    text_tokens: int  # CLIP + LLM tokens entering cross-attention
    llm_tokens: int = 0  # caption tokens through caption_projection (0: not counted)
    clip_tokens: int = 0
    llm_channels: int = 6144
    clip_channels: int = 1024
    in_channels: int = 64
    out_channels: int = 64
    patch: int = 1

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def block_flops(s: DitShape) -> Dict[str, float]:
    """FLOPs of one transformer block, split into GEMMs (weights) and attention (scores and mixing).

    GEMM: self-attn wqkv 3D^2 + wo D^2, cross wq D^2 + wo D^2 per video token, cross wkv 2D^2
          per text token, FFN 2 x 4D^2 per video token  ->  2 b (14 n D^2 + 2 L D^2)
    attention: QK^T and PV, each 2 n n D (self) and 2 n L D (cross)  ->  4 b D n (n + L)
    """
    b, n, l, d = s.batch, s.video_tokens, s.text_tokens, s.dim
    return {"gemm": 2.0 * b * (14 * n * d * d + 2 * l * d * d),
            "attention": 4.0 * b * d * n * (n + l)}


def dit_flops(s: DitShape) -> Dict[str, float]:
    """Whole forward: blocks + patch embedding, timestep MLP, caption/CLIP projections, output projection."""
    per_block = block_flops(s)
    b, n, d = s.batch, s.video_tokens, s.dim
    edges = 2.0 * b * (n * s.in_channels * s.patch ** 2 * d  # patch embedding
                       + 256 * d + d * d + 6 * d * d  # adaLN-single
                       + s.llm_tokens * (s.llm_channels * d + d * d)  # caption projection (2 layers)
                       + s.clip_tokens * s.clip_channels * d  # CLIP projection
                       + n * d * s.patch ** 2 * s.out_channels)  # proj_out
    return {"gemm": s.layers * per_block["gemm"] + edges, "attention": s.layers * per_block["attention"]}


def published_config() -> Dict[str, object]:
    """The published DiT's transformer/config.json fields the measurements need."""
    return {"num_attention_heads": 48, "attention_head_dim": 128, "num_layers": 48, "patch_size": 1,
            "in_channels": 64, "out_channels": 64}
