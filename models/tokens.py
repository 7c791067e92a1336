"""What every family's DiT shares at its boundary: patchified tokens and building a DiT.

Tokens are t-major (then h, then w) with the channels outermost within a token, the layout the
seam's contract names (``models/family.py``), so a sequence shard is a slice of them.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .weights import init_random_


def patchify(latents: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """`[B, C, T, H, W]` -> `[B, T/pt * H/ph * W/pw, C*pt*ph*pw]` (t-major tokens, C outermost)."""
    pt, ph, pw = patch_size
    return rearrange(latents, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: `[B, T'*H'*W', C*pt*ph*pw]` -> `[B, C, T'*pt, H'*ph, W'*pw]`."""
    (t, h, w), (pt, ph, pw) = grid, patch_size
    return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def build_dit(cls: type[nn.Module], cfg, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """``cls(cfg)`` in eval mode without gradients; on "meta" shapes only, else seeded random
    weights (``init_random_``: the same on every rank)."""
    with torch.device("meta"):
        model = cls(cfg)
    if dtype is not None:
        model.to(dtype)
    device = torch.device(device)
    if device.type != "meta":
        model.to_empty(device=device)
        init_random_(model, seed)
    return model.eval().requires_grad_(False)
