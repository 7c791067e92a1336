"""FLOPs of one HunyuanVideo forward (``models.cost.ForwardWork``), from the preset's config."""

from __future__ import annotations

from ..cost import ForwardWork
from .config import HunyuanVideoConfig


def forward_work(cfg: HunyuanVideoConfig, image_tokens: int, text_tokens: int) -> ForwardWork:
    """Double blocks: image and text streams with their own qkv/proj/MLP; single blocks: linear1
    (qkv + MLP in) and linear2 (proj + MLP out) on image and text tokens alike. Either is
    4h^2 + 2hm weights per token. Modulations act on one vector per video, not per token: left out."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    per_block = 4 * h * h + 2 * h * m
    blocks = cfg.depth_double + cfg.depth_single
    token = cfg.patch_dim_in * h + blocks * per_block + h * cfg.patch_dim_out
    # Text: through every block (its own stream in the double ones), the refiner and its input layer.
    text = (blocks + cfg.refiner_depth) * per_block + cfg.text_states_dim * h
    return ForwardWork(image_tokens=image_tokens, token_flops=2.0 * token, shared_flops=2.0 * text * text_tokens,
                       blocks=blocks, heads=cfg.num_heads, head_dim=cfg.head_dim, out_features=cfg.patch_dim_out,
                       joint_tokens=text_tokens)
