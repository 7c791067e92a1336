"""Single-process denoising from seeded noise to latents, on tokens.

The loop works on patchified tokens and their RoPE rows; it never needs the whole video, so a
sequence-parallel caller runs this same loop on its shard (the model carries the parallel
attention). Noise is drawn on the CPU from a seeded generator, then moved: the same seed gives the
same noise on every platform and every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .scheduler import FlowMatchEuler


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompt(s): txt `[B, L, text_dim]`, mask `[B, L]` (valid first), pooled `[B, P]`."""

    txt: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device) -> "TextConditioning":
        return TextConditioning(self.txt.to(device), self.mask.to(device), self.pooled.to(device))


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 standard normal noise `shape` from a CPU generator seeded with `seed`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _velocity(model, x, cos, sin, cond: TextConditioning, t, guidance) -> torch.Tensor:
    b = x.shape[0]
    return model(
        x, cos, sin, cond.txt, cond.mask, t.expand(b), cond.pooled, None if guidance is None else guidance.expand(b)
    ).float()


@torch.inference_mode()
def denoise_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    cond: TextConditioning,
    scheduler: FlowMatchEuler,
    *,
    embedded_guidance: float | None = 6.0,
    negative: TextConditioning | None = None,
    cfg_scale: float = 1.0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run every step on noise tokens `[B, S, F]` (fp32; S may be a shard) -> denoised tokens.

    `embedded_guidance` is the distilled guidance scale (passed to the model x 1000); classic CFG
    with a negative prompt runs when `negative` is given and `cfg_scale` != 1. `on_step(i, x)` is
    called after every step (progress bars, NaN checks).
    """
    x = tokens.float()
    device = x.device
    guidance = None if embedded_guidance is None else torch.tensor([embedded_guidance * 1000.0], device=device)
    cos, sin = rope
    use_cfg = negative is not None and cfg_scale != 1.0
    for i, t in enumerate(scheduler.timesteps().to(device)):
        v = _velocity(model, x, cos, sin, cond, t[None], guidance)
        if use_cfg:
            v_neg = _velocity(model, x, cos, sin, negative, t[None], guidance)
            v = v_neg + cfg_scale * (v - v_neg)
        x = scheduler.step(x, v, i)
        if on_step is not None:
            on_step(i, x)
    return x
