"""The joint-attention contract between a model and whoever runs it.

A model block calls one callable it is handed:

    attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_lens) -> (img_out, txt_out)

with every tensor `[B, tokens, heads, head_dim]`. Image tokens may be only this rank's shard of
the sequence (`parallel/` supplies that version); text tokens are always whole. `txt_lens` is a
LongTensor `[B]` of valid (leading) text tokens per item: padded text keys are never attended to,
and padded text query rows come out as zeros. This module holds the single-process default.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class JointAttention(Protocol):
    def __call__(
        self,
        img_q: torch.Tensor,
        img_k: torch.Tensor,
        img_v: torch.Tensor,
        txt_q: torch.Tensor,
        txt_k: torch.Tensor,
        txt_v: torch.Tensor,
        txt_lens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def text_valid_mask(txt_lens: torch.Tensor, txt_len: int) -> torch.Tensor:
    """Boolean `[B, txt_len]`: True where the text token is valid (a leading prefix per item)."""
    return torch.arange(txt_len, device=txt_lens.device)[None, :] < txt_lens[:, None]


def sdpa_joint_attention(img_q, img_k, img_v, txt_q=None, txt_k=None, txt_v=None, txt_lens=None):
    """Plain SDPA over the concatenation [image tokens, text tokens] ("rear" text).

    Inputs `[B, S, H, D]` (image) and `[B, L, H, D]` (text); outputs the same shapes. Without text
    (`txt_q` None: a family whose self-attention sees only the video, as Wan's) it is SDPA over the
    image tokens and returns `(img_out, None)`.
    """
    if txt_q is None:
        out = F.scaled_dot_product_attention(img_q.transpose(1, 2), img_k.transpose(1, 2), img_v.transpose(1, 2))
        return out.transpose(1, 2), None
    s = img_q.shape[1]
    q = torch.cat([img_q, txt_q], dim=1).transpose(1, 2)  # [B, H, S+L, D]
    k = torch.cat([img_k, txt_k], dim=1).transpose(1, 2)
    v = torch.cat([img_v, txt_v], dim=1).transpose(1, 2)
    txt_valid = text_valid_mask(txt_lens.to(img_q.device), txt_q.shape[1])  # [B, L]
    key_valid = torch.cat([txt_valid.new_ones(txt_valid.shape[0], s), txt_valid], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :])
    out = out.transpose(1, 2)  # [B, S+L, H, D]
    img_out, txt_out = out[:, :s], out[:, s:]
    return img_out, txt_out * txt_valid[:, :, None, None].to(txt_out.dtype)
