"""Step caching: skip a step's DiT blocks when their input barely moved (TeaCache, First-Block Cache).

Both caches run the DiT as its three stages (the stage contract every family's DiT keeps):
``state = dit.enter(img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance)``,
``state = dit.run_blocks(state, start, stop)`` (blocks ``[start:stop]``, stop None = to the end),
``tokens = dit.leave(state)``; ``forward`` runs the same operations in the same order (its loop
inline, so that no state keeps the first block's input alive), so a step the cache computes is
bit-identical to an uncached one. ``state.img`` is the image stream `[B, S, C]` (S a shard under
sequence parallel); a frozen dataclass, so ``dataclasses.replace(state, img=...)`` gives a new one.

- TeaCache: the signal is ``dit.tea_signal(state)`` (HunyuanVideo: the first block's modulated image
  input, `[B, S, C]`, sharded; Wan: the timestep's modulation table, whole on every rank). The
  relative L1 change against the previous step, rescaled by the family's polynomial, accumulates;
  below the threshold the blocks are skipped and the image stream gets the residual (output minus
  input of all blocks) of the last computed step; otherwise the blocks run and the sum resets.
- First-Block Cache: the first block always runs; its residual is compared with the one of the last
  computed step; below the threshold the other blocks are skipped and their residual reused.

Sequence and CFG parallel: every rank of a replica must take the same branch, or the next
collective hangs. A decision is made from two sums (of |a - b| and of |b| over the elements), which
``reduce`` sums over the replica's ranks in fp64 (the SP shards and the CFG pair). An all-reduce
hands every rank the same two numbers, so every rank decides alike by construction. Padded tokens
are left out of the sums; a signal every SP rank holds whole (Wan's) is counted once per SP rank,
which scales both sums alike. The cached residuals stay this rank's shard. Classic CFG in one process runs both branches' first stages before
deciding, so a step is skipped for both or for neither, as on a CFG-parallel pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

CACHES = ("off", "teacache", "fbcache")

# reduce(sums [2] fp64) -> the same sums added over the replica's ranks
Reduce = Callable[[torch.Tensor], torch.Tensor]


def local_reduce(sums: torch.Tensor) -> torch.Tensor:
    """One process holds every token and every branch: nothing to add."""
    return sums


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """A family's published (or chosen) cache settings for one preset.

    ``tea_coefficients``: the polynomial rescaling TeaCache's relative L1 change (highest power
    first); ``tea_threshold`` / ``fb_threshold``: the defaults of ``--cache-threshold``;
    ``tea_warmup``: steps always computed at the start (the last step always is); ``tea_signal``:
    what the signal is, for the record."""

    tea_coefficients: tuple[float, ...]
    tea_threshold: float
    fb_threshold: float
    tea_warmup: int = 1
    tea_signal: str = ""
    stream_fp32: bool = False  # the image stream between blocks is fp32 whatever the DiT's dtype (Wan)
    note: str = ""  # where the numbers come from


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The cache one job runs: ``kind`` in CACHES, its threshold (0: never skip), and for TeaCache
    the polynomial and warm-up steps."""

    kind: str = "off"
    threshold: float = 0.0
    coefficients: tuple[float, ...] = ()
    warmup: int = 1

    @property
    def on(self) -> bool:
        return self.kind != "off"

    @classmethod
    def resolve(cls, kind: str, threshold: float | None, spec: CacheSpec | None) -> "CacheSettings":
        """``--cache`` and ``--cache-threshold`` (None: the family's default) for a family's spec;
        ValueError for a bad choice (the caller words it as a config error)."""
        if kind not in CACHES:
            raise ValueError(f"--cache {kind!r}; valid: {', '.join(CACHES)}")
        if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"--cache-threshold {threshold}: give a finite number >= 0 (0: never skip a step)")
        if kind == "off":
            return cls()
        if spec is None:
            raise ValueError(f"--cache {kind}: this model family declares no step cache; use --cache off")
        if kind == "teacache":
            thr = spec.tea_threshold if threshold is None else threshold
            return cls(kind=kind, threshold=thr, coefficients=spec.tea_coefficients, warmup=spec.tea_warmup)
        return cls(kind=kind, threshold=spec.fb_threshold if threshold is None else threshold)

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "threshold": self.threshold}
        if self.kind == "teacache":
            out |= {"coefficients": list(self.coefficients), "warmup_steps": self.warmup}
        return out


