"""The Wan2.1 text-to-video diffusion transformer (WanModel, model_type 't2v') on patchified tokens.

Tokens in, tokens out, as every family: `forward` takes image tokens already patchified
(`[B, S, C*pt*ph*pw]`, t-major then h then w, C outermost within a token) with the RoPE rows of
exactly those tokens and returns the velocity in the same layout, so a sequence-parallel shard is
a slice of the tokens and of the RoPE rows. Module names and shapes are the release's keys.

Dtype policy (the release's `autocast(bfloat16)` over fp32 weights): the patch embedding, text
embedding, attention projections and MLPs run in the model's dtype (the matmul dtype `cdt`);
the time embedding and projection, the modulation tables and tensors, every norm, RoPE, the
residual stream after the first block's first residual add, and the head (its Linear too, which
the release runs under autocast(float32)) run in `wide = promote(cdt, fp32)`. The parameters used
in wide computations (`time_embedding.*`, `time_projection.*`, `head.*`, every `modulation` and
norm weight) stay fp32 under `model.to(torch.bfloat16)` (see `layers.KeepsFp32`): their values
are the checkpoint's fp32 ones, as the release uses them. Everything else takes the cast. The
output is wide (fp32 for a bf16 model), as the release returns `.float()` velocities.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import patchify, unpatchify  # noqa: F401  (re-exported: the family's token layout)
from ..attention import JointAttention, sdpa_joint_attention
from .config import WanConfig
from .layers import (
    Head, KeepsFp32, WanBlock, block_keeps_fp32, linear_in, rope_table, timestep_sinusoid, wide_dtype,
)


class WanDiT(KeepsFp32):
    """The DiT. Module names and parameter shapes are exactly the release's state-dict keys."""

    def __init__(self, cfg: WanConfig, attention: JointAttention | None = None):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        p = cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, c, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(
            WanBlock(c, cfg.mlp_hidden, cfg.num_heads, cfg.eps) for _ in range(cfg.depth)
        )
        self.head = Head(c, cfg.patch_dim_out, cfg.eps)
        self.set_attention(attention or sdpa_joint_attention)
        self.set_token_chunk(None)

    def _keeps_fp32(self, name: str) -> bool:
        if name.startswith("blocks."):
            return block_keeps_fp32(name.split(".", 2)[2])
        return name.startswith(("time_embedding.", "time_projection.", "head."))

    def set_attention(self, attention: JointAttention) -> None:
        """Swap the attention every block's self-attention uses (kept out of the module tree on
        purpose: a parallel attention object must not appear in `state_dict` or `.to()`)."""
        self.__dict__["_attention"] = attention

    @property
    def attention(self) -> JointAttention:
        return self.__dict__["_attention"]

    def set_token_chunk(self, tokens: int | None) -> None:
        """Run the blocks' and head's token-wise parts over chunks of at most ``tokens`` tokens
        (None: all at once); the result is the same (models/chunking.py), the peak lower."""
        self.__dict__["_token_chunk"] = tokens

    @property
    def token_chunk(self) -> int | None:
        return self.__dict__["_token_chunk"]

    @property
    def dtype(self) -> torch.dtype:
        """The matmul dtype (the patch embedding's); the wide parts run in promote(dtype, fp32)."""
        return self.patch_embedding.weight.dtype

    def rope(self, grid: tuple[int, int, int], dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin `[T'*H'*W', head_dim]` (fp32 unless asked) for a token grid."""
        return rope_table(grid, self.config.rope_axes_dim, self.config.rope_theta, dtype)

    def time(self, timestep: torch.Tensor, wide: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep `[B]` -> e `[B, C]` (for the head) and e0 `[B, 6, C]` (for the blocks), wide."""
        x = timestep_sinusoid(timestep, self.config.freq_dim)
        e = linear_in(self.time_embedding[2], F.silu(linear_in(self.time_embedding[0], x, wide)), wide)
        e0 = linear_in(self.time_projection[1], F.silu(e), wide)
        return e, e0.unflatten(1, (6, -1))

    def context(self, txt: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        """txt `[B, L, text_dim]`, mask `[B, L]` -> embedded text `[B, text_len, C]` (cdt).

        The release trims each prompt to its valid tokens and zero-pads it to text_len before
        the embedding, so the padding positions carry the embedding of a zero vector."""
        n = txt.shape[1]
        if n > self.config.text_len:
            raise ValueError(f"{n} text tokens exceed the DiT's text_len {self.config.text_len}")
        x = txt.to(self.dtype) * txt_mask.to(txt.device)[:, :, None].to(self.dtype)
        x = F.pad(x, (0, 0, 0, self.config.text_len - n))
        return self.text_embedding(x)

    def _head_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Head values per token ordered (pt, ph, pw, c) -> (c, pt, ph, pw), `patchify`'s order."""
        c = self.config.out_channels
        return out.unflatten(-1, (-1, c)).transpose(-1, -2).flatten(-2)

    def forward(
        self,
        img: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor,
        timestep: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img `[B, S, C_in*pt*ph*pw]` (S possibly a shard), rope_cos/sin `[S, head_dim]`, txt
        `[B, L, text_dim]` (L <= text_len), txt_mask `[B, L]`, timestep `[B]` (sigma x 1000)
        -> velocity `[B, S, C_out*pt*ph*pw]` in patchify's layout, wide dtype.

        pooled and guidance are part of the family seam and unused: Wan has neither."""
        s = self.enter(img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance)
        # run_blocks' loop, here so that nothing holds the first block's input while the later
        # blocks run (a Stream passed to run_blocks would keep it alive: one more [B, S, C]).
        x, s = s.img, replace(s, img=None)
        for block in self.blocks:
            x = block(x, s.e0, s.cos, s.sin, s.context, self.attention, chunk=self.token_chunk)
        return self.leave(replace(s, img=x))

    # The stage contract (models/step_cache.py): forward computes leave(run_blocks(enter(...))).

    def enter(self, img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled=None, guidance=None) -> "Stream":
        """forward's arguments -> what the first block takes (patch, time and text embeddings)."""
        cdt = self.dtype
        wide = wide_dtype(cdt)
        e, e0 = self.time(timestep.to(img.device), wide)
        context = self.context(txt, txt_mask)
        w = self.patch_embedding
        x = F.linear(img.to(cdt), w.weight.flatten(1), w.bias)  # the Conv3d (kernel = stride) on tokens
        return Stream(img=x, e=e, e0=e0, cos=rope_cos.to(img.device), sin=rope_sin.to(img.device), context=context)

    def run_blocks(self, s: "Stream", start: int = 0, stop: int | None = None) -> "Stream":
        """Blocks ``[start:stop]`` on the image stream."""
        x = s.img
        for block in self.blocks[start:stop]:
            x = block(x, s.e0, s.cos, s.sin, s.context, self.attention, chunk=self.token_chunk)
        return replace(s, img=x)

    def leave(self, s: "Stream") -> torch.Tensor:
        """The head -> velocity tokens in patchify's layout, wide."""
        return self._head_to_tokens(self.head(s.img, s.e, chunk=self.token_chunk))

    def tea_signal(self, s: "Stream") -> tuple[torch.Tensor, bool]:
        """TeaCache's signal for Wan: the timestep's modulation table e0 `[B, 6, C]` (the signal of
        TeaCache's Wan2.1 script with retention steps), the same on every rank (False: not a shard)."""
        return s.e0, False


@dataclass(frozen=True)
class Stream:
    """The DiT between its stages: image stream img `[B, S, C]` (S a shard), e `[B, C]` and e0
    `[B, 6, C]` (wide), RoPE cos/sin `[S, D]` on the device, embedded text context `[B, L, C]`."""

    img: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    context: torch.Tensor


__all__ = ["WanDiT", "patchify", "unpatchify"]
