"""Regional torch.compile of a DiT: each repeated block compiled in place, its attention left eager.

Regional rather than whole-model: a DiT is one block class repeated (HunyuanVideo: 20 double- and
40 single-stream blocks; Wan: 30 or 40 blocks), and torch._dynamo inlines nn modules, so a block's
parameters are graph inputs rather than constants and every block of a class runs the code
compiled for the first one. Compiling the 60 blocks of HunyuanVideo gives 4 graphs (two per block
class); the whole model would be one long trace for the same kernels.

The joint attention is never traced. ``compile_dit`` wraps the model's attention callable in
``torch.compiler.disable``: dynamo breaks the graph around the call, so each block compiles as two
regions, before attention (modulation, norms, q/k/v, RoPE) and after it (projection, MLP), and the
attention itself runs as it does eagerly: the parallel one's all-to-all and ring exchanges, its
kernel fallbacks, its host-side length checks. Hooks on a block (layer streaming's weight swaps)
run inside the compiled call; their owner marks them ``torch.compiler.disable`` so they run eagerly
too (parallel/streaming.py), and the regions read the parameters the hooks bound, at each call.

Nothing compiles here: ``block.compile`` is lazy, the regions compile at their first call (the
first denoising step), and ``CompileReport.finish`` reads what that cost from dynamo's counters.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_cache_dir(path: Path | None) -> None:
    """Keep inductor's on-disk caches (FX graph and autograd caches, Triton kernels) in ``path``
    (None: inductor's own choice, $TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_<user>). Inductor
    reads the variable whenever it looks a file up, so set it before the first compile."""
    if path is not None:
        os.environ[CACHE_ENV] = str(Path(path).resolve())


def compile_dit(model: nn.Module, blocks: list[tuple[str, nn.Module]], *,
                backend: str | Callable = "inductor") -> "CompileReport":
    """Compile each of ``blocks`` (``family.blocks(model)``: ``[(state-dict prefix, block)]``) in
    place and make ``model``'s attention opaque to the compiler. Call after the attention is final
    (``parallel.parallelize`` swaps it in) and after the blocks are placed (streamed, FP8).
    ``backend``: torch.compile's (tests also use "aot_eager", which splits the regions the same way
    without generating code)."""
    _fall_back_per_region()
    model.set_attention(torch.compiler.disable(model.attention))
    for _, block in blocks:
        # One shape per job (every rank's shard is padded to the same length, the text to the
        # family's length): specialising avoids symbolic-shape kernels a second shape would bring.
        block.compile(backend=backend, dynamic=False)
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    log.info("compile: %d DiT blocks with torch.compile (%s), attention eager; they compile in the first step",
             len(blocks), name)
    return CompileReport(blocks=len(blocks), backend=name, start=_counters())


def _fall_back_per_region() -> None:
    """A region that fails to compile runs eagerly instead of ending the job.

    Why dynamo's ``suppress_errors`` and not a try around the first call: a block is two frames,
    before and after its attention call, and the attention is a collective. suppress_errors falls
    back inside the frame that failed, running that frame's own code eagerly from its start, so
    every rank calls the attention exactly once per block whichever regions compiled. Catching the
    error around the block instead would run the block again after a failure in its second region:
    a second all-to-all on this rank alone, and the job hangs. A rank that falls back computes the
    same function in eager order (the results agree as compiled and eager runs do, within
    rounding) and says so in its log; no collective is added, so no rank waits on another's
    verdict. Errors at run time (not at compile time) still raise and end the job non-zero.

    The recompile limit stays at dynamo's default (8 per code object): blocks of one class share
    their compiled code (60 HunyuanVideo blocks: 4 graphs, none recompiled; streamed and resident
    blocks alike), and a job runs one shape, so a region compiles once per block class, and once
    more only where an out-of-memory fallback changes the blocks (FP8, another token chunk)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True


@dataclass
class CompileReport:
    """What compiling cost this rank: filled in by ``finish`` after the first prompt."""

    blocks: int
    backend: str
    start: dict[str, float] = field(repr=False)
    entry: dict | None = None

    def finish(self, step_s: list[float]) -> dict:
        """The record's ``compile`` entry, from the first prompt's step times (seconds); later
        calls return the same entry (the compile happened once, in the first step)."""
        if self.entry is None:
            now = _counters()
            delta = {k: now[k] - self.start[k] for k in now}
            self.entry = {
                "blocks": self.blocks,
                "backend": self.backend,
                "regions": int(delta["graphs"]),
                "failed_regions": int(delta["frames"] - delta["frames_ok"]),
                "compile_s": round(delta["compile_s"], 3),
                "first_step_extra_s": first_step_extra_s(step_s),
                "fx_graph_cache": {"hits": int(delta["fx_hits"]), "misses": int(delta["fx_misses"])},
                "cache_dir": _cache_dir() if self.backend == "inductor" else None,
            }
            self._log()
        return self.entry

    def _log(self) -> None:
        e = self.entry
        extra = "" if e["first_step_extra_s"] is None else f", first step {e['first_step_extra_s']:+.1f} s over the median"
        log.info("compile: %d blocks (%s) as %d regions, %.1f s compiling on this rank%s; cache %s (%d hits, "
                 "%d misses)", e["blocks"], e["backend"], e["regions"], e["compile_s"], extra, e["cache_dir"],
                 e["fx_graph_cache"]["hits"], e["fx_graph_cache"]["misses"])
        if e["failed_regions"]:
            log.warning("compile: %d region(s) failed to compile on this rank and run eagerly (dynamo's warning "
                        "above says why)", e["failed_regions"])


def first_step_extra_s(step_s: list[float]) -> float | None:
    """The first step's seconds less the median of the others: the compile's cost as the run saw it
    (an estimate: it includes the first-call warm-up an eager run pays too, and steps a step cache
    skipped lower the median). None for one step."""
    if len(step_s) < 2:
        return None
    return round(step_s[0] - statistics.median(step_s[1:]), 3)


def _counters() -> dict[str, float]:
    """Dynamo's and inductor's process-wide counters that ``finish`` reports as differences."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {
        "compile_s": sum(compilation_time_metrics.get("_compile.compile_inner", [])),
        "frames": counters["frames"]["total"],
        "frames_ok": counters["frames"]["ok"],
        "graphs": counters["stats"]["unique_graphs"],
        "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fx_misses": counters["inductor"]["fxgraph_cache_miss"],
    }


def _cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


__all__ = ["CompileReport", "compile_dit", "first_step_extra_s", "use_cache_dir"]
