"""`generate` on one process or under torchrun: validate, build the mesh, denoise shards,
gather, decode on each replica's first rank, write.

Order matters for failure behaviour: everything that can reject the job (arguments, topology,
output paths, weight folders, the DiT checkpoint's keys and shapes) runs on every rank before the
first collective, so every rank exits with the same message instead of some ranks hanging. After
that, every collective has the job's timeout, and torchrun ends all ranks when one fails.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import secrets
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from models.compile import compile_dit, use_cache_dir
from models.sampling import TextConditioning, cached_velocities, classifier_free, euler_loop, guided_velocity, model_velocity
from models.step_cache import StepCache
from parallel.mesh import SP_AXES, MeshAxis, ParallelMesh, build_parallel_mesh, init_distributed, teardown
from parallel.placement import NodeShare, node_share_name
from parallel.parallelize import SequenceShard, cache_reduce, cfg_parallel_velocity, parallelize
from parallel.backends import text_problem

from . import faults as fault_injection
from . import pipeline as ph
from .config import ConfigError, RunConfig
from .memory_plan import MemoryPlan
from .record import PhaseTimer, device_used_bytes
from .outputs import ALLOC_CONF_VARS, VideoWriter
from .resolve import ResolvedJob, host_memory_bytes, output_paths, resolve_job

log = logging.getLogger("launcher")


@dataclass(frozen=True, kw_only=True)
class Job(ResolvedJob):
    """The resolved job on this rank (identical on every rank but for ``rank`` and the faults
    ``LAUNCHER_FAULT`` injects into it)."""

    rank: int
    faults: fault_injection.FaultPlan

    @classmethod
    def on_rank(cls, resolved: ResolvedJob, rank: int, faults: tuple = ()) -> "Job":
        return cls(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)}, rank=rank,
                   faults=fault_injection.FaultPlan(faults, rank))


def setup_logging(rank: int, world: int, all_ranks: bool) -> None:
    prefix = f"[rank {rank}] " if world > 1 else ""
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def validate_job(cfg: RunConfig, rank: int, world: int) -> tuple[Job, torch.nn.Module | None]:
    """Every check that can reject the job (the resolver's, then the DiT checkpoint's keys and
    shapes); no collective. Returns the job and the DiT with its checkpoint assigned on the meta
    device (or None)."""
    faults = fault_injection.from_env()  # a malformed LAUNCHER_FAULT is bad input like a flag
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = ph.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")), local_world)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    host = host_memory_bytes()
    # Several nodes (torchrun --nnodes, srun): Ulysses groups stay inside one, as `plan --nodes` shows.
    per_node = local_world if 1 < world and local_world < world and world % local_world == 0 else None
    resolved = resolve_job(cfg, world=world, device=device, device_memory=total, gpus_per_node=per_node,
                           host_memory_per_rank=None if host is None else host // local_world)
    loaded = ph.load_dit_weights(cfg.preset, cfg.model_dir, resolved.dtype, resolved.memory.plan.placement.fp8)
    return Job.on_rank(resolved, rank, faults), loaded


def run_generate(cfg: RunConfig) -> list[Path]:
    """The whole job on this rank; returns the videos this rank wrote."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging(rank, world, cfg.log_all_ranks)
    _expandable_segments_under_budget(cfg)
    use_cache_dir(cfg.compile_cache)  # before anything compiles
    job, loaded = validate_job(cfg, rank, world)
    if cfg.model_dir is None:
        log.info("weights: seeded random (no --model-dir): the video is noise")
    topo = job.topology
    source = f"table {job.table_path}" if topo.source == "table" else topo.source
    log.info("topology %s (%s): dp %d, cfg %d, ring %d, ulysses %d on %d rank(s)",
             topo.topology.sp_label, source, topo.topology.dp, topo.topology.cfg,
             topo.topology.ring, topo.topology.ulysses, job.world)
    mesh, failed = None, True
    try:
        if job.world > 1:
            info = init_distributed(device_type=job.device.type, timeout=cfg.timeout_s)
            mesh = build_parallel_mesh(topo.topology, device=info.device, timeout=cfg.timeout_s)
        if cfg.seed is None:
            job = _with_shared_seed(job, mesh)
        written = _run(job, loaded, mesh)
        failed = False
        return written
    finally:
        # After a failure other ranks may be inside a collective this rank never joins: a
        # graceful destroy would wait for them (until the timeout), so abort the communicators.
        if failed and mesh is not None:
            log.warning("rank %d ends early: aborting its communicators; torchrun ends the other ranks", job.rank)
        teardown(abort=failed)


