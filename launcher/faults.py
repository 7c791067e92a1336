"""Fault injection, for the tests and for users who want to see what their cluster does when a
rank fails: ``LAUNCHER_FAULT=RANK:STEP:KIND[,RANK:STEP:KIND...]``, read once at start.

- RANK: a global rank, or ``*`` for every rank.
- STEP: the denoising step (from 1, counted over the whole job: a second prompt's first step
  comes after the first prompt's last, and a fallback's retry counts on) at whose start the
  fault fires, inside the step, where the other ranks are on their way into its collectives.
- KIND: ``exit`` (the process dies at once, exit code ``EXIT_CODE``, no cleanup: a crash),
  ``raise`` (an exception: the error path, communicators aborted), ``oom`` (a simulated CUDA
  out-of-memory error: the out-of-memory path, see ``launcher.job``), ``hang`` (the rank stops
  for good: the others fail at the collective timeout, ``--timeout``, and torchrun ends it; a
  single process has no collective to time out and hangs until it is killed).

A malformed value is a usage error on every rank before any collective (exit 2).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError
from .pipeline import RankFailure

ENV = "LAUNCHER_FAULT"
KINDS = ("exit", "raise", "oom", "hang")
EXIT_CODE = 17  # what an injected `exit` ends the process with
log = logging.getLogger("launcher")


class InjectedFault(RankFailure):
    """The exception of an injected ``raise``."""


@dataclass(frozen=True)
class Fault:
    rank: int | None  # None: every rank
    step: int
    kind: str

    def label(self) -> str:
        return f"{'*' if self.rank is None else self.rank}:{self.step}:{self.kind}"


def parse(spec: str) -> tuple[Fault, ...]:
    """``"1:3:exit,*:2:oom"`` -> faults; ConfigError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        if len(fields) != 3:
            raise ConfigError(f"{ENV}={spec!r}: {part!r} is not RANK:STEP:KIND (e.g. 1:3:exit)")
        rank, step, kind = fields
        if kind not in KINDS:
            raise ConfigError(f"{ENV}={spec!r}: kind {kind!r}; valid: {', '.join(KINDS)}")
        if not (rank == "*" or rank.isdigit()) or not step.isdigit() or int(step) < 1:
            raise ConfigError(f"{ENV}={spec!r}: {part!r}: RANK is a rank or *, STEP a step from 1")
        faults.append(Fault(None if rank == "*" else int(rank), int(step), kind))
    return tuple(faults)


def from_env() -> tuple[Fault, ...]:
    return parse(os.environ.get(ENV, ""))


class FaultPlan:
    """This rank's faults and its step count; ``at_step()`` runs at the start of every step."""

    def __init__(self, faults: tuple[Fault, ...], rank: int):
        self.faults = tuple(f for f in faults if f.rank in (None, rank))
        self.rank, self.step = rank, 0

    def at_step(self) -> None:
        self.step += 1
        for fault in self.faults:
            if fault.step == self.step:
                self._fire(fault)

    def wrap(self, velocity: Callable) -> Callable:
        """``velocity`` with the faults fired at the start of each call (one call per step)."""
        if not self.faults:
            return velocity

        def faulty(*args, **kwargs):
            self.at_step()
            return velocity(*args, **kwargs)

        return faulty

    def _fire(self, fault: Fault) -> None:
        what = f"{ENV} {fault.label()}: rank {self.rank} at step {self.step}"
        log.warning("%s: %s", what, {"exit": f"exiting with code {EXIT_CODE}", "raise": "raising",
                                    "oom": "simulating CUDA out of memory", "hang": "hanging"}[fault.kind])
        for handler in logging.getLogger().handlers:
            handler.flush()
        if fault.kind == "exit":
            os._exit(EXIT_CODE)
        if fault.kind == "raise":
            raise InjectedFault(what)
        if fault.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory ({what})")
        threading.Event().wait()  # hang: never set
