"""Small building blocks of the HunyuanVideo DiT (names follow the release's state-dict keys)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x `[B, S, C]`, shift/scale `[B, C]`: x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x `[B, S, C]` scaled by a per-item gate `[B, C]`."""
    return x * g.unsqueeze(1)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine weights (the blocks' norms have no keys in the release)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid `[B, dim]` of t `[B]`: cos half first, then sin half (the release's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a weight; statistics in fp32 (as the release)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class TimestepEmbedder(nn.Module):
    """256-dim sinusoid -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear with the release's key names in_layer/out_layer."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """Linear -> SiLU -> Linear with keys linear_1/linear_2 (the refiner's c_embedder)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    """SiLU(vec) -> Linear(hidden, factor*hidden), chunked by the caller (key `.linear`)."""

    def __init__(self, hidden: int, factor: int):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden, factor * hidden)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.factor, dim=-1)


class PatchEmbed(nn.Module):
    """The release's `img_in` Conv3d (kernel = stride = patch) applied to patchified tokens.

    The weight keeps the Conv3d shape `[hidden, C, pt, ph, pw]` so checkpoint keys load as they
    are; on tokens `[B, S, C*pt*ph*pw]` (C outermost) the conv is exactly one linear map.
    """

    def __init__(self, in_channels: int, patch_size: tuple[int, int, int], hidden: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)
