"""A tiled VAE pass (decode, or encode) shared by the ranks that made one video.

The family splits the pass into the tiles of its single-process plan
(``models.vae_tiles.TiledPass``); here the tiles are spread over the ranks of a group of the mesh
(by default a replica: the sequence-parallel ranks and the CFG branches, which all hold the whole
latents after the gather) and their outputs go back to the group's first rank, which stitches them
with the same code and in the same order as one process does, so the result is the same bits.

Tiles are cut into contiguous runs, one per rank in group-rank order, of about equal cost (each
window's input size). Contiguous, so that the first rank stitches its own tiles while it decodes
them and then takes each other rank's tiles in turn, one at a time, as the stitch needs them: it
never holds more tiles than the single-process decode does. Every other rank runs its tiles and
posts each output to the first rank as soon as it is done (``isend``: its next tile does not wait
for the transfer). Every wait has the mesh's timeout; a rank that dies leaves the others to fail
at it, not to hang.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from .mesh import REPLICA_AXES, MeshAxis, ParallelMesh

# Tile headers: ndim, dtype code, then the shape (a tile is at most 6-D).
_HEADER = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TiledRun:
    """What one shared pass did: ``result`` on the group's first rank (None on the others), and
    per rank of the group (group-rank order) its tiles and the seconds it spent on them (the first
    rank's seconds cover the whole pass: its tiles, the others' it waited for, the stitch)."""

    result: torch.Tensor | None
    tiles_per_rank: list[int]
    seconds_per_rank: list[float]


def balanced_runs(costs: Sequence[int], parts: int) -> list[range]:
    """Contiguous runs of tile indices, one per part, of about equal total cost: each cut sits at
    the tile boundary nearest to an equal share, so a run is off by less than one tile's cost.
    Runs may be empty (fewer tiles than parts)."""
    prefix = list(accumulate(costs, initial=0))
    bounds = [0]
    for r in range(1, parts):
        target = prefix[-1] * r / parts
        k = min(bisect.bisect_left(prefix, target, lo=bounds[-1]), len(costs))
        if k > bounds[-1] and target - prefix[k - 1] < prefix[k] - target:
            k -= 1  # the boundary before is nearer
        bounds.append(k)
    bounds.append(len(costs))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def run_tiled(work, mesh: ParallelMesh | None, axes: Sequence[MeshAxis] = REPLICA_AXES) -> TiledRun:
    """Run ``work`` (a ``TiledPass``) with its tiles spread over the group of ``axes``. Collective
    over that group: every rank calls it with the same pass (the same grid)."""
    start = time.perf_counter()
    if mesh is None or mesh.group(*axes).size() == 1:
        result = work()
        return TiledRun(result, [len(work)], [time.perf_counter() - start])
    group = mesh.group(*axes)
    rank = group.rank()
    _check_same_grid(len(work), group, mesh)
    runs = balanced_runs(work.costs(), group.size())
    if rank == 0:
        result = work.stitch(_tiles_in_order(work, runs, group, mesh))
    else:
        result = _send_tiles(work, runs[rank], group, mesh)
    mine = {"tiles": len(runs[rank]), "seconds": time.perf_counter() - start}
    stats = mesh.gather_objects(mine, axes)
    return TiledRun(result, [s["tiles"] for s in stats], [s["seconds"] for s in stats])


def _check_same_grid(tiles: int, group, mesh: ParallelMesh) -> None:
    """Every rank says how many tiles its grid has and the first rank checks them: different
    latents on different ranks would otherwise stitch a wrong video (or wait at the timeout)."""
    mine = torch.tensor([tiles], dtype=torch.int64, device=mesh.device)
    if group.rank() != 0:
        dist.isend(mine, dist.get_global_rank(group, 0), group=group).wait(mesh.timeout)
        return
    for r in range(1, group.size()):
        theirs = torch.empty_like(mine)
        dist.irecv(theirs, dist.get_global_rank(group, r), group=group).wait(mesh.timeout)
        if int(theirs) != tiles:
            raise RuntimeError(f"shared VAE pass: group rank {r} has {int(theirs)} tiles, the first rank {tiles}")


def _tiles_in_order(work, runs: list[range], group, mesh: ParallelMesh) -> Iterator[torch.Tensor]:
    """The first rank's view of every tile output in window order: its own run computed here,
    each other rank's received when the stitch reaches it."""
    for r, run in enumerate(runs):
        source = dist.get_global_rank(group, r)
        for k in run:
            yield work.tile(k) if r == 0 else _receive(source, group, mesh)


def _send_tiles(work, run: range, group, mesh: ParallelMesh) -> None:
    """Run this rank's tiles and post each to the group's first rank; wait for the sends last."""
    dest = dist.get_global_rank(group, 0)
    pending, alive = [], []
    for k in run:
        tile = work.tile(k).contiguous()
        header = _header(tile)
        pending += [dist.isend(header, dest, group=group), dist.isend(tile, dest, group=group)]
        alive += [header, tile]  # a send reads its tensor until it completes
    if mesh.device.type == "cuda":
        torch.cuda.current_stream().synchronize()  # this rank's own seconds: its tiles, not the transfers
    for work_item in pending:
        work_item.wait(mesh.timeout)
    return None


def _header(tile: torch.Tensor) -> torch.Tensor:
    if tile.ndim > _HEADER - 2 or tile.dtype not in _DTYPES:
        raise ValueError(f"cannot send a tile of shape {tuple(tile.shape)} and dtype {tile.dtype}")
    values = [tile.ndim, _DTYPES.index(tile.dtype), *tile.shape]
    return torch.tensor(values + [0] * (_HEADER - len(values)), dtype=torch.int64, device=tile.device)


def _receive(source: int, group, mesh: ParallelMesh) -> torch.Tensor:
    """One tile from global rank ``source``: its header, then its values."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=mesh.device)
    dist.irecv(header, source, group=group).wait(mesh.timeout)
    ndim, code, *shape = header.tolist()
    tile = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=mesh.device)
    dist.irecv(tile, source, group=group).wait(mesh.timeout)
    return tile
