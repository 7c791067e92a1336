"""Run a function on N local processes joined by a gloo process group (multi-process CPU tests).

    results = run_ranks(fn, world_size=4, args=(...,), timeout=60)

``fn(rank, world_size, *args)`` runs in every process after ``parallel.mesh.init_distributed``
(gloo, a FileStore in a fresh temporary directory, so no port is ever contended) and must be a
module-level (picklable) function; its return values, one per rank, must be picklable too.

If any rank raises, :class:`RankFailure` is raised here with every failing rank's exception type,
message and traceback. If the ranks do not all finish within ``timeout`` seconds (a hang in a
collective, say), the processes are killed and :class:`RankTimeout` names the ranks that had not
reported. The process group itself gets ``pg_timeout`` seconds, shorter than ``timeout``, so a
stuck collective usually surfaces as that rank's own error first.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Spawned children import only what they need; fork would copy the parent's torch threads.
_CTX = mp.get_context("spawn")


@dataclass(frozen=True)
class RankError:
    rank: int
    type_name: str
    message: str
    traceback: str


class RankFailure(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> :class:`RankError`."""

    def __init__(self, errors: dict[int, RankError], world_size: int):
        self.errors = errors
        self.world_size = world_size
        parts = [f"{len(errors)} of {world_size} ranks failed"]
        for rank in sorted(errors):
            parts.append(f"--- rank {rank}: {errors[rank].type_name}\n{errors[rank].traceback}")
        super().__init__("\n".join(parts))


class RankTimeout(TimeoutError):
    """Not every rank finished in time (a hang); the processes were killed."""


def _worker(rank: int, world_size: int, init_file: str, pg_timeout: float, fn, args, results) -> None:
    import torch

    # Two cores shared by N processes: more intra-op threads only add contention.
    torch.set_num_threads(1)
    from parallel.mesh import init_distributed, teardown

    try:
        init_distributed(
            backend="gloo",
            device_type="cpu",
            timeout=pg_timeout,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
        )
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((rank, "error", RankError(rank, type(err).__name__, str(err), traceback.format_exc())))
    finally:
        try:
            teardown()
        except Exception:  # noqa: BLE001 - a broken group must not mask the real error
            pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 90.0,
    pg_timeout: float = 30.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results
    in rank order. Raises :class:`RankFailure` or :class:`RankTimeout`."""
    tmpdir = tempfile.mkdtemp(prefix="mp_util_")
    results = _CTX.Queue()
    procs = [
        _CTX.Process(
            target=_worker,
            args=(rank, world_size, os.path.join(tmpdir, "store"), pg_timeout, fn, tuple(args), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    reports: dict[int, tuple[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        reports = _collect(results, procs, world_size, timeout)
    finally:
        _stop(procs, graceful=len(reports) == world_size)
        shutil.rmtree(tmpdir, ignore_errors=True)
    errors = {r: v for r, (status, v) in reports.items() if status == "error"}
    if errors:
        raise RankFailure(errors, world_size)
    return [reports[r][1] for r in range(world_size)]


def _collect(results, procs, world_size: int, timeout: float) -> dict[int, tuple[str, Any]]:
    reports: dict[int, tuple[str, Any]] = {}
    suspects: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(reports) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(reports))
            raise RankTimeout(f"ranks {missing} did not finish within {timeout:.0f} s (hang?); reported: {sorted(reports)}")
        try:
            rank, status, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            # A rank killed without reporting (segfault, OOM kill) will never report. Wait one
            # more round before declaring it, in case its last message is still in the pipe.
            for r in suspects - set(reports):
                reports[r] = ("error", RankError(r, "ProcessDied", f"exit code {procs[r].exitcode}", ""))
            suspects = {r for r, p in enumerate(procs) if r not in reports and p.exitcode not in (None, 0)}
            continue
        reports[rank] = (status, value)
    return reports


def _stop(procs, graceful: bool) -> None:
    """Join finished processes; kill the rest at once (after a failure they are hung or stuck
    waiting for a rank that will never come)."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        p.join(timeout=5 if graceful else 0.5)
    for p in started:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
