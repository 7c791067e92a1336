"""Flow-matching Euler sampling schedule (rectified flow, as HunyuanVideo).

sigmas = linspace(1, 0, steps+1), shifted as s*t / (1 + (s-1)*t); the model sees
timestep = sigma * 1000 and predicts a velocity v; x_next = x + v * (sigma_next - sigma).
The update is elementwise, so a sequence-parallel rank can step only its own token shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class FlowMatchEuler:
    steps: int
    shift: float = 7.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")

    def sigmas(self) -> torch.Tensor:
        """`[steps + 1]` float64, from 1 down to 0."""
        t = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timesteps(self) -> torch.Tensor:
        """`[steps]` float32 timesteps handed to the model (sigma x 1000)."""
        return (self.sigmas()[:-1] * 1000).float()

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step from sigma_i to sigma_{i+1}; x and the result in x's dtype (fp32)."""
        s = self.sigmas()
        return x + v.to(x.dtype) * float(s[i + 1] - s[i])
