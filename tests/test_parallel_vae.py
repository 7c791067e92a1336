"""The tiled VAE decode (and HunyuanVideo's tiled encode) with its tiles spread over 2 and 4 gloo
ranks equals the one-process tiled pass: the same tiles, the same stitch, the same frames.

Each case runs the shared pass (``parallel.vae_decode.run_tiled``) on every rank of a mesh, and
rank 0 also runs the model's own one-process tiled pass (``vae.decode(z, tiling=...)``) in the
same process, so the two differ only in who ran which tile. Tilings are small so that the tiny
VAEs give several tiles (temporal and spatial for HunyuanVideo), split unevenly over the ranks.
"""

from __future__ import annotations

import pytest
import torch

from mp_util import run_ranks
from parallel.vae_decode import balanced_runs

pytestmark = pytest.mark.multiprocess


def _hunyuan_tiling():
    from models.hunyuan_video.vae_tiling import TilingConfig

    return TilingConfig(spatial_tile=4, spatial_stride=3, temporal_tile=4, temporal_stride=3)


def _wan_tiling():
    from models.wan.vae_tiling import VaeTiling

    return VaeTiling(tile=4, stride=3)


# preset, latents [1, C, T, h, w], the tiling, tiles in the grid
DECODES = {
    "hunyuan": ("tiny", (1, 16, 7, 7, 6), _hunyuan_tiling, 12),  # 2 windows in time x 3 rows x 2 columns
    "wan": ("wan-tiny", (1, 16, 3, 7, 5), _wan_tiling, 6),  # 3 rows x 2 columns
}


def _mesh(world: int, topology: dict):
    from parallel.mesh import build_parallel_mesh
    from parallel.topology import Topology

    return build_parallel_mesh(Topology(**topology), device="cpu", timeout=30)


def _vae(preset: str):
    import models

    family = models.get_family(preset)
    return family, family.vae.load(None, family.presets[preset], device=torch.device("cpu"), dtype=torch.float32)


def _reference_decode(preset: str, vae, latents: torch.Tensor, tiling) -> torch.Tensor:
    """The model's own one-process tiled decode, as the family maps DiT latents to it."""
    if preset == "tiny":
        return vae.decode(latents / vae.config.scaling_factor, tiling=tiling)[0]
    return vae.decode(latents, tiling=tiling)[0]


def _frames_uint8(video: torch.Tensor) -> torch.Tensor:
    from launcher.video import frame_uint8

    return torch.stack([torch.from_numpy(frame_uint8(video, i)) for i in range(video.shape[1])])


def decode_case(rank: int, world: int, case: str, topology: dict):
    from parallel.vae_decode import run_tiled

    preset, shape, tiling, _ = DECODES[case]
    mesh = _mesh(world, topology)
    family, vae = _vae(preset)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    run = run_tiled(family.vae.split_decode(vae, latents, tiling()), mesh)
    if run.result is None:  # not the first rank of its replica
        return None
    single = _reference_decode(preset, vae, latents, tiling())
    value = (run.result.float() - single.float()).abs().max().item()
    frames = (_frames_uint8(run.result).int() - _frames_uint8(single).int()).abs().max().item()
    return {"tiles": run.tiles_per_rank, "seconds": run.seconds_per_rank, "max_value_diff": value,
            "max_uint8_diff": frames, "shape": tuple(run.result.shape)}


DECODE_CASES = [  # (family, processes, topology): replicas of SP ranks, and of CFG x SP ranks
    ("hunyuan", 2, {"ulysses": 2}),
    ("hunyuan", 4, {"cfg": 2, "ulysses": 2}),
    ("wan", 2, {"ring": 2}),
    ("wan", 4, {"ulysses": 4}),
]


@pytest.mark.parametrize("case, world, topology", DECODE_CASES, ids=[f"{c[0]}-{c[1]}p" for c in DECODE_CASES])
def test_shared_decode_equals_one_process_tiled_decode(case, world, topology):
    everyone = run_ranks(decode_case, world, args=(case, topology), timeout=240)
    got = everyone[0]
    assert everyone[1:] == [None] * (world - 1)  # the result stays on the first rank
    print(f"{case} on {world} ranks: tiles per rank {got['tiles']}, max |diff| {got['max_value_diff']:.3g} "
          f"(uint8 frames: {got['max_uint8_diff']})")
    assert sum(got["tiles"]) == DECODES[case][3] and len(got["tiles"]) == world
    assert got["max_uint8_diff"] <= 1  # the bound the issue sets: 1/255 on uint8 frames
    assert got["max_value_diff"] == 0  # the same tiles through the same stitch: the same bits


def test_two_replicas_decode_side_by_side():
    """dp 2 x ulysses 2: each replica spreads its own video over its 2 ranks."""
    got = run_ranks(decode_case, 4, args=("hunyuan", {"dp": 2, "ulysses": 2}), timeout=240)
    assert got[1] is None and got[3] is None  # rank 2 is the first of the second replica
    for first in (got[0], got[2]):
        assert first["tiles"] == got[0]["tiles"] and len(first["tiles"]) == 2 and first["max_value_diff"] == 0


def encode_case(rank: int, world: int, topology: dict):
    from parallel.vae_decode import run_tiled

    mesh = _mesh(world, topology)
    family, vae = _vae("tiny")
    video = torch.rand(3, 17, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    tiling = _hunyuan_tiling()  # in pixels: 32 x 32 tiles every 24, 17 frames every 12
    run = run_tiled(family.vae.split_encode(vae, video, tiling), mesh)
    if rank != 0:
        return None
    single = vae.encode(video[None], tiling=tiling) * vae.config.scaling_factor
    return {"tiles": run.tiles_per_rank, "max_diff": (run.result - single).abs().max().item(),
            "shape": tuple(run.result.shape)}


@pytest.mark.parametrize("world, topology", [(2, {"ring": 2}), (4, {"ulysses": 4})])
def test_shared_tiled_encode_equals_one_process(world, topology):
    got = run_ranks(encode_case, world, args=(topology,), timeout=240)[0]
    print(f"encode on {world} ranks: tiles per rank {got['tiles']}, max |diff| {got['max_diff']:.3g}")
    assert got["shape"] == (1, 16, 5, 8, 6) and len(got["tiles"]) == world and sum(got["tiles"]) > world
    assert got["max_diff"] == 0


def test_balanced_runs_are_contiguous_and_even():
    runs = balanced_runs([4, 4, 4, 4, 2, 2], 2)
    assert runs == [range(0, 3), range(3, 6)]  # costs 12 and 8: the nearest cut to 10
    assert [len(r) for r in balanced_runs([1] * 6, 4)] == [2, 1, 2, 1]
    runs = balanced_runs([5, 1], 4)  # fewer tiles than ranks: some runs are empty
    assert sum(len(r) for r in runs) == 2 and [k for r in runs for k in r] == [0, 1]
    costs = [17, 17, 9, 17, 9, 17, 17, 9, 5]
    runs = balanced_runs(costs, 3)
    loads = [sum(costs[k] for k in r) for r in runs]
    assert max(loads) - sum(costs) / 3 < max(costs)