def _with_shared_seed(job: Job, mesh: ParallelMesh | None) -> Job:
    """Rank 0 draws the seed; every rank gets it, so every rank draws the same noise."""
    seed = secrets.randbelow(2**31) if job.rank == 0 else None
    if mesh is not None:
        seed = mesh.broadcast_object(seed)
    log.info("seed %d (drawn by rank 0; pass --seed %d to repeat this run)", seed, seed)
    cfg = dataclasses.replace(job.cfg, seed=seed)
    paths = [output_paths(cfg, i) for i in range(len(cfg.prompts))]
    return dataclasses.replace(job, cfg=cfg, paths=paths)


def _run(job: Job, loaded, mesh: ParallelMesh | None) -> list[Path]:
    cfg = job.cfg
    timer = PhaseTimer(job.device)
    _cap_memory(job)
    with timer.phase("text_encode"):
        stream_text = job.memory.plan.placement.stream_text
        texts = list(cfg.prompts) + ([cfg.negative_prompt] if cfg.uses_cfg else [])
        conds = (ph.encode_prompts(job.family, job.dit, cfg.model_dir, texts, job.device, job.text_dtype,
                                   stream=stream_text) if job.rank == 0 else None)
        if mesh is not None:
            conds = mesh.broadcast_object(conds)
    problem = text_problem(cfg.attention, [int(c.mask.sum()) for c in conds], job.topology.topology.sp)
    if problem is not None:  # every rank holds the same conds: all raise alike, before any attention
        raise ConfigError(f"--attention {cfg.attention}: {problem}")
    plan, oom = job.memory.plan, None
    where = "per GPU" if job.device.type == "cuda" else "per GPU were it on one; this run is on the CPU"
    log.info("memory: %s (%s; estimate %.1f GiB %s)", plan.label, job.memory.reason, plan.peak / 2**30, where)
    writer = VideoWriter(job, mesh, timer)
    done = _already_done(job, mesh)
    try:
        _denoise_all(job, plan, loaded, conds, mesh, timer, writer.on_prompt(plan, None), done)
    except torch.OutOfMemoryError as err:
        oom = str(err).split("\n")[0]
        if job.memory.fallback is None:
            raise ph.RankFailure(f"{oom}; no lighter memory plan to fall back to ({job.memory.reason}): give a "
                                 "smaller --max-gpu-memory for a lighter plan, or use more GPUs") from err
    if oom is not None:  # outside the except block, so the failed attempt's tensors are freed
        plan = job.memory.fallback
        writer.release()
        _agree_after_oom(job, mesh, oom)
        log.warning("CUDA out of memory (%s); falling back once to: %s (estimate %.1f GiB per GPU)",
                    oom, plan.label, plan.peak / 2**30)
        loaded = ph.load_dit_weights(cfg.preset, cfg.model_dir, job.dtype, plan.placement.fp8)  # consumed
        _denoise_all(job, plan, loaded, conds, mesh, timer, writer.on_prompt(plan, oom), writer.done | done)
    written = writer.finish()  # the videos held back until the DiT was freed, if any
    if mesh is not None:
        mesh.barrier()  # other ranks wait (with the timeout) for the writers
    return written


def _already_done(job: Job, mesh: ParallelMesh | None) -> set[int]:
    """--skip-existing: the prompts whose record exists, as rank 0 sees them (every rank skips the
    same ones, also where the ranks' views of the file system differ)."""
    if not job.cfg.skip_existing:
        return set()
    done = {i for i, p in enumerate(job.paths) if p["record"].is_file()} if job.rank == 0 else None
    if mesh is not None:
        done = mesh.broadcast_object(done)
    if done and job.rank == 0:
        log.info("--skip-existing: %d of %d prompts already have their record; skipping them",
                 len(done), len(job.paths))
    return done


