"""Layer streaming: a model's blocks keep their weights in host memory and each block's weights
are copied to the GPU on a side stream while the block before it computes.

Pieces:

- :class:`BlockLayout`: where each tensor of one block (parameters and buffers, any dtype, FP8
  included) lives inside one flat byte buffer, 256-byte aligned so that every tensor can be a
  typed view of it.
- :class:`HostStore`: one flat ``uint8`` host buffer holding every streamed block back to back.
  Page-locked where possible (copies from pageable memory are staged by the driver and do not
  overlap). ``shared``: a file in ``/dev/shm`` written by one rank of the node and mapped by all
  of them, then registered with CUDA, so N ranks of a node hold one copy (:func:`open_host_store`).
- :class:`LayerStreamer`: forward hooks that run the pipeline. ``prefetch + 1`` device slots of
  the largest block's size; the k-th block load goes to slot ``k % slots``. Before block ``i``
  runs, the compute stream waits for its copy and the block's tensors are re-pointed at its slot;
  the loads of the next ``prefetch`` blocks (in execution order, cyclic, so the next forward's
  first block is fetched during this forward's last) are queued on the copy stream, each after the
  compute that last used its slot. After the block, its tensors point back at the host copy, so a
  stale slot is never read by accident.

Nothing here creates process groups: sharing between ranks takes a ``barrier`` callable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGN = 256
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a block: ``owner.<name>`` (a parameter or buffer of submodule ``owner``)."""

    owner: nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the block's start
    nbytes: int


@dataclass(frozen=True)
class BlockLayout:
    """Every tensor of one block, in ``named_modules`` order; ``nbytes`` includes alignment."""

    slots: tuple[TensorSlot, ...]
    nbytes: int

    @classmethod
    def of(cls, block: nn.Module) -> "BlockLayout":
        slots, offset = [], 0
        for _, mod in block.named_modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    nbytes = t.numel() * t.element_size()
                    slots.append(TensorSlot(mod, name, is_param, t.dtype, tuple(t.shape), offset, nbytes))
                    offset += _aligned(nbytes)
        return cls(tuple(slots), offset)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of ``flat`` (``uint8``, at least ``nbytes`` long), one per tensor; a
        parameter's view is a Parameter, as the tensor it stands for (a compiled block guards on
        the type: plain tensors would compile a second time for the streamed blocks)."""
        views = [flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots]
        return [nn.Parameter(v, requires_grad=False) if s.is_param else v for s, v in zip(self.slots, views)]

    def bind(self, tensors: Sequence[torch.Tensor]) -> None:
        """Point the block's parameters/buffers at ``tensors`` (no copy, no autograd)."""
        for s, t in zip(self.slots, tensors):
            (s.owner._parameters if s.is_param else s.owner._buffers)[s.name] = t

    def write(self, flat: torch.Tensor) -> None:
        """Copy the block's current tensors (any device) into ``flat``."""
        for s, dst in zip(self.slots, self.views(flat)):
            src = (s.owner._parameters if s.is_param else s.owner._buffers)[s.name]
            dst.copy_(src.detach())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class HostStore:
    """Streamed blocks back to back in one flat host buffer; ``offsets[i]`` is block i's start.

    ``kind``: "shared-pinned" (node-shared /dev/shm mapping registered with CUDA), "shared"
    (mapped, not registered), "pinned" (this rank's own page-locked copy) or "pageable"."""

    flat: torch.Tensor
    offsets: tuple[int, ...]
    kind: str
    _registered: bool = False

    def block(self, i: int, layout: BlockLayout) -> torch.Tensor:
        return self.flat[self.offsets[i] : self.offsets[i] + layout.nbytes]

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self._registered = False


def _offsets(layouts: Sequence[BlockLayout]) -> tuple[tuple[int, ...], int]:
    offsets, total = [], 0
    for layout in layouts:
        offsets.append(total)
        total += _aligned(layout.nbytes)
    return tuple(offsets), max(total, ALIGN)


def _register(flat: torch.Tensor) -> bool:
    """Page-lock an existing mapping for DMA (cudaHostRegister), so copies from it are async."""
    err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
    if int(err) != 0:
        log.warning("cudaHostRegister of the shared weight store failed (error %s); copies will not overlap", int(err))
        return False
    return True


def shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def open_host_store(
    layouts: Sequence[BlockLayout],
    fill: Callable[[int, torch.Tensor], None],
    *,
    device: torch.device,
    share_name: str | None = None,
    writer: bool = True,
    barrier: Callable[[], None] | None = None,
) -> HostStore:
    """The host store of ``layouts``. ``fill(i, flat_i)`` writes block i's bytes (called only on
    the writer). With ``share_name`` (every rank of the node passing the same name, exactly one
    of them ``writer``, and a ``barrier`` over those ranks), the writer fills
    ``/dev/shm/<share_name>`` and every rank maps it; the file is unlinked once all have mapped it,
    so nothing is left behind after the job. Without, this rank fills its own copy."""
    offsets, total = _offsets(layouts)
    cuda = device.type == "cuda"
    if share_name is not None:
        return _shared_store(layouts, offsets, total, fill, share_name, writer, barrier, cuda)
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    store = HostStore(flat, offsets, "pinned" if cuda else "pageable")
    for i, layout in enumerate(layouts):
        fill(i, store.block(i, layout))
    return store


