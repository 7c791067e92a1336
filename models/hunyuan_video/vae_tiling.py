"""HunyuanVideo's tiled decoding and encoding: the release's tile sizes and its cross-fade.

The plan and the stitch are ``models.vae_tiles`` (shared by every family, so that a distributed
decode can run the same tiles on several ranks); this module names the release's tilings and maps
them to grids. Tiling is inexact by nature: every tile has its own GroupNorm statistics and borders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..vae_tiles import Axis, TileGrid, blend_, tiled  # noqa: F401 - blend_ is part of this module's API

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


def spatial_tiled(fn: TileFn, x: torch.Tensor, tile: int, stride: int, scale: Fraction) -> torch.Tensor:
    """Apply `fn` to `tile` x `tile` windows of x `[B, C, T, H, W]` in H and W and stitch the
    results: `[B, C', T', H*scale, W*scale]`. Only the previous row of tiles is kept in memory."""
    return tiled(fn, x, TileGrid(tuple(x.shape[2:]), None, Axis(tile, stride, scale)))


def temporal_tiled(fn: TileFn, x: torch.Tensor, tile: int, stride: int, scale: Fraction) -> torch.Tensor:
    """Apply a causal `fn` (n frames -> 1 + (n-1)*scale) to windows of tile+1 frames of x
    `[B, C, T, H, W]` and stitch them in time: `[B, C', 1 + (T-1)*scale, H', W']`."""
    return tiled(fn, x, TileGrid(tuple(x.shape[2:]), Axis(tile, stride, scale), None))


def grid(shape: tuple[int, int, int], cfg: TilingConfig, units: tuple[int, int],
         scales: tuple[Fraction, Fraction]) -> TileGrid:
    """The release's tiles of an input (T, H, W): an axis is tiled only when the input exceeds
    its tile; `units` input elements per latent (time, space), `scales` output per input."""
    (t_unit, s_unit), (t_scale, s_scale) = units, scales
    frames, height, width = shape
    s_tile, t_tile = cfg.spatial_tile * s_unit, cfg.temporal_tile * t_unit
    space = Axis(s_tile, cfg.spatial_stride * s_unit, s_scale) if cfg.spatial and max(height, width) > s_tile else None
    time = Axis(t_tile, cfg.temporal_stride * t_unit, t_scale) if cfg.temporal and frames > t_tile else None
    return TileGrid(shape, time, space)


def decode_grid(shape: tuple[int, int, int], cfg: TilingConfig, time_ratio: int, spatial_ratio: int) -> TileGrid:
    """The tiles of a decode of latents (T, h, w)."""
    return grid(shape, cfg, (1, 1), (Fraction(time_ratio), Fraction(spatial_ratio)))


def encode_grid(shape: tuple[int, int, int], cfg: TilingConfig, time_ratio: int, spatial_ratio: int) -> TileGrid:
    """The tiles of an encode of a video (F, H, W): the decode's tiles in frames and pixels."""
    return grid(shape, cfg, (time_ratio, spatial_ratio), (Fraction(1, time_ratio), Fraction(1, spatial_ratio)))


def tiled_decode(
    decode_fn: TileFn, z: torch.Tensor, cfg: TilingConfig, time_ratio: int, spatial_ratio: int
) -> torch.Tensor:
    """Latents `[B, C, T, h, w]` -> video `[B, C', time_ratio*(T-1)+1, h*ratio, w*ratio]`, tile by tile."""
    return tiled(decode_fn, z, decode_grid(tuple(z.shape[2:]), cfg, time_ratio, spatial_ratio))


def tiled_encode(
    encode_fn: TileFn, x: torch.Tensor, cfg: TilingConfig, time_ratio: int, spatial_ratio: int
) -> torch.Tensor:
    """Video `[B, C, F, H, W]` -> moments `[B, C', (F-1)/time_ratio+1, H/ratio, W/ratio]`, tile by tile."""
    return tiled(encode_fn, x, encode_grid(tuple(x.shape[2:]), cfg, time_ratio, spatial_ratio))
