"""Where a model's blocks live: resident on the device, or streamed from host memory
(:mod:`parallel.streaming`), with one host copy per node when several ranks share it.

The caller says how to materialise one block (real values, final structure, e.g. FP8 already
applied) and how to get its structure alone (on the meta device, for ranks that only map the
node's shared copy); :func:`place_blocks` does the rest. Streamed blocks are the *last* ones in
execution order, so the first streamed block is fetched while the resident ones compute.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .streaming import BlockLayout, HostStore, LayerStreamer, open_host_store, shm_free_bytes

log = logging.getLogger(__name__)

Materialise = Callable[[str, nn.Module], nn.Module]


@dataclass(frozen=True)
class NodeShare:
    """The ranks of one node sharing one host copy: ``writer`` on exactly one of them (local rank
    0), ``barrier`` over all ranks that call :func:`place_blocks` (the world is fine), ``agree``
    an all-ranks AND of a bool (so that every rank takes the same path)."""

    name: str
    writer: bool
    barrier: Callable[[], None]
    agree: Callable[[bool], bool]


def node_share_name(tag: str) -> str:
    """A /dev/shm name unique to this job and node (torchrun's run id, else Slurm's job id)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or os.environ.get("MASTER_PORT", "0")
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0"
    return f"launcher-{os.getuid()}-{run}-n{node}-{tag}"


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device, made without copying any tensor data."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


@dataclass
class PlacedBlocks:
    """The streamer (None when every block is resident) and what it streams from."""

    streamer: LayerStreamer | None
    store: HostStore | None
    streamed: tuple[str, ...]

    @property
    def host_kind(self) -> str | None:
        return None if self.store is None else self.store.kind

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        if self.store is not None:
            self.store.close()


def place_blocks(
    blocks: Sequence[tuple[str, nn.Module]],
    *,
    device: torch.device,
    streamed: int,
    materialise: Materialise,
    structure: Materialise,
    prefetch: int = 1,
    share: NodeShare | None = None,
) -> PlacedBlocks:
    """Materialise ``blocks`` (``(name, module)`` in execution order): the first
    ``len - streamed`` on ``device``, the last ``streamed`` into host memory behind a streamer.

    ``materialise(name, block)`` gives the block its real values in its final structure (any
    device; streamed blocks are copied to the host store from there); ``structure(name, block)``
    gives a block (original or final structure) the final structure on the meta device, without
    values. Both work in place (the model holds the same object) and return the block."""
    if not 0 <= streamed <= len(blocks):
        raise ValueError(f"streamed blocks {streamed} not in [0, {len(blocks)}]")
    cut = len(blocks) - streamed
    for name, block in blocks[:cut]:
        materialise(name, block)
    if streamed == 0:
        return PlacedBlocks(None, None, ())
    tail = list(blocks[cut:])
    use_share = share is not None
    layouts = [BlockLayout.of(structure(name, meta_copy(block))) for name, block in tail]
    need = sum(layout.nbytes for layout in layouts)
    if use_share and not share.agree(shm_free_bytes() > need * 1.02):
        log.warning("/dev/shm has less than the %.1f GiB the streamed weights need: every rank keeps "
                    "its own host copy", need / 2**30)
        use_share = False
    writer = share.writer if use_share else True

    def fill(i: int, flat: torch.Tensor) -> None:
        name, block = tail[i]
        real = BlockLayout.of(materialise(name, block))
        if [(s.dtype, s.shape) for s in real.slots] != [(s.dtype, s.shape) for s in layouts[i].slots]:
            raise RuntimeError(f"{name}: materialised tensors differ from its structure")
        real.write(flat)
        structure(name, block)  # the values now live in the store: drop this copy

    store = open_host_store(
        layouts, fill, device=device, share_name=share.name if use_share else None,
        writer=writer, barrier=share.barrier if use_share else None,
    )
    if not writer:
        for name, block in tail:
            structure(name, block)
    layouts = [BlockLayout.of(block) for _, block in tail]  # the same layout, over the model's own modules
    streamer = LayerStreamer([b for _, b in tail], layouts, store, device, prefetch=prefetch)
    log.info("streaming %d of %d blocks from %s host memory (%.2f GiB; %.2f GiB of device slots)",
             streamed, len(blocks), store.kind, need / 2**30, streamer.device_bytes / 2**30)
    return PlacedBlocks(streamer, store, tuple(n for n, _ in tail))
