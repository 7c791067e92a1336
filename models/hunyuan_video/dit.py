"""The HunyuanVideo diffusion transformer (HYVideo-T/2-cfgdistill) on patchified tokens.

Tokens in, tokens out: `forward` takes image tokens already patchified (`[B, S, C*pt*ph*pw]`,
t-major then h then w, C outermost within a token) with the RoPE rows of exactly those tokens, and
returns tokens of the same layout. `patchify`, `unpatchify` and `rope_table` are separate, so a
sequence-parallel shard is just a slice of the tokens and of the RoPE rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..tokens import patchify, unpatchify  # noqa: F401  (re-exported: the family's token layout)
from ..attention import JointAttention, sdpa_joint_attention
from ..step_cache import call_with_weights_on
from .blocks import DoubleStreamBlock, FinalLayer, SingleStreamBlock, TokenRefiner
from .config import HunyuanVideoConfig
from .layers import MLPEmbedder, PatchEmbed, TimestepEmbedder, layer_norm, modulate
from .rope import rope_table


class HunyuanVideoDiT(nn.Module):
    """The DiT. Module names and parameter shapes are exactly the release's state-dict keys."""

    def __init__(self, cfg: HunyuanVideoConfig, attention: JointAttention | None = None):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.in_channels, cfg.patch_size, c)
        self.txt_in = TokenRefiner(cfg)
        self.time_in = TimestepEmbedder(c)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, c)
        self.guidance_in = TimestepEmbedder(c) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(cfg)
        self.set_attention(attention or sdpa_joint_attention)
        self.set_token_chunk(None)

    def set_token_chunk(self, tokens: int | None) -> None:
        """Run the blocks' and final layer's token-wise parts over chunks of at most ``tokens``
        tokens (None: all at once); the result is the same (models/chunking.py), the peak lower."""
        self.__dict__["_token_chunk"] = tokens

    @property
    def token_chunk(self) -> int | None:
        return self.__dict__["_token_chunk"]

    def set_attention(self, attention: JointAttention) -> None:
        """Swap the joint attention every block uses (kept out of the module tree on purpose:
        a parallel attention object must not appear in `state_dict` or `.to()`)."""
        self.__dict__["_attention"] = attention

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the DiT computes in (its embedders and final layer; FP8 blocks dequantise to it)."""
        return self.final_layer.linear.weight.dtype

    @property
    def attention(self) -> JointAttention:
        return self.__dict__["_attention"]

    def rope(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin `[T'*H'*W', head_dim]` (fp32) for a token grid."""
        return rope_table(grid, self.config.rope_axes_dim, self.config.rope_theta)

    def conditioning(self, timestep, pooled, guidance) -> torch.Tensor:
        """vec `[B, C]` = time + pooled-text (+ guidance) embeddings."""
        vec = self.time_in(timestep) + self.vector_in(pooled)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this DiT embeds guidance: pass guidance (scale x 1000) per item")
            vec = vec + self.guidance_in(guidance)
        return vec

    def forward(
        self,
        img: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor,
        timestep: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img `[B, S, C_in*pt*ph*pw]`, rope_cos/sin `[S, head_dim]`, txt `[B, L, text_dim]`,
        txt_mask `[B, L]` (valid tokens first), timestep `[B]` (sigma x 1000), pooled
        `[B, pooled_dim]`, guidance `[B]` (scale x 1000) -> `[B, S, C_out*pt*ph*pw]`."""
        s = self.enter(img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance)
        # run_blocks' loop, here so that nothing holds the first block's input while the later
        # blocks run (a Stream passed to run_blocks would keep it alive: one more [B, S, C]).
        x, t, s = s.img, s.txt, replace(s, img=None, txt=None)
        for block in self._blocks():
            x, t = block(x, t, s.vec, s.cos, s.sin, s.txt_lens, self.attention, chunk=self.token_chunk)
        return self.leave(replace(s, img=x))

    # The stage contract (models/step_cache.py): forward computes leave(run_blocks(enter(...))).

    def enter(self, img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance=None) -> "Stream":
        """forward's arguments -> the streams the first block takes (embeddings, text refiner)."""
        dtype = self.dtype
        valid = txt_mask.bool()
        # On the host: attention implementations read the lengths as ints, and a device tensor
        # would cost a sync in every block instead of one here.
        txt_lens = valid.sum(1).cpu()
        vec = self.conditioning(timestep, pooled.to(dtype), guidance)
        x = self.img_in(img.to(dtype))
        t = self.txt_in(txt.to(dtype), timestep, valid)
        return Stream(img=x, txt=t, vec=vec, cos=rope_cos.to(img.device), sin=rope_sin.to(img.device),
                      txt_lens=txt_lens)

    def run_blocks(self, s: "Stream", start: int = 0, stop: int | None = None) -> "Stream":
        """The double then single blocks ``[start:stop]`` on the streams."""
        x, t = s.img, s.txt
        for block in self._blocks()[start:stop]:
            x, t = block(x, t, s.vec, s.cos, s.sin, s.txt_lens, self.attention, chunk=self.token_chunk)
        return replace(s, img=x, txt=t)

    def _blocks(self) -> tuple[nn.Module, ...]:
        return (*self.double_blocks, *self.single_blocks)

    def leave(self, s: "Stream") -> torch.Tensor:
        """The final layer on the image stream -> patch tokens `[B, S, C_out*pt*ph*pw]`."""
        return self.final_layer(s.img, s.vec, chunk=self.token_chunk)

    def tea_signal(self, s: "Stream") -> tuple[torch.Tensor, bool]:
        """TeaCache's signal: the first double block's modulated image input `[B, S, C]` (the
        image stream normed and modulated by that block's img_mod shift and scale), a shard of
        the tokens (True)."""
        first = self.double_blocks[0]
        shift, scale = call_with_weights_on(s.vec.device, first.img_mod, s.vec)[:2]
        return modulate(layer_norm(s.img, first.eps), shift, scale), True


@dataclass(frozen=True)
class Stream:
    """The DiT between its stages: image stream img `[B, S, C]` (S a shard), text stream txt
    `[B, L, C]`, vec `[B, C]`, RoPE cos/sin `[S, D]` on the device, valid text lengths `[B]` (host)."""

    img: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    txt_lens: torch.Tensor


__all__ = ["HunyuanVideoDiT", "patchify", "unpatchify"]
