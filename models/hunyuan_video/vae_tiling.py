"""Tiled decoding and encoding with the release's cross-fade, for any causal video VAE.

The functions take the per-tile map as a callable, so they know nothing about the network and can
be reused (a distributed decode can run the same plan with tiles spread over ranks).

Plan (the release's): tiles start every `stride` along an axis, at every start < size, so edge
tiles may be short. A tile is cross-faded into its already-blended upper, then left, then previous
(in time) neighbour over the overlap, and contributes its leading `stride` part (scaled to the
output). Tiling is inexact by nature: every tile has its own GroupNorm statistics and borders.

Temporal tiles hold tile+1 input frames. A causal VAE maps its first input frame to one output
frame on its own; that frame repeats the previous tile's last overlapped frame, so every tile but
the first drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TilingConfig:
    """Tile sizes and strides, in latent units, for both decode and encode.

    Decode: spatial tiles of `spatial_tile` x `spatial_tile` latents start every `spatial_stride`
    and cross-fade over (tile - stride) x spatial ratio pixels; temporal tiles of
    `temporal_tile` + 1 latent frames start every `temporal_stride` and cross-fade over
    (tile - stride) x time ratio frames. Encode uses the same tiles in pixels / frames (x 8, x 4).
    An axis is tiled only when the input exceeds its tile (the release's rule).
    """

    spatial_tile: int = 32
    spatial_stride: int = 24
    temporal_tile: int = 16
    temporal_stride: int = 12
    spatial: bool = True
    temporal: bool = True

    def __post_init__(self) -> None:
        for axis in ("spatial", "temporal"):
            tile, stride = getattr(self, f"{axis}_tile"), getattr(self, f"{axis}_stride")
            if not 1 <= stride <= tile:
                raise ValueError(
                    f"TilingConfig: {axis}_stride must be in 1..{axis}_tile "
                    f"(got tile {tile}, stride {stride}); a larger stride would leave gaps"
                )


# The release's defaults: 32-latent (256 px) tiles, overlap 0.25; 16+1 latent frames, stride 12.
RELEASE_TILING = TilingConfig()
# Low-memory tiles of 17x16x16 latents (65 frames x 128 x 128 px), same 0.25 overlap.
SMALL_TILING = TilingConfig(spatial_tile=16, spatial_stride=12)
TILING_PRESETS = {"release": RELEASE_TILING, "small": SMALL_TILING}


def _exact(n: int, scale: Fraction) -> int:
    value = n * scale
    if value.denominator != 1:
        raise ValueError(f"tile geometry {n} x {scale} is not a whole number of output elements")
    return int(value)


def blend_(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first n slices of `cur` along `dim`, in place, from the last n of `prev`.

    n = min(extent, both sizes); cur[y] = prev[-n + y] * (1 - y/n) + cur[y] * (y/n), y = 0..n-1
    (the release's rule: the weights of the two tiles sum to 1 at every position). Returns `cur`.
    """
    n = min(extent, prev.shape[dim], cur.shape[dim])
    if n == 0:
        return cur
    shape = [1] * cur.ndim
    shape[dim] = n
    acc = torch.promote_types(cur.dtype, torch.float32)  # fp16/bf16 tiles blend in fp32
    w = (torch.arange(n, device=cur.device, dtype=acc) / n).view(shape)
    head = cur.narrow(dim, 0, n)
    tail = prev.narrow(dim, prev.shape[dim] - n, n)
    head.copy_(tail.to(acc) * (1 - w) + head.to(acc) * w)
    return cur


def spatial_tiled(fn: TileFn, x: torch.Tensor, tile: int, stride: int, scale: Fraction) -> torch.Tensor:
    """Apply `fn` to `tile` x `tile` windows of x in H and W and stitch the results.

    x: `[B, C, T, H, W]`; fn maps `[B, C, T, h, w]` to `[B, C', T', h*scale, w*scale]`.
    Returns `[B, C', T', H*scale, W*scale]`. Only the previous row of tiles is kept in memory.
    """
    height, width = x.shape[-2:]
    blend, keep = _exact(tile - stride, scale), _exact(stride, scale)
    out, prev_row = None, []
    for i in range(0, height, stride):
        row = []
        for col, j in enumerate(range(0, width, stride)):
            y = fn(x[..., i : i + tile, j : j + tile])
            if prev_row:
                blend_(prev_row[col], y, blend, dim=-2)
            if row:
                blend_(row[-1], y, blend, dim=-1)
            row.append(y)
            if out is None:
                out = y.new_empty(*y.shape[:-2], _exact(height, scale), _exact(width, scale))
            kept = y[..., :keep, :keep]
            oi, oj = _exact(i, scale), _exact(j, scale)
            out[..., oi : oi + kept.shape[-2], oj : oj + kept.shape[-1]] = kept
        prev_row = row
    return out


def temporal_tiled(fn: TileFn, x: torch.Tensor, tile: int, stride: int, scale: Fraction) -> torch.Tensor:
    """Apply a causal `fn` to windows of tile+1 frames of x and stitch them in time.

    x: `[B, C, T, H, W]` (T = 1 + k/scale); fn maps n frames to 1 + (n-1)*scale frames.
    Returns `[B, C', 1 + (T-1)*scale, H', W']`.
    """
    frames = x.shape[2]
    blend, keep = _exact(tile - stride, scale), _exact(stride, scale)
    out, prev = None, None
    for i in range(0, frames, stride):
        window = x[:, :, i : i + tile + 1]
        if i > 0 and _exact(window.shape[2] - 1, scale) == 0:
            continue  # a one-frame window adds nothing once its duplicate first frame is dropped
        y = fn(window)
        if out is None:
            out = y.new_empty(*y.shape[:2], 1 + _exact(frames - 1, scale), *y.shape[3:])
        if i == 0:
            out[:, :, : keep + 1] = y[:, :, : keep + 1]
        else:
            y = blend_(prev, y[:, :, 1:], blend, dim=2)
            start = 1 + _exact(i, scale)
            kept = y[:, :, :keep]
            out[:, :, start : start + kept.shape[2]] = kept
        prev = y
    return out


def _tiled(
    fn: TileFn, x: torch.Tensor, cfg: TilingConfig, units: tuple[int, int], scales: tuple[Fraction, Fraction]
):
    """Temporal tiling outside, spatial tiling inside each temporal tile (the release's order)."""
    t_unit, s_unit = units
    t_scale, s_scale = scales
    s_tile, s_stride = cfg.spatial_tile * s_unit, cfg.spatial_stride * s_unit

    def per_time_tile(xt: torch.Tensor) -> torch.Tensor:
        if cfg.spatial and max(xt.shape[-2:]) > s_tile:
            return spatial_tiled(fn, xt, s_tile, s_stride, s_scale)
        return fn(xt)

    t_tile, t_stride = cfg.temporal_tile * t_unit, cfg.temporal_stride * t_unit
    if cfg.temporal and x.shape[2] > t_tile:
        return temporal_tiled(per_time_tile, x, t_tile, t_stride, t_scale)
    return per_time_tile(x)


def tiled_decode(
    decode_fn: TileFn, z: torch.Tensor, cfg: TilingConfig, time_ratio: int, spatial_ratio: int
) -> torch.Tensor:
    """Latents `[B, C, T, h, w]` -> video `[B, C', time_ratio*(T-1)+1, h*ratio, w*ratio]`, tile by tile."""
    return _tiled(decode_fn, z, cfg, (1, 1), (Fraction(time_ratio), Fraction(spatial_ratio)))


def tiled_encode(
    encode_fn: TileFn, x: torch.Tensor, cfg: TilingConfig, time_ratio: int, spatial_ratio: int
) -> torch.Tensor:
    """Video `[B, C, F, H, W]` -> moments `[B, C', (F-1)/time_ratio+1, H/ratio, W/ratio]`, tile by tile."""
    return _tiled(
        encode_fn, x, cfg, (time_ratio, spatial_ratio), (Fraction(1, time_ratio), Fraction(1, spatial_ratio))
    )