def _denoise_all(job: Job, plan: MemoryPlan, loaded, conds, mesh: ParallelMesh | None, timer: PhaseTimer,
                 finished, skip: set[int] = frozenset()) -> None:
    """Place the DiT as ``plan`` says and denoise this replica's prompts but ``skip``, calling
    ``finished(i, latents [1, C, T, h, w] on the CPU, step seconds, host store kind, attention,
    step-cache record or None, compile entry or None)`` after each. The placement is torn down
    however this ends."""
    cfg = job.cfg
    with timer.phase("load_dit"):
        model, placed = ph.build_dit(job.family, cfg.preset, loaded, job.device, job.dtype, plan.placement,
                                     _node_share(job, mesh))
    try:
        grid = job.token_grid
        shard = parallelize(model, mesh, num_tokens=job.num_tokens, backend=cfg.attention, kernel=cfg.attention_kernel)
        if shard.attention.backend == "model":  # one rank on the CPU: nothing to shard
            log.info("attention: the model's own SDPA (one sequence-parallel rank on the CPU)")
        else:
            log.info("attention: %s, kernel %s%s", shard.attention.backend, shard.attention.kernel,
                     f" ({shard.attention.note})" if shard.attention.note else "")
        compiled = compile_dit(model, job.family.blocks(model)) if cfg.compile else None  # after parallelize
        cos, sin = model.rope(grid)
        rope = (shard.shard(cos, 0).to(job.device), shard.shard(sin, 0).to(job.device))
        dp_rank = mesh.local_rank(MeshAxis.DP) if mesh is not None else 0
        for i in range(dp_rank, len(cfg.prompts), cfg.dp):
            if i in skip:  # finished before an OOM fallback
                continue
            cache = StepCache(job.cache, cfg.steps, shard.local_valid, cache_reduce(mesh)) if job.cache.on else None
            with timer.phase("denoise"):
                tokens, step_s = denoise_one(job, model, shard, rope, conds, i, mesh, cache)
            latents = ph.tokens_to_latents(job.family, job.dit, tokens.cpu(), (cfg.height, cfg.width, cfg.frames))
            if cache is not None:
                log.info("step cache %s (threshold %g): %d of %d steps computed, skipped %s", cache.settings.kind,
                         cache.settings.threshold, len(cache.computed), cfg.steps, cache.skipped or "none")
            finished(i, latents, step_s, placed.host_kind, shard.current_attention(),
                     None if cache is None else cache.record(),
                     None if compiled is None else compiled.finish(step_s))
    finally:
        placed.close()
        del model
        if job.device.type == "cuda":
            torch.cuda.empty_cache()


def _node_share(job: Job, mesh: ParallelMesh | None) -> NodeShare | None:
    """Ranks of a node share one host copy of the streamed blocks (local rank 0 writes it)."""
    if mesh is None:
        return None
    return NodeShare(name=node_share_name("dit"), writer=int(os.environ.get("LOCAL_RANK", "0")) == 0,
                     barrier=mesh.barrier, agree=mesh.all_true)


def _expandable_segments_under_budget(cfg: RunConfig) -> None:
    """Under a budget the allocator is capped, and with fixed-size segments the freed blocks of
    odd sizes strand memory below the cap (1.2 GiB measured at 24 GiB, enough to run out of memory
    with 1 GiB to spare). Expandable segments map pages as needed instead. Set before CUDA starts;
    an allocator configuration the user set wins."""
    if cfg.max_gpu_memory is None or torch.cuda.is_initialized():
        return
    if not any(v in os.environ for v in ALLOC_CONF_VARS):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _cap_memory(job: Job) -> None:
    """Hold the caching allocator under the budget, less what lives outside it: the context and
    NCCL buffers now, or the plan's context allowance if larger (CUDA loads kernel modules lazily,
    so the context grows after this point), and the plan's NCCL allowance for peer buffers
    connected later (none for one process). So the budget is real."""
    if job.memory.budget is None or job.device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(job.device).total_memory
    overhead = job.memory.plan.overhead
    now = device_used_bytes(job.device) - torch.cuda.memory_reserved(job.device)
    outside = max(now, overhead.context)
    later = overhead.nccl
    allowed = job.memory.budget - outside - later
    torch.cuda.set_per_process_memory_fraction(max(allowed, 0) / total, job.device)
    log.info("GPU memory budget %.2f GiB: allocator capped at %.2f GiB (%.2f GiB outside it)",
             job.memory.budget / 2**30, allowed / 2**30, (outside + later) / 2**30)


