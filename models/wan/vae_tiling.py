"""Spatially tiled decoding of the Wan VAE, and the decode's memory model for the planner.

Tiling follows diffusers' `AutoencoderKLWan.tiled_decode`: latent tiles of `tile` x `tile` start
every `stride` latents in H and W (at every start < size, so edge tiles may be short); each is
decoded on its own by the chunked causal decode (a fresh frame cache per tile); a tile is
cross-faded into its already-blended upper, then left neighbour over (tile - stride) x 8 pixels
and contributes its leading stride x 8 pixels. Time is never tiled: the chunked decode already
holds one latent frame's activations at a time. Tiles differ from the whole decode near their
borders (zero padding, per-tile attention in the middle block), which the blending hides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..vae_tiles import Axis, TileGrid, tiled
from .vae import VAE_PRESETS, WanVAE, WanVaeConfig


@dataclass(frozen=True, kw_only=True)
class VaeTiling:
    """Square spatial tiles in latent units (x 8 for pixels); an axis longer than `tile` is tiled."""

    tile: int = 32
    stride: int = 24

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.tile:
            raise ValueError(f"VaeTiling: stride must be in 1..tile (got tile {self.tile}, stride {self.stride})")

    def pixels(self, ratio: int = 8) -> tuple[int, int]:
        """(tile, stride) in pixels: diffusers' tile_sample_min_* and tile_sample_stride_*."""
        return self.tile * ratio, self.stride * ratio


# "tiles" (the default): diffusers' 256-pixel tiles every 192 pixels; "small": half of that.
TILING_PRESETS = {"tiles": VaeTiling(tile=32, stride=24), "small": VaeTiling(tile=16, stride=12)}
DEFAULT_TILING = next(iter(TILING_PRESETS))
TILING_NAMES = ("off", "auto", *TILING_PRESETS)


def tiling_config(name: str | VaeTiling | None) -> VaeTiling | None:
    """A tiling name ("off", "auto" = the default, or a TILING_PRESETS key) -> its VaeTiling."""
    if name is None or isinstance(name, VaeTiling):
        return name
    if name not in TILING_NAMES:
        raise ValueError(f"unknown VAE tiling {name!r}; valid: {', '.join(TILING_NAMES)}")
    return None if name == "off" else TILING_PRESETS[DEFAULT_TILING if name == "auto" else name]


def decode_grid(shape: tuple[int, int, int], tiling: VaeTiling | str | None, ratio: int = 8) -> TileGrid:
    """The tiles of a decode of latents (T, h, w): one window when the tiling is off or the
    latents fit in one tile, else diffusers' spatial tiles (time is never tiled)."""
    cfg = tiling_config(tiling)
    if cfg is None or max(shape[1:]) <= cfg.tile:
        return TileGrid(shape, None, None)
    return TileGrid(shape, None, Axis(cfg.tile, cfg.stride, Fraction(ratio)))


def tiled_decode(vae: WanVAE, z: torch.Tensor, tiling: VaeTiling | str) -> torch.Tensor:
    """Raw (denormalised) latents `[B, z, T, h, w]` -> unclamped video `[B, 3, 4(T-1)+1, 8h, 8w]`
    in the VAE's dtype, tile by tile. Only the previous row of decoded tiles is kept."""
    return tiled(vae.decode_raw, z, decode_grid(tuple(z.shape[2:]), tiling, vae.config.spatial_compression))


# ---------------------------------------------------------------------------------------------
# Memory model of the decode, for the planner: an UNCALIBRATED analytical estimate from shapes
# (no fit to a benchmark), in fp32 unless told otherwise.
#
# Per tile, the decode holds one chunk's activations (one latent frame in, 4 video frames out),
# the frame cache (2 frames of every causal conv's input, the largest term on big tiles) and,
# should SDPA fall back to its math kernel, the middle attention's scores. The widest activation
# of the release decoder is the last up-sampling's input after its nearest x2 (4 frames x 192
# channels x H x W, twice the 96-channel tensors of the last stage). Counted in a last-stage
# residual block's conv: its input (kept for the skip), the normalised copy, the conv input with
# 2 frames of context in front (6/4 of a tensor), the conv output and the new cache clone (1/2):
# 5 tensors of 96 channels = 2.5 widest. That count leaves out the convolution's workspace and
# allocator rounding: a one-off check on an H200 (fp32 and bf16; 60x104 and 90x160 latents;
# untiled, "tiles", "small") put the measured peak at 3.7-4.5 widest above the other terms, so
# ACTIVATION_FACTOR is 5. The model then read 1.06-1.18x the measured peaks; it is still a
# rule of thumb, not a calibrated fit.
ACTIVATION_FACTOR = 5.0


def _decoder_widths(cfg: WanVaeConfig, h: int, w: int) -> tuple[int, int]:
    """(widest activation, frame-cache size), in elements per batch item, of one steady-state
    chunk of the decoder on an h x w latent (its frame counts and resolutions walked stage by stage)."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal = cfg.temporal_downsample[::-1]
    frames, area = 1, h * w
    widest, cache = cfg.z_dim * area, 2 * cfg.z_dim * area  # conv1's input and its 2 cached frames
    for c in (dims[0],) * 4:  # the middle: two residual blocks of two convs each
        cache += 2 * c * area
    widest = max(widest, dims[0] * area)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin if i == 0 else cin // 2
        for j in range(cfg.num_res_blocks + 1):
            cache += 2 * ((cin if j == 0 else cout) + cout) * area
        widest = max(widest, cout * frames * area)
        if i == len(cfg.dim_mult) - 1:
            break
        if temporal[i]:
            cache += 2 * cout * area
            widest = max(widest, 2 * cout * frames * area)  # the time conv's 2C channels
            frames *= 2
        area *= 4
        widest = max(widest, cout * frames * area)  # nearest x2 before the halving conv
    cache += 2 * dims[-1] * area  # the head conv
    return widest, cache


def tile_shape(latent: tuple[int, int, int], tiling: str) -> tuple[int, int, int]:
    """(T, h, w) of the largest tile `tiled_decode` runs on a `latent` (T, h, w)."""
    cfg = tiling_config(tiling)
    t, h, w = latent
    if cfg is None or max(h, w) <= cfg.tile:
        return latent
    return t, min(h, cfg.tile), min(w, cfg.tile)


def decode_bytes(
    latent: tuple[int, int, int],
    tiling: str,
    *,
    bytes_per_element: int = 4,
    config: WanVaeConfig | str = "wan2.1",
) -> int:
    """Peak bytes of decoding a `latent` (T, h, w), weights excluded (uncalibrated; see above).

    = ACTIVATION_FACTOR x widest chunk activation + frame cache + attention scores (2 (hw)^2 of
    one tile's frame: scores and softmax, should SDPA fall back to its math kernel)
    + the output video + the decoded tiles of two rows held for blending (tiled only).
    """
    cfg = VAE_PRESETS[config] if isinstance(config, str) else config
    t, h, w = latent
    _, th, tw = tile_shape(latent, tiling)
    rs, frames = cfg.spatial_compression, 1 + cfg.time_compression * (t - 1)
    widest, cache = _decoder_widths(cfg, th, tw)
    per_tile = ACTIVATION_FACTOR * widest + cache + 2 * (th * tw) ** 2
    video = cfg.out_channels * frames * h * w * rs * rs
    held = 0
    if (th, tw) != (h, w):  # the decoded tiles of the previous and the current row
        held = 2 * math.ceil(w / tiling_config(tiling).stride) * cfg.out_channels * frames * th * tw * rs * rs
    return int(bytes_per_element * (per_tile + video + held))
