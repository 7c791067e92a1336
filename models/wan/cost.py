"""FLOPs of one Wan2.1 forward (``models.cost.ForwardWork``), from the preset's config."""

from __future__ import annotations

from ..cost import ForwardWork
from .config import WanConfig


def forward_work(cfg: WanConfig, image_tokens: int, text_tokens: int) -> ForwardWork:
    """Per block and video token: self-attention q/k/v/o and cross-attention q/o (6d^2) and the FFN
    (2df); the cross-attention's k/v and the text embedding run on the text tokens, on every rank.
    The time projection acts on one vector per video: left out."""
    d, f = cfg.hidden_size, cfg.mlp_hidden
    token = cfg.patch_dim_in * d + cfg.depth * (6 * d * d + 2 * d * f) + d * cfg.patch_dim_out
    text = cfg.depth * 2 * d * d + cfg.text_dim * d + d * d
    return ForwardWork(image_tokens=image_tokens, token_flops=2.0 * token, shared_flops=2.0 * text * text_tokens,
                       blocks=cfg.depth, heads=cfg.num_heads, head_dim=cfg.head_dim, out_features=cfg.patch_dim_out,
                       cross_tokens=text_tokens)