OOM_AGREE_S = 30.0  # how long a rank that ran out of memory waits for the others to say they did too


def _agree_after_oom(job: Job, mesh: ParallelMesh | None, oom: str) -> None:
    """Fall back only together. Every rank that ran out of memory says so through the rendezvous
    store and waits (up to ``OOM_AGREE_S``, or the job's timeout if shorter) for all of them to
    say the same: the usual case, the same shapes failing at the same allocation on every rank.
    A rank that did not run out is blocked inside a collective this one will never join, so it
    cannot answer: the job then ends now, non-zero, instead of at the collective timeout."""
    gc.collect()
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    if mesh is None:
        return
    wait = min(OOM_AGREE_S, job.cfg.timeout_s)
    missing = mesh.flag_from_every_rank("out-of-memory", wait)
    if missing:
        raise ph.RankFailure(f"{oom}; rank(s) {', '.join(map(str, missing))} did not run out of memory within "
                             f"{wait:.0f} s, and the fallback needs every rank: ending the job")
    mesh.barrier()


def denoise_one(job: Job, model, shard: SequenceShard, rope, conds: list[TextConditioning], i: int, mesh,
                cache: StepCache | None = None):
    """Prompt `i` from its seeded noise to the whole sequence of denoised tokens `[1, S, F]`,
    and the seconds of each step (the NaN check syncs the device, so they are real times).
    ``cache``: this prompt's step cache (its reduce over this rank's replica), None: every step."""
    cfg, device = job.cfg, job.device
    guidance = job.guidance
    cond = conds[i].to(device)
    negative = conds[-1].to(device) if cfg.uses_cfg else None
    if mesh is not None and mesh.size(MeshAxis.CFG) == 2:
        mine = cond if mesh.local_rank(MeshAxis.CFG) == 0 else negative
        if cache is None:
            own = model_velocity(model, rope, mine, guidance)
        else:  # one branch on this rank; the cache's sums span both CFG ranks
            branch = cached_velocities(model, rope, [mine], guidance, cache)
            own = lambda x, t: branch(x, t)[0]  # noqa: E731
        velocity = cfg_parallel_velocity(own, mesh, partial(classifier_free, scale=cfg.cfg_scale))
    else:
        velocity = guided_velocity(model, rope, cond, embedded_guidance=guidance, negative=negative,
                                   cfg_scale=cfg.cfg_scale, cache=cache)
    velocity = job.faults.wrap(velocity)  # LAUNCHER_FAULT: fired at the start of a step
    size = (cfg.height, cfg.width, cfg.frames)
    noise = ph.noise_tokens(job.family, job.dit, size, cfg.seed + i, cfg.noise, device, job.text_dtype)
    tokens = shard.shard(noise).to(device)
    with tqdm(total=cfg.steps, desc=f"prompt {i + 1}/{len(cfg.prompts)}", unit="step",
              disable=job.rank != 0, leave=False) as bar:

        marks = [time.perf_counter()]

        def on_step(step: int, x: torch.Tensor) -> None:
            finite = bool(torch.isfinite(x).all()) if mesh is None else mesh.all_finite(x, SP_AXES)
            if not finite:
                raise ph.NonFiniteLatents(f"NaN or Inf in the latents after denoising step {step + 1} of {cfg.steps}")
            shard.agree_on_kernel(mesh)  # a kernel that failed on one rank: all ranks move on together
            marks.append(time.perf_counter())
            bar.update(1)

        with torch.inference_mode():
            out = euler_loop(tokens, velocity, job.family.scheduler(steps=cfg.steps, shift=cfg.flow_shift), on_step)
            return shard.gather(out), [b - a for a, b in zip(marks, marks[1:])]
