"""Tiled VAE decode / encode: the plan and the blend exactly, and the real network where exactness holds.

With random weights, tiled and untiled decodes of arbitrary latents differ a lot at the seams
(the reference measured up to ~1.9), because each tile has its own GroupNorm statistics and
borders; such a comparison cannot tell a correct stitch from a wrong one. So the tests check:
- the blend weights and the tile plan exactly, with stand-in tile maps that are equivariant to
  shifts (any misplaced, dropped or doubled frame or pixel shows up as a large error);
- the real network on inputs for which tiling is exact in principle: constant in space (spatial
  tiling) or constant in time (temporal tiling), where every tile sees the same statistics;
- a single tile that covers everything equals the untiled decode bit for bit.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch

from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE
from models.hunyuan_video.vae_tiling import (
    RELEASE_TILING,
    SMALL_TILING,
    TilingConfig,
    blend_,
    spatial_tiled,
    temporal_tiled,
    tiled_decode,
    tiled_encode,
)

SMALL = TilingConfig(spatial_tile=4, spatial_stride=3, temporal_tile=4, temporal_stride=3)


def mock_decode(z: torch.Tensor) -> torch.Tensor:
    """A causal 4x8x8 'decoder' that is exactly shift-equivariant: latent 0 -> 1 frame, others -> 4."""
    frames = torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    return frames.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1) * 2 + 1


def mock_encode(x: torch.Tensor) -> torch.Tensor:
    """The matching 'encoder': frames 0, 4, 8, ... and every 8th pixel."""
    return x[:, :, ::4, ::8, ::8] * 3 - 1


def test_presets():
    assert (RELEASE_TILING.spatial_tile, RELEASE_TILING.spatial_stride) == (32, 24)  # 256 px, 192 px stride
    assert (RELEASE_TILING.temporal_tile, RELEASE_TILING.temporal_stride) == (16, 12)  # 17 latents, 65 frames
    assert (SMALL_TILING.spatial_tile, SMALL_TILING.spatial_stride, SMALL_TILING.temporal_tile) == (
        16,
        12,
        16,
    )
    with pytest.raises(ValueError, match="spatial_stride"):
        TilingConfig(spatial_tile=8, spatial_stride=9)
    with pytest.raises(ValueError, match="temporal_stride"):
        TilingConfig(temporal_stride=0)


def test_blend_weights_are_the_release_ramp_and_sum_to_one():
    n, size = 4, 6
    prev, cur = torch.zeros(1, size), torch.ones(1, size)
    blend_(prev, cur, n, dim=-1)
    torch.testing.assert_close(cur[0], torch.tensor([0, 0.25, 0.5, 0.75, 1, 1]), rtol=0, atol=0)
    prev, cur = torch.ones(1, size), torch.zeros(1, size)
    blend_(prev, cur, n, dim=-1)
    torch.testing.assert_close(cur[0], torch.tensor([1, 0.75, 0.5, 0.25, 0, 0]), rtol=0, atol=0)
    # Equal neighbours stay equal: the two weights sum to one everywhere.
    prev, cur = torch.full((2, 3, 5), 0.7), torch.full((2, 3, 5), 0.7)
    torch.testing.assert_close(blend_(prev, cur, 8, dim=1), torch.full((2, 3, 5), 0.7))
    # The extent is capped by the shorter tile (n = 2), and the blend reads prev's trailing slices.
    prev, cur = torch.arange(5.0)[None], torch.zeros(1, 2)
    torch.testing.assert_close(blend_(prev, cur, 16, dim=-1)[0], torch.tensor([3.0, 4.0 * 0.5]))


@pytest.mark.parametrize("t", [1, 4, 5, 6, 7, 8, 10, 11])
@pytest.mark.parametrize("hw", [(3, 4), (4, 7), (10, 8)])
def test_tiled_decode_plan_is_exact_for_a_shift_equivariant_map(t, hw):
    z = torch.randn(1, 2, t, *hw)
    out = tiled_decode(mock_decode, z, SMALL, time_ratio=4, spatial_ratio=8)
    assert out.shape == (1, 2, 4 * t - 3, 8 * hw[0], 8 * hw[1])
    torch.testing.assert_close(out, mock_decode(z), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 17, 21, 33, 45])
def test_tiled_encode_plan_is_exact_for_a_shift_equivariant_map(frames):
    x = torch.randn(1, 2, frames, 80, 56)
    out = tiled_encode(mock_encode, x, SMALL, time_ratio=4, spatial_ratio=8)
    assert out.shape == (1, 2, (frames - 1) // 4 + 1, 10, 7)
    torch.testing.assert_close(out, mock_encode(x), rtol=1e-6, atol=1e-6)


def test_release_plan_frame_count_and_tile_calls():
    """T=20 latents at the release's tiles: windows at latents 0 and 12, 77 output frames."""
    seen = []

    def recording(z):
        seen.append(tuple(z.shape[2:]))
        return mock_decode(z)

    z = torch.randn(1, 1, 20, 40, 2)
    out = tiled_decode(recording, z, RELEASE_TILING, time_ratio=4, spatial_ratio=8)
    assert out.shape[2] == 77
    # Each 17- or 8-latent window is split in H into tiles at 0 (32 rows) and 24 (16 rows).
    assert seen == [(17, 32, 2), (17, 16, 2), (8, 32, 2), (8, 16, 2)]
    torch.testing.assert_close(out, mock_decode(z), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def vae() -> HunyuanVideoVAE:
    torch.manual_seed(0)
    return HunyuanVideoVAE(VAE_PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def vae64(vae) -> HunyuanVideoVAE:
    """float64 copy. Inputs constant along an axis make GroupNorm ill-conditioned (small variance
    next to the mean), which amplifies fp32 rounding differences between conv kernels chosen for
    different tile shapes to ~5e-4; in float64 the same comparisons agree to ~1e-12."""
    return copy.deepcopy(vae).double()


@pytest.mark.slow
def test_single_tile_equals_untiled_bitwise(vae):
    z = torch.randn(1, 16, 5, 3, 4)
    with torch.no_grad():
        full = vae.decode_tile(z)
        one_s = spatial_tiled(vae.decode_tile, z, tile=4, stride=4, scale=Fraction(8))
        one_t = temporal_tiled(vae.decode_tile, z, tile=4, stride=4, scale=Fraction(4))
    assert torch.equal(one_s, full) and torch.equal(one_t, full)
    # decode() with tiles no smaller than the input takes the untiled path.
    fits = TilingConfig(spatial_tile=4, spatial_stride=3, temporal_tile=5, temporal_stride=2)
    assert torch.equal(vae.decode(z, tiling=fits), vae.decode(z))


@pytest.mark.slow
def test_spatial_tiling_is_exact_on_spatially_constant_latents(vae64):
    # Varies in time and channels, constant in H and W: every spatial tile sees the same statistics.
    z = torch.randn(1, 16, 3, 1, 1, dtype=torch.float64).expand(1, 16, 3, 7, 5).contiguous()
    tiling = TilingConfig(spatial_tile=3, spatial_stride=2, temporal=False)
    tiled, full = vae64.decode(z, tiling=tiling, clamp=False), vae64.decode(z, clamp=False)
    assert tiled.shape == full.shape == (1, 3, 9, 56, 40)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_temporal_tiling_is_exact_on_time_constant_latents(vae64):
    # Varies in space and channels, constant in time: every window sees the same statistics.
    z = torch.randn(1, 16, 1, 3, 4, dtype=torch.float64).expand(1, 16, 9, 3, 4).contiguous()
    tiling = TilingConfig(temporal_tile=3, temporal_stride=2, spatial=False)
    tiled, full = vae64.decode(z, tiling=tiling, clamp=False), vae64.decode(z, clamp=False)
    assert tiled.shape == full.shape == (1, 3, 33, 24, 32)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_tiled_encode_runs_on_the_network(vae64):
    x = (
        torch.randn(1, 3, 1, 1, 1, dtype=torch.float64).expand(1, 3, 1, 48, 40).contiguous()
    )  # one constant frame
    tiling = TilingConfig(spatial_tile=2, spatial_stride=1)
    torch.testing.assert_close(vae64.encode(x, tiling=tiling), vae64.encode(x), rtol=0, atol=1e-10)