def call_with_weights_on(device: torch.device, module: torch.nn.Module, *args):
    """``module(*args)`` with its weights on ``device``. A signal may read a block's layer between
    the block's calls, when a streamed block's weights wait in host memory: then a device copy of
    that layer's tensors is used for this call (functional_call leaves the module as it was)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    if all(t.device == device for t in tensors.values()):
        return module(*args)
    return torch.func.functional_call(module, {k: t.to(device) for k, t in tensors.items()}, args)


def held_streams(kind: str, branches: int) -> int:
    """How many image-stream tensors `[B, S, C]` (this rank's shard) a cache of ``kind`` holds on
    top of an uncached forward, at its peak (while the blocks compute), for ``branches`` passes per
    step (2: classic CFG in one process). Per branch: the cached residual, the compared signal (or
    first-block residual) and the blocks' input kept for the new residual, plus for FBCache the
    stream before the first block; a branch that waits holds its stream, one that is done its output."""
    if kind == "off":
        return 0
    per_branch = 3 if kind == "teacache" else 4
    return per_branch * branches + 2 * (branches - 1)


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """Horner's rule, highest power first (numpy's poly1d order)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def rescaled(coefficients: Sequence[float], distance: float) -> float:
    """TeaCache's rescaled change: the family's polynomial at the relative change, or the change
    itself where the polynomial is negative. Wan's published fits go negative far from the changes
    they were fitted on (a large change would count as less than none, and every later step would
    be skipped: seen with few steps); HunyuanVideo's stays above 0.05 everywhere, so it is unchanged."""
    value = polynomial(coefficients, distance)
    return value if value >= 0 else distance


def l1_sums(new: Sequence[torch.Tensor], old: Sequence[torch.Tensor], valid: int | None) -> torch.Tensor:
    """`[sum |new - old|, sum |old|]` in fp64 over every branch's tensor; ``valid``: the first
    ``valid`` tokens of each `[B, S, C]` tensor count (padding follows them), None: all elements."""
    sums = torch.zeros(2, dtype=torch.float64, device=new[0].device)
    for a, b in zip(new, old):
        if valid is not None:
            a, b = a[:, :valid], b[:, :valid]
        sums[0] += (a - b).abs().sum(dtype=torch.float64)
        sums[1] += b.abs().sum(dtype=torch.float64)
    return sums


@dataclass
class StepCache:
    """The cache of one video's denoising (a fresh one per prompt).

    ``steps``: the steps of the run (the last is always computed); ``valid_tokens``: the valid
    image tokens of this rank's shard (the rest is padding); ``reduce``: sums over the replica."""

    settings: CacheSettings
    steps: int
    valid_tokens: int | None = None
    reduce: Reduce = local_reduce
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    distances: list[float | None] = field(default_factory=list)  # the value compared, per step
    _step: int = 0
    _acc: float = 0.0
    _prev: list[torch.Tensor] | None = None  # TeaCache: last step's signal; FBCache: last computed r1
    _residual: list[torch.Tensor] | None = None

    def run(self, dit, states: list) -> list:
        """Every branch's state after the blocks, computed or from the cache (one call per step)."""
        step, self._step = self._step, self._step + 1
        if self.settings.kind == "teacache":
            return self._teacache(dit, states, step)
        if self.settings.kind == "fbcache":
            return self._fbcache(dit, states, step)
        raise ValueError(f"StepCache with kind {self.settings.kind!r}")

    def record(self) -> dict:
        return self.settings.as_dict() | {"computed_steps": list(self.computed), "skipped_steps": list(self.skipped),
                                          "distances": list(self.distances)}

    def _forced(self, step: int, warmup: int) -> bool:
        return step < warmup or step == self.steps - 1 or self._residual is None

    def _relative(self, new: list[torch.Tensor], sharded: bool) -> float:
        sums = self.reduce(l1_sums(new, self._prev, self.valid_tokens if sharded else None))
        num, den = (float(v) for v in sums.cpu())
        return num / den if den > 0 else math.inf

    def _teacache(self, dit, states: list, step: int) -> list:
        signals = [dit.tea_signal(s) for s in states]
        sharded = signals[0][1]
        new = [sig for sig, _ in signals]
        skip, distance = False, None
        if self._forced(step, self.settings.warmup) or self._prev is None:
            self._acc = 0.0
        elif self.settings.threshold > 0:
            distance = self._relative(new, sharded)
            self._acc += rescaled(self.settings.coefficients, distance)
            skip = self._acc < self.settings.threshold
        self._prev = new  # the signal of every step, skipped or not (as published)
        if skip:
            return self._reuse(states, step, distance)
        self._acc = 0.0
        return self._compute(dit, states, 0, step, distance)

    def _fbcache(self, dit, states: list, step: int) -> list:
        firsts = [dit.run_blocks(s, 0, 1) for s in states]
        r1 = [f.img - s.img for f, s in zip(firsts, states)]
        skip, distance = False, None
        if not self._forced(step, 1) and self.settings.threshold > 0:
            distance = self._relative(r1, True)
            skip = distance < self.settings.threshold
        if skip:
            return self._reuse(firsts, step, distance)
        self._prev = r1  # the first block's residual of the last computed step
        return self._compute(dit, firsts, 1, step, distance)

    def _reuse(self, states: list, step: int, distance: float | None) -> list:
        self.skipped.append(step)
        self.distances.append(distance)
        return [dataclasses.replace(s, img=s.img + r) for s, r in zip(states, self._residual)]

    def _compute(self, dit, states: list, start: int, step: int, distance: float | None) -> list:
        out = [dit.run_blocks(s, start, None) for s in states]
        self._residual = [o.img - s.img for o, s in zip(out, states)]
        self.computed.append(step)
        self.distances.append(distance)
        return out
