"""Transformer blocks of the HunyuanVideo DiT: token refiner, double- and single-stream blocks.

Every block is per-token except its attention, which goes through the joint-attention callable
passed in at call time (see models/attention.py), so sequence parallelism never touches this file.
Layouts: image tokens `[B, S, C]` (S may be a shard), text tokens `[B, L, C]` (always whole),
vec `[B, C]`, RoPE cos/sin `[S, head_dim]` for exactly the image tokens given. A block's
``chunk`` (max tokens, None = all) runs its token-wise parts in token chunks (models/chunking.py).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..attention import JointAttention
from ..chunking import by_chunks, linear_rows
from .config import HunyuanVideoConfig
from .layers import (
    MLP,
    Modulation,
    RMSNorm,
    TextProjection,
    TimestepEmbedder,
    gate,
    layer_norm,
    modulate,
)
from .rope import apply_rope


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[B, S, 3*H*D]` -> q, k, v each `[B, S, H, D]` (q, k, v outermost, as the release)."""
    return rearrange(qkv, "b s (k h d) -> k b s h d", k=3, h=heads).unbind(0)


class RefinerBlock(nn.Module):
    """One block of the text token refiner: self-attention over text only, gated, SiLU MLP."""

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        c, self.heads = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.self_attn_qkv = nn.Linear(c, 3 * c)
        self.self_attn_proj = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.mlp = MLP(c, cfg.mlp_hidden, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x `[B, L, C]`, c `[B, C]`, key_valid `[B, L]` bool."""
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)
        q, k, v = _split_heads(self.self_attn_qkv(self.norm1(x)), self.heads)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=key_valid[:, None, None, :],
        ).transpose(1, 2)
        x = x + gate(self.self_attn_proj(attn.flatten(2)), gate_msa)
        return x + gate(self.mlp(self.norm2(x)), gate_mlp)


class TokenRefiner(nn.Module):
    """`txt_in`: projects LLM states to the model width and refines them, conditioned on the
    timestep and the mask-averaged text (the release's SingleTokenRefiner)."""

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        c = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.text_states_dim, c)
        self.t_embedder = TimestepEmbedder(c)
        self.c_embedder = TextProjection(cfg.text_states_dim, c)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(
            RefinerBlock(cfg) for _ in range(cfg.refiner_depth)
        )

    def forward(self, txt: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """txt `[B, L, text_states_dim]`, t `[B]`, valid `[B, L]` bool -> `[B, L, C]`."""
        w = valid.to(txt.dtype).unsqueeze(-1)
        pooled = (txt * w).sum(1) / w.sum(1).clamp_min(1)
        c = self.t_embedder(t) + self.c_embedder(pooled)
        x = self.input_embedder(txt)
        # The release always lets every query see key 0, so an empty prompt cannot give NaN.
        key_valid = valid.clone()
        key_valid[:, 0] = True
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, key_valid)
        return x


def qkv_tokens(x, span: slice, *, eps, shift, scale, project, q_norm, k_norm, heads, rope=None):
    """q, k, v `[B, T, H, D]` of the tokens ``span`` of x `[B, S, C]`: modulated LayerNorm, the
    fused projection ``project`` (-> `[B, T, 3C]`), RMS-normed q and k, RoPE rows ``rope`` (cos,
    sin `[S, D]`, image tokens only) of the same span. Per token: any chunk gives the same rows."""
    q, k, v = _split_heads(project(modulate(layer_norm(x[:, span], eps), shift, scale)), heads)
    q, k = q_norm(q).to(v.dtype), k_norm(k).to(v.dtype)
    if rope is not None:
        cos, sin = rope[0][span], rope[1][span]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over both.

    ``chunk``: at most this many tokens at a time through the token-wise parts (models/chunking.py);
    the joint attention always sees every token."""

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        c, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.eps = cfg.num_heads, cfg.norm_eps
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(c, 6))
            setattr(self, f"{s}_attn_qkv", nn.Linear(c, 3 * c))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(d, cfg.norm_eps))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(d, cfg.norm_eps))
            setattr(self, f"{s}_attn_proj", nn.Linear(c, c))
            setattr(self, f"{s}_mlp", MLP(c, cfg.mlp_hidden, nn.GELU(approximate="tanh")))

    def _qkv(self, stream: str, x, mod, chunk, rope=None):
        part = partial(qkv_tokens, x, eps=self.eps, shift=mod[0], scale=mod[1], heads=self.heads, rope=rope,
                       project=getattr(self, f"{stream}_attn_qkv"), q_norm=getattr(self, f"{stream}_attn_q_norm"),
                       k_norm=getattr(self, f"{stream}_attn_k_norm"))
        return by_chunks(part, x.shape[1], chunk)

    def _finish(self, stream: str, x, attn, mod, chunk) -> torch.Tensor:
        """x + gated projection of attn `[B, S, H, D]`, then + the gated MLP, chunk by chunk."""
        _, _, gate1, shift2, scale2, gate2 = mod
        proj, mlp = getattr(self, f"{stream}_attn_proj"), getattr(self, f"{stream}_mlp")

        def part(span: slice) -> torch.Tensor:
            h = x[:, span] + gate(proj(attn[:, span].flatten(2)), gate1)
            return h + gate(mlp(modulate(layer_norm(h, self.eps), shift2, scale2)), gate2)

        return by_chunks(part, x.shape[1], chunk)

    def forward(self, img, txt, vec, cos, sin, txt_lens, attention: JointAttention, chunk: int | None = None):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_attn, txt_attn = attention(*self._qkv("img", img, img_mod, chunk, (cos, sin)),
                                       *self._qkv("txt", txt, txt_mod, chunk), txt_lens)
        img = self._finish("img", img, img_attn, img_mod, chunk)
        del img_attn  # before the text's MLP allocates
        return img, self._finish("txt", txt, txt_attn, txt_mod, chunk)


class SingleStreamBlock(nn.Module):
    """Shared weights over [image, text] tokens; attention and MLP computed in parallel from one
    input projection (`linear1` -> q, k, v, mlp) and fused back by `linear2`.

    The two parts of `linear1` are computed apart (the same weights, sliced by output feature):
    q, k, v before attention, the MLP input after it, so the MLP's `[B, S, M]` is never held
    across the attention, and under ``chunk`` exists for one chunk at a time."""

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        c, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.eps, self.hidden, self.mlp_hidden = cfg.num_heads, cfg.norm_eps, c, cfg.mlp_hidden
        self.linear1 = nn.Linear(c, 3 * c + cfg.mlp_hidden)
        self.linear2 = nn.Linear(c + cfg.mlp_hidden, c)
        self.q_norm = RMSNorm(d, cfg.norm_eps)
        self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.modulation = Modulation(c, 3)

    def _qkv(self, x, mod, chunk, rope=None):
        part = partial(qkv_tokens, x, eps=self.eps, shift=mod[0], scale=mod[1], heads=self.heads, rope=rope,
                       project=linear_rows(self.linear1, slice(0, 3 * self.hidden)), q_norm=self.q_norm,
                       k_norm=self.k_norm)
        return by_chunks(part, x.shape[1], chunk)

    def _finish(self, x, attn, mod, chunk) -> torch.Tensor:
        """x + gated linear2([attn, GELU(mlp)]), the MLP input recomputed from x, chunk by chunk."""
        shift, scale, g = mod
        mlp_in = linear_rows(self.linear1, slice(3 * self.hidden, None))

        def part(span: slice) -> torch.Tensor:
            mlp = F.gelu(mlp_in(modulate(layer_norm(x[:, span], self.eps), shift, scale)), approximate="tanh")
            return x[:, span] + gate(self.linear2(torch.cat([attn[:, span].flatten(2), mlp], dim=-1)), g)

        return by_chunks(part, x.shape[1], chunk)

    def forward(self, img, txt, vec, cos, sin, txt_lens, attention: JointAttention, chunk: int | None = None):
        """Image and text stay separate tensors here (same math as the release's concatenation),
        so that a shard of image tokens never has to be joined with the whole text."""
        mod = self.modulation(vec)
        img_attn, txt_attn = attention(*self._qkv(img, mod, chunk, (cos, sin)), *self._qkv(txt, mod, chunk), txt_lens)
        img = self._finish(img, img_attn, mod, chunk)
        del img_attn
        return img, self._finish(txt, txt_attn, mod, chunk)


class FinalLayer(nn.Module):
    """Norm, modulate (shift, scale), project to patch features `[B, S, C_out*pt*ph*pw]`."""

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_dim_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return by_chunks(lambda span: self.linear(modulate(layer_norm(x[:, span], self.eps), shift, scale)),
                         x.shape[1], chunk)


__all__ = ["TokenRefiner", "DoubleStreamBlock", "SingleStreamBlock", "FinalLayer"]
