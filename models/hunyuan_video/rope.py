"""3D rotary position embedding of HunyuanVideo.

Image tokens are the patchified latent flattened t-major, then h, then w. Each axis gets
`rope_axes_dim[i]` of the head dim; positions are integers 0..n-1; frequencies
1/theta^(arange(0, d, 2)/d); cos/sin are repeat-interleaved x2 so that adjacent channel pairs
(2i, 2i+1) rotate together. The table for all tokens is `[S, head_dim]`; a sequence-parallel
shard takes the rows of its own tokens.
"""

from __future__ import annotations

import torch


def _axis_table(dim: int, n: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[n, dim]` for positions 0..n-1 along one axis (fp64 for exact tables)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
    angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs)  # [n, dim/2]
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_table(
    grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[T*H*W, sum(axes_dim)]` (fp32) for a token grid (T, H, W), t-major order."""
    cos_parts, sin_parts = [], []
    for axis, (n, dim) in enumerate(zip(grid, axes_dim)):
        cos, sin = _axis_table(dim, n, theta)  # [n, dim]
        shape = [1, 1, 1, dim]
        shape[axis] = n
        cos_parts.append(cos.view(shape).expand(*grid, dim))
        sin_parts.append(sin.view(shape).expand(*grid, dim))
    head_dim = sum(axes_dim)
    cos = torch.cat(cos_parts, dim=-1).reshape(-1, head_dim)
    sin = torch.cat(sin_parts, dim=-1).reshape(-1, head_dim)
    return cos.float(), sin.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs: (a, b) -> (-b, a) over the last dim."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, S, H, D]`, cos/sin `[S, D]` -> rotated x in x's dtype (math in fp32)."""
    xf = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
