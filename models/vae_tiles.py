"""Tiled VAE passes as a plan of independent tiles and one stitch, for any causal video VAE.

A tiled decode (or encode) is split in two: ``TileGrid.windows`` lists the input windows, each
run through the network on its own, and ``TileGrid.stitch`` cross-fades the tile outputs, taken
in window order, into the whole result. The single-process pass is ``stitch(map(run, windows))``
(lazily, so only the tiles the blend still needs are alive); a distributed pass
(``parallel/vae_decode.py``) runs the same windows on several ranks and feeds the same stitch
the same tiles in the same order, so its result is the same bits. Pure tensor code.

Plan (the HunyuanVideo release's, and diffusers' for Wan): along an axis that is tiled, windows
start every ``stride`` at every start < size (edge windows may be short). Time is outside, space
inside: every temporal window holds one grid of spatial tiles, taken row by row. A tile is
cross-faded into its already-blended upper, then left neighbour over (tile - stride) x scale
output elements and contributes its leading stride x scale part; the stitched temporal windows
are then cross-faded in time the same way.

Temporal windows hold tile+1 input frames. A causal VAE maps its first input frame to one output
frame on its own; that frame repeats the previous window's last overlapped frame, so every window
but the first drops it (and a window of one frame, which would add nothing, is skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import torch

Window = tuple[slice, slice, slice]  # (time, height, width) of the input `[B, C, T, H, W]`


def exact(n: int, scale: Fraction) -> int:
    """``n x scale`` as an int; raises when the tile geometry does not land on whole elements."""
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


@dataclass(frozen=True)
class Axis:
    """How one axis is tiled: window ``tile`` and ``stride`` in input elements, ``scale`` output
    elements per input element. ``None`` in a grid: the axis is one window, never blended."""

    tile: int
    stride: int
    scale: Fraction

    @property
    def blend(self) -> int:
        return exact(self.tile - self.stride, self.scale)

    @property
    def keep(self) -> int:
        return exact(self.stride, self.scale)


def _time_starts(frames: int, axis: Axis) -> tuple[int, ...]:
    """Starts of the temporal windows (tile + 1 frames each); a one-frame window is skipped."""
    return tuple(i for i in range(0, frames, axis.stride)
                 if i == 0 or exact(min(axis.tile + 1, frames - i) - 1, axis.scale) > 0)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one pass over an input of ``shape`` (T, H, W): ``time`` / ``space`` the tiled
    axes (None: that axis is whole). ``windows`` in the order ``stitch`` consumes them."""

    shape: tuple[int, int, int]
    time: Axis | None
    space: Axis | None
    windows: tuple[Window, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        frames, height, width = self.shape
        if self.time is None:
            times = [slice(0, frames)]
        else:
            times = [slice(i, min(i + self.time.tile + 1, frames)) for i in _time_starts(frames, self.time)]
        rows, cols = self._spans(height), self._spans(width)
        object.__setattr__(self, "windows", tuple((t, h, w) for t in times for h in rows for w in cols))

    def _spans(self, size: int) -> list[slice]:
        if self.space is None:
            return [slice(0, size)]
        return [slice(i, min(i + self.space.tile, size)) for i in range(0, size, self.space.stride)]

    def costs(self) -> list[int]:
        """Each window's input elements per channel: what its pass costs, to balance ranks."""
        return [(t.stop - t.start) * (h.stop - h.start) * (w.stop - w.start) for t, h, w in self.windows]

    def stitch(self, tiles: Iterable[torch.Tensor]) -> torch.Tensor:
        """The tile outputs `[B, C', t', h', w']`, in ``windows`` order, -> the whole output
        `[B, C', T', H x scale, W x scale]`. Consumes ``tiles`` lazily, one row of tiles alive."""
        tiles = iter(tiles)
        per_time = (self._stitch_space(tiles) for _ in range(len(self.windows) // self._per_time()))
        return next(per_time) if self.time is None else self._stitch_time(per_time)

    def _per_time(self) -> int:
        return len(self._spans(self.shape[1])) * len(self._spans(self.shape[2]))

    def _stitch_space(self, tiles: Iterator[torch.Tensor]) -> torch.Tensor:
        if self.space is None:
            return next(tiles)
        height, width = self.shape[1:]
        ax, out, prev_row = self.space, None, []
        for i in range(0, height, ax.stride):
            row = []
            for col, j in enumerate(range(0, width, ax.stride)):
                y = next(tiles)
                if prev_row:
                    blend_(prev_row[col], y, ax.blend, dim=-2)
                if row:
                    blend_(row[-1], y, ax.blend, dim=-1)
                row.append(y)
                if out is None:
                    out = y.new_empty(*y.shape[:-2], exact(height, ax.scale), exact(width, ax.scale))
                kept = y[..., : ax.keep, : ax.keep]
                oi, oj = exact(i, ax.scale), exact(j, ax.scale)
                out[..., oi : oi + kept.shape[-2], oj : oj + kept.shape[-1]] = kept
            prev_row = row
        return out

    def _stitch_time(self, windows: Iterator[torch.Tensor]) -> torch.Tensor:
        ax, frames = self.time, self.shape[0]
        out, prev = None, None
        for i in _time_starts(frames, ax):
            y = next(windows)
            if out is None:
                out = y.new_empty(*y.shape[:2], 1 + exact(frames - 1, ax.scale), *y.shape[3:])
            if i == 0:
                out[:, :, : ax.keep + 1] = y[:, :, : ax.keep + 1]
            else:
                y = blend_(prev, y[:, :, 1:], ax.blend, dim=2)
                start = 1 + exact(i, ax.scale)
                kept = y[:, :, : ax.keep]
                out[:, :, start : start + kept.shape[2]] = kept
            prev = y
        return out


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``fn`` over the windows of ``x`` `[B, C, T, H, W]`, stitched: the single-process pass."""
    return grid.stitch(fn(x[(slice(None), slice(None), *w)]) for w in grid.windows)


@dataclass(frozen=True)
class TiledPass:
    """One tiled VAE pass split in independent tiles: what a family hands the launcher
    (``VaeSpec.split_decode``) so that ranks can share the tiles.

    ``tile(k)`` runs window k through the network (on the VAE's device, in its dtype);
    ``stitch(tiles)`` blends all tile outputs, given in window order, and ``finish`` turns the
    stitched tensor into the pass's result (for a decode: video `[3, F, H, W]` on the CPU)."""

    grid: TileGrid
    run: Callable[[Window], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def __len__(self) -> int:
        return len(self.grid.windows)

    def costs(self) -> list[int]:
        return self.grid.costs()

    def tile(self, k: int) -> torch.Tensor:
        return self.run(self.grid.windows[k])

    def stitch(self, tiles: Iterable[torch.Tensor]) -> torch.Tensor:
        return self.finish(self.grid.stitch(tiles))

    def __call__(self) -> torch.Tensor:
        """The whole pass on this process (tile after tile, as the stitch asks for them)."""
        return self.stitch(self.tile(k) for k in range(len(self)))
