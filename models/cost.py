"""The arithmetic of one DiT forward, as a family declares it: what a step costs before it is split.

Pure numbers from a preset's config (no weights, no device). ``parallel/cost_model.py`` turns it
into seconds for a topology; the family's ``forward_work(config, image_tokens)`` fills it in.
FLOPs count a multiply-add as 2; attention FLOPs are QK^T plus PV (``4 * q * kv * heads * head_dim``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ForwardWork:
    """One forward of batch 1 on ``image_tokens`` video tokens.

    - ``token_flops``: matmul FLOPs per image token (patch embedding, the blocks' token-wise
      linears, the head): split over the ranks by sequence parallel.
    - ``shared_flops``: matmul FLOPs every rank does whole (text-stream linears: text is not sharded).
    - ``blocks`` blocks each run one self-attention over all image tokens plus ``joint_tokens``
      text tokens (HunyuanVideo's joint attention; 0 for Wan): the sequence-parallel attention.
    - ``cross_tokens``: keys of a cross-attention per block from the rank's own queries to the whole
      text (Wan; 0 for none): local, no communication.
    - ``out_features``: features of one output token (what CFG's two halves exchange per step).
    """

    image_tokens: int
    token_flops: float
    shared_flops: float
    blocks: int
    heads: int
    head_dim: int
    joint_tokens: int = 0
    cross_tokens: int = 0
    out_features: int = 64

    def self_attention_flops(self, tokens: int | None = None) -> float:
        """All blocks' self-attention FLOPs over ``tokens`` image tokens (padding included; default:
        the video's) plus the joint text tokens."""
        n = (self.image_tokens if tokens is None else tokens) + self.joint_tokens
        return 4.0 * n * n * self.heads * self.head_dim * self.blocks

    def cross_attention_flops(self, queries: int) -> float:
        """All blocks' cross-attention FLOPs for ``queries`` image tokens."""
        return 4.0 * queries * self.cross_tokens * self.heads * self.head_dim * self.blocks

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim
