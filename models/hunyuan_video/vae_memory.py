"""Peak GPU memory of the release VAE's fp16 decode, from shapes (measured on an H200).

The planner (``launcher/memory_plan.py``) reaches this through the family's ``VaeSpec``.
"""

from __future__ import annotations

import math

from .vae_tiling import TILING_PRESETS, TilingConfig


# Peaks of the release VAE's decode above the memory held before it (weights, latents), measured
# by scripts/bench_vae_memory.py on an H200 in fp16: (latent T, h, w), tiling, GiB. The small
# tiles were reported as a range, 3.6-4.2 GB, assigned here to the two sizes in order; "GB" is
# read as GiB (2^30), the larger and so safer reading.
VAE_DECODE_MEASURED_GIB = (
    ((9, 32, 32), "off", 5.4),
    ((17, 40, 40), "off", 16.5),
    ((33, 90, 160), "release", 12.2),
    ((33, 68, 120), "release", 11.6),
    ((33, 68, 120), "small", 3.6),
    ((33, 90, 160), "small", 4.2),
)
# decode = VAE_BYTES_PER_TILE_VOXEL x (latent voxels of the largest tile)
#        + VAE_BYTES_PER_LATENT_VOXEL x (latent voxels of the whole video)
# Whole-video term: the two release-tiling sizes share a tile and differ by 0.6 GiB over 205,920
# latent voxels: 3,129 B per voxel = 12.2 B per output pixel-frame, i.e. two fp16 RGB copies of
# the video (the output and the temporal tiles being stitched). Tile term: the largest of
# (peak - whole-video term) / tile voxels over the six points, 626-695 kB (small tiles cost most
# per voxel), rounded up: the model never falls below a measurement and is at most 12% above one.
VAE_BYTES_PER_TILE_VOXEL = 695_000
VAE_BYTES_PER_LATENT_VOXEL = 3_130
VAE_LARGEST_MEASURED_UNTILED = 17 * 40 * 40  # beyond this, "off" is an extrapolation


def vae_tiling_config(mode: str) -> TilingConfig | None:
    """A tiling name (release, small, off; auto = release) -> the tiling ``family.decode`` runs."""
    mode = "release" if mode == "auto" else mode
    return None if mode == "off" else TILING_PRESETS[mode]


def vae_tile(latent: tuple[int, int, int], tiling: TilingConfig | None) -> tuple[int, int, int]:
    """(T, h, w) of the largest tile the decode runs, by the rules of ``vae_tiling._tiled``: time
    is tiled in windows of tile + 1 latent frames when T > tile; space in tile x tile windows
    (clipped to h, w) when max(h, w) > tile."""
    t, h, w = latent
    if tiling is None:
        return latent
    if tiling.temporal and t > tiling.temporal_tile:
        t = tiling.temporal_tile + 1
    if tiling.spatial and max(h, w) > tiling.spatial_tile:
        h, w = min(h, tiling.spatial_tile), min(w, tiling.spatial_tile)
    return t, h, w


def vae_decode_bytes(latent: tuple[int, int, int], tiling: TilingConfig | None) -> int:
    """Peak bytes of the release VAE's fp16 decode of ``latent`` (T, h, w), weights excluded
    (see the model above ``VAE_BYTES_PER_TILE_VOXEL``)."""
    tile = math.prod(vae_tile(latent, tiling))
    return VAE_BYTES_PER_TILE_VOXEL * tile + VAE_BYTES_PER_LATENT_VOXEL * math.prod(latent)


def tile_shape(latent: tuple[int, int, int], mode: str) -> tuple[int, int, int]:
    return vae_tile(latent, vae_tiling_config(mode))


def decode_bytes(latent: tuple[int, int, int], mode: str) -> int:
    return vae_decode_bytes(latent, vae_tiling_config(mode))
