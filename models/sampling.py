"""Single-process denoising from seeded noise to latents, on tokens.

The loop works on patchified tokens and their RoPE rows; it never needs the whole video, so a
sequence-parallel caller runs this same loop on its shard (the model carries the parallel
attention). Noise is drawn on the CPU from a seeded generator, then moved: the same seed gives the
same noise on every platform and every rank (or, asked for, as the release draws it:
`initial_noise(source="release")`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .scheduler import FlowMatchEuler
from .step_cache import StepCache


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompt(s): txt `[B, L, text_dim]`, mask `[B, L]` (valid first), pooled `[B, P]`."""

    txt: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device) -> "TextConditioning":
        return TextConditioning(self.txt.to(device), self.mask.to(device), self.pooled.to(device))


NOISE_SOURCES = ("cpu", "release")


def initial_noise(
    shape: tuple[int, ...],
    seed: int,
    *,
    source: str = "cpu",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Standard normal noise `shape` for `seed`, returned as fp32 on the CPU.

    "cpu" (the default): a CPU generator in fp32, the same numbers on every platform and every
    rank. "release": drawn as the HunyuanVideo release draws it, so a seed reproduces a release
    video: a generator on `device` (the release's `torch.Generator(device)`), in `dtype` (the
    release uses its text states' dtype, fp16 by default), straight into that dtype. On a GPU
    this is CUDA's Philox stream, which the CPU generator does not reproduce; every rank draws
    the whole tensor and keeps its shard, so all ranks agree.
    """
    if source not in NOISE_SOURCES:
        raise ValueError(f"noise source {source!r}; valid: {', '.join(NOISE_SOURCES)}")
    if source == "cpu":
        device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).float().cpu()


def embedded_guidance_tensor(scale: float, batch: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The distilled-guidance input `[B]` exactly as the release builds it for a DiT in `dtype`:
    the scale made an fp32 tensor, cast to `dtype`, then multiplied by 1000 in `dtype`. In bf16
    the product rounds (6.0 -> 6016, 7.0 -> 7008, 5.0 -> 4992) and the checkpoint was distilled
    with those values, so computing 6000 in fp32 would embed another guidance (the embedder's
    sinusoid has frequencies up to 1: 16 apart changes about half of it)."""
    return torch.full((batch,), scale, dtype=torch.float32, device=device).to(dtype) * 1000.0


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a DiT computes its embeddings in: its `dtype` attribute, else its first
    floating-point parameter's."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_velocity(
    model: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    cond: TextConditioning,
    embedded_guidance: float | None,
) -> Velocity:
    """`v(x, t)`: the model's velocity for tokens x `[B, S, F]` at timestep t `[1]` (fp32 out)."""
    cos, sin = rope
    dtype = model_dtype(model)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        guidance = None
        if embedded_guidance is not None:
            guidance = embedded_guidance_tensor(embedded_guidance, b, dtype, x.device)
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


def cached_velocities(
    model: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    conds: list[TextConditioning],
    embedded_guidance: float | None,
    cache: StepCache,
) -> Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """`v(x, t)` -> one velocity per branch of ``conds`` (fp32), through the DiT's stages with the
    step cache deciding, once for all branches, whether the blocks run (models/step_cache.py)."""
    cos, sin = rope
    dtype = model_dtype(model)

    def velocities(x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        guidance = None
        if embedded_guidance is not None:
            guidance = embedded_guidance_tensor(embedded_guidance, b, dtype, x.device)
        states = [model.enter(x, cos, sin, c.txt, c.mask, t.expand(b), c.pooled, guidance) for c in conds]
        return [model.leave(s).float() for s in cache.run(model, states)]

    return velocities


def guided_velocity(
    model: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    cond: TextConditioning,
    *,
    embedded_guidance: float | None,
    negative: TextConditioning | None = None,
    cfg_scale: float = 1.0,
    cache: StepCache | None = None,
) -> Velocity:
    """The velocity with embedded guidance, plus classic CFG (conditional and negative pass one
    after the other) when `negative` is given and `cfg_scale` != 1; through the step `cache` when
    one is given (one decision per step for both passes)."""
    guided = negative is not None and cfg_scale != 1.0
    if cache is not None:
        both = cached_velocities(model, rope, [cond, negative] if guided else [cond], embedded_guidance, cache)
        if not guided:
            return lambda x, t: both(x, t)[0]
        return lambda x, t: classifier_free(*both(x, t), cfg_scale)
    v_cond = model_velocity(model, rope, cond, embedded_guidance)
    if not guided:
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
    cache: StepCache | None = None,
) -> torch.Tensor:
    """Run every step on noise tokens `[B, S, F]` (fp32; S may be a shard) -> denoised tokens.

    `embedded_guidance` is the distilled guidance scale (passed to the model x 1000, as the
    release rounds it: `embedded_guidance_tensor`); see
    `guided_velocity` for classic CFG. `on_step(i, x)` runs after every step (progress, NaN checks).
    `cache`: a fresh `StepCache` for this video, or None to compute every step.
    """
    velocity = guided_velocity(
        model, rope, cond, embedded_guidance=embedded_guidance, negative=negative, cfg_scale=cfg_scale, cache=cache
    )
    return euler_loop(tokens, velocity, scheduler, on_step)
