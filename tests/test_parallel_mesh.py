"""Degrees, rank layout and the single-process mesh (no extra processes)."""

import dataclasses
import datetime

import pytest
import torch

from parallel.mesh import MESH_AXES, MeshAxis, build_parallel_mesh, init_distributed, teardown
from parallel.sequence import (
    SequenceParallel,
    gather_tokens,
    padded_length,
    shard_length,
    shard_tokens,
    valid_in_chunk,
)
from parallel.topology import Topology, TopologyError


def test_dims_checked_against_world_size():
    with pytest.raises(TopologyError, match=r"dp 1 x cfg 2 x ring 2 x ulysses 2 = 8, but the world size is 4"):
        Topology(cfg=2, ring=2, ulysses=2).check_world(4)
    with pytest.raises(TopologyError, match="cfg must be one of"):
        Topology(cfg=3)
    dims = Topology(dp=2, cfg=2, ring=2, ulysses=2)
    dims.check_world(16)
    assert dims.shape == (2, 2, 2, 2) and dims.sp == 4 and dims.world_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.ring = 4


def test_rank_layout_is_row_major_with_ulysses_innermost():
    dims = Topology(dp=2, cfg=1, ring=2, ulysses=3)
    assert [a.value for a in MESH_AXES] == ["dp", "cfg", "ring", "ulysses"]
    assert dims.coords(7) == {MeshAxis.DP: 1, MeshAxis.CFG: 0, MeshAxis.RING: 0, MeshAxis.ULYSSES: 1}
    assert dims.group_ranks(["ulysses"])[:2] == [[0, 1, 2], [3, 4, 5]]
    assert dims.group_ranks(["ring"])[:2] == [[0, 3], [1, 4]]
    assert dims.group_ranks(["ring", "ulysses"]) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert dims.group_ranks(["dp"])[0] == [0, 6]
    for axes in (["dp"], ["ring"], ["ring", "ulysses"]):
        flat = sorted(r for g in dims.group_ranks(axes) for r in g)
        assert flat == list(range(12))  # a partition


def test_single_process_mesh_and_teardown():
    info = init_distributed(backend="gloo", device_type="cpu", timeout=42)
    try:
        assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo")
        mesh = build_parallel_mesh(Topology())
        group = mesh.group(MeshAxis.RING, MeshAxis.ULYSSES)
        assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=42)
        assert mesh.device_mesh.mesh_dim_names == ("dp", "cfg", "ring", "ulysses")
        assert mesh.submesh("ring", "ulysses").mesh_dim_names == ("ring", "ulysses")
        with pytest.raises(KeyError, match="no process group for axes"):
            mesh.group("dp", "cfg")
        with pytest.raises(TopologyError, match="is for 2 ranks, but the job has 1"):
            build_parallel_mesh(Topology(ulysses=2))
        with pytest.raises(RuntimeError, match="already exists"):
            init_distributed(backend="gloo", device_type="cpu")
        sp = SequenceParallel.from_mesh(mesh)
        assert (sp.sp_size, sp.sp_rank) == (1, 0)
    finally:
        teardown()
    teardown()  # idempotent


def test_shard_arithmetic():
    assert [padded_length(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert shard_length(118800, 8) == 14850 and shard_length(9, 4) == 3
    # 9 tokens over 4 ranks, chunks of 6 (ring 2 x ulysses 2, shard 3): 6 valid, then 3
    assert [valid_in_chunk(9, 6, j) for j in range(2)] == [6, 3]
    assert [valid_in_chunk(1, 1, j) for j in range(4)] == [1, 0, 0, 0]


def test_shard_tokens_is_a_padded_contiguous_slice():
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3).float()
    shards = []
    for rank in range(4):
        sp = SequenceParallel(sp_group=object(), ring_group=object(), ulysses_group=object(), ring_size=2, ring_rank=rank // 2, ulysses_size=2, ulysses_rank=rank % 2)
        assert sp.sp_rank == rank
        shards.append(shard_tokens(x, -2, sp))
    assert all(s.shape == (2, 2, 3) and s.is_contiguous() for s in shards)
    whole = torch.cat(shards, dim=1)
    assert torch.equal(whole[:, :7], x) and torch.equal(whole[:, 7:], torch.zeros(2, 1, 3))
    single = SequenceParallel.single()
    assert torch.equal(gather_tokens(shard_tokens(x, 1, single), 1, single, 7), x)
