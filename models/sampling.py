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


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_velocity(
    model: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    cond: TextConditioning,
    embedded_guidance: float | None,
) -> Velocity:
    """`v(x, t)`: the model's velocity for tokens x `[B, S, F]` at timestep t `[1]` (fp32 out)."""
    cos, sin = rope

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        guidance = None
        if embedded_guidance is not None:
            guidance = torch.full((b,), embedded_guidance * 1000.0, device=x.device)
        return model(x, cos, sin, cond.txt, cond.mask, t.expand(b), cond.pooled, guidance).float()

    return velocity


def classifier_free(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classic CFG: v_neg + scale * (v_cond - v_neg)."""
    return v_neg + scale * (v_cond - v_neg)


def euler_loop(
    tokens: torch.Tensor,
    velocity: Velocity,
    scheduler: FlowMatchEuler,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Every step from noise tokens `[B, S, F]` (S may be a shard) to denoised tokens (fp32)."""
    x = tokens.float()
    for i, t in enumerate(scheduler.timesteps().to(x.device)):
        x = scheduler.step(x, velocity(x, t[None]), i)
        if on_step is not None:
            on_step(i, x)
    return x


def guided_velocity(
    model: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    cond: TextConditioning,
    *,
    embedded_guidance: float | None,
    negative: TextConditioning | None = None,
    cfg_scale: float = 1.0,
) -> Velocity:
    """The velocity with embedded guidance, plus classic CFG (conditional and negative pass one
    after the other) when `negative` is given and `cfg_scale` != 1."""
    v_cond = model_velocity(model, rope, cond, embedded_guidance)
    if negative is None or cfg_scale == 1.0:
        return v_cond
    v_neg = model_velocity(model, rope, negative, embedded_guidance)
    return lambda x, t: classifier_free(v_cond(x, t), v_neg(x, t), cfg_scale)


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

    `embedded_guidance` is the distilled guidance scale (passed to the model x 1000); see
    `guided_velocity` for classic CFG. `on_step(i, x)` runs after every step (progress, NaN checks).
    """
    velocity = guided_velocity(
        model, rope, cond, embedded_guidance=embedded_guidance, negative=negative, cfg_scale=cfg_scale
    )
    return euler_loop(tokens, velocity, scheduler, on_step)