def _shared_store(layouts, offsets, total, fill, name, writer, barrier, cuda) -> HostStore:
    if barrier is None:
        raise ValueError("a shared host store needs a barrier over the ranks that share it")
    path = SHM_DIR / name
    if writer:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(total)
        try:
            flat = torch.from_file(str(tmp), shared=True, size=total, dtype=torch.uint8)
            store = HostStore(flat, offsets, "shared")
            for i, layout in enumerate(layouts):
                fill(i, store.block(i, layout))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave a half-written store in /dev/shm
            raise
    barrier()  # the file is complete under its final name
    if not writer:
        flat = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    barrier()  # every rank has mapped it: the name can go, the mappings stay
    if writer:
        path.unlink(missing_ok=True)
    store = HostStore(flat, offsets, "shared")
    if cuda and _register(flat):
        store.kind, store._registered = "shared-pinned", True
    return store


class LayerStreamer:
    """Streams ``blocks`` (called in this order, cyclically) from ``store`` to ``device``.

    Device memory: ``(prefetch + 1) x`` the largest block. On a CPU "device" the copies are
    plain synchronous copies (the logic, not the overlap, is what CPU tests check)."""

    def __init__(self, blocks: Sequence[nn.Module], layouts: Sequence[BlockLayout], store: HostStore,
                 device: torch.device, *, prefetch: int = 1):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.blocks, self.layouts, self.store, self.device = list(blocks), list(layouts), store, device
        self.n = len(self.blocks)
        self.prefetch = min(prefetch, max(self.n - 1, 1))
        size = max((layout.nbytes for layout in self.layouts), default=ALIGN)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(self.prefetch + 1)]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self._host_views = [layout.views(store.block(i, layout)) for i, layout in enumerate(self.layouts)]
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._slot_free = [None] * len(self.slots)  # event: last compute that read the slot
        self._queued: dict[int, tuple[int, object]] = {}  # block -> (slot, ready event)
        self._loads = 0
        self._handles = []
        for i, (block, layout) in enumerate(zip(self.blocks, self.layouts)):
            layout.bind(self._host_views[i])
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(block.register_forward_hook(self._make_post(i)))

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    # The hooks run eagerly even on a compiled block (`--compile`): traced, they would put the
    # copy stream's work in the graph and guard on the pipeline's counters, which change on every
    # call (a recompile per call until dynamo gives up on the block).
    def _make_pre(self, i: int):
        @torch.compiler.disable
        def hook(module, args):
            self._before(i)
        return hook

    def _make_post(self, i: int):
        @torch.compiler.disable
        def hook(module, args, out):
            self._after(i)
        return hook

    def _queue(self, j: int) -> None:
        """Start copying block j into the next slot, once that slot's last reader has finished."""
        slot = self._loads % len(self.slots)
        self._loads += 1
        src = self.store.block(j, self.layouts[j])
        dst = self.slots[slot][: src.numel()]
        if self.copy_stream is None:
            dst.copy_(src)
            self._queued[j] = (slot, None)
            return
        with torch.cuda.stream(self.copy_stream):
            if self._slot_free[slot] is not None:
                self.copy_stream.wait_event(self._slot_free[slot])
            dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self._queued[j] = (slot, ready)

    def _before(self, i: int) -> None:
        if i not in self._queued:
            # First call, or the blocks ran out of the expected order: restart the pipeline here.
            self._drain()
            self._queue(i)
        for d in range(1, self.prefetch + 1):
            j = (i + d) % self.n
            if j != i and j not in self._queued:
                self._queue(j)
        slot, ready = self._queued[i]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        key = (i, slot)
        if key not in self._slot_views:
            # Made outside inference mode even in a forward under it: the same kind of tensors as
            # the resident blocks' parameters, whose dispatch keys a compiled block guards on.
            with torch.inference_mode(False):
                self._slot_views[key] = self.layouts[i].views(self.slots[slot])
        self.layouts[i].bind(self._slot_views[key])

    def _after(self, i: int) -> None:
        slot, _ = self._queued.pop(i)
        if self.copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_free[slot] = done
        self.layouts[i].bind(self._host_views[i])

    def _drain(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self._queued.clear()

    def close(self) -> None:
        """Remove the hooks and free the device slots (the blocks keep pointing at host memory)."""
        self._drain()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.slots.clear()
        self._slot_views.clear()
