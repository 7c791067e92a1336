"""The one resolver: a run's arguments + the world size + the device's memory -> the job that runs.

Pure: no process group, no CUDA call, no weights (only cheap file checks). `generate` (on every
rank, before the first collective), `plan`, `slurm` and `sweep` all call :func:`resolve_job`, so
each rule and each message exists once and `plan` prints what `generate` will do:

    RunConfig (validated) --> family, DiT config, dtypes
      -> topology: the family's YAML table (or --topology), explicit degrees, the rule;
         Ulysses kept inside a node for multi-node jobs
      -> memory plan (launcher/memory_plan.py): placement, CFG degree, VAE tiles, budget
      -> attention backend limits, weight folders, output paths
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import ModelFamily, ModelInputError, get_family
from models.step_cache import held_streams
from parallel.backends import backend_problem
from parallel.topology import ResolvedTopology, TopologyError, TopologyTable
from parallel.topology_choice import explain, node_local, table_for

from .config import DTYPES, ConfigError, RunConfig, cache_settings
from .memory_plan import JobMemory, JobShape, plan_job


class JobTopologyError(ConfigError, TopologyError):
    """A topology that cannot run this job (a ConfigError for `generate`: exit code 2)."""


@dataclass(frozen=True, kw_only=True)
class ResolvedJob:
    """Everything decided about a job before it runs; every rank holds an identical one."""

    cfg: RunConfig
    family: ModelFamily
    dit: Any  # the family's DiT config
    world: int
    device: torch.device
    dtype: torch.dtype
    text_dtype: torch.dtype
    table: TopologyTable
    topology: ResolvedTopology
    reason: str  # why this topology
    memory: JobMemory
    paths: list[dict[str, Path]] | None  # per prompt; None until a seed exists

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return self.dit.token_grid(self.cfg.height, self.cfg.width, self.cfg.frames)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_grid)

    @property
    def guidance(self) -> float | None:
        """The embedded guidance scale the DiT takes, or None for a DiT without one."""
        embedded = self.family.guidance == "embedded" and getattr(self.dit, "guidance_embed", True)
        return self.cfg.guidance if embedded else None

    @property
    def table_path(self) -> str:
        return self.table.path

    @property
    def cache(self):
        """The step cache this job runs (``models.step_cache.CacheSettings``; kind "off": none)."""
        return cache_settings(self.cfg, self.family)

    @property
    def weight_files(self) -> list[dict] | None:
        """The files read from --model-dir (path and bytes), for the record; None without one."""
        if self.cfg.model_dir is None:
            return None
        fp8 = self.memory.plan.placement.fp8 != "off"
        return [{"path": str(f), "bytes": f.stat().st_size} for f in self.family.weight_files(self.cfg.model_dir, fp8, self.dit)]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def resolve_dtypes(cfg: RunConfig, device: torch.device, text_on_gpu: torch.dtype = torch.float16
                   ) -> tuple[torch.dtype, torch.dtype]:
    """(DiT dtype, text encoder dtype): auto = bf16 / the family's text dtype on GPU (the
    releases' precisions: HunyuanVideo's encoders fp16, Wan's umT5 bf16), fp32 on the CPU."""
    cuda = device.type == "cuda"
    dit = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    text = DTYPES[cfg.text_dtype] if cfg.text_dtype != "auto" else (text_on_gpu if cuda else torch.float32)
    return dit, text


def cfg_options(cfg: RunConfig, world: int) -> list[int]:
    """CFG degrees to try: the user's, else in parallel (2) when CFG is on and the ranks split
    evenly (beside the --ulysses / --ring the user gave: `--ulysses 2` on 2 ranks means one
    sequence-parallel group, CFG passes one after the other), then one after the other (1) if the
    planner finds 2 does not fit."""
    if cfg.cfg_degree is not None:
        return [cfg.cfg_degree]
    sp = (cfg.ulysses or 1) * (cfg.ring or 1)
    return [2, 1] if cfg.uses_cfg and world % (2 * cfg.dp * sp) == 0 else [1]


def choose_topology(cfg: RunConfig, dit, table: TopologyTable, world: int, cfg_degree: int,
                    gpus_per_node: int | None = None) -> tuple[ResolvedTopology, str]:
    """Degrees for this job and why: explicit flags, else the table's row, else the rule; on
    several nodes, Ulysses groups kept inside a node. Raises ConfigError."""
    try:
        chosen = table.resolve(height=cfg.height, width=cfg.width, frames=cfg.frames, world_size=world,
                               cfg=cfg_degree, dp=cfg.dp, ulysses=cfg.ulysses, ring=cfg.ring)
    except TopologyError as err:
        nodes = world // gpus_per_node if gpus_per_node else 1
        extra = f" (on {nodes} nodes ulysses must also divide --gpus-per-node {gpus_per_node})" if nodes > 1 else ""
        raise JobTopologyError(f"{err}{extra}") from None
    reason = explain(chosen, table, cfg.height, cfg.width, cfg.frames, cfg.ulysses, cfg.ring)
    if gpus_per_node is None or gpus_per_node >= world:
        return chosen, reason
    flags = " ".join(f"--{k} {v}" for k, v in (("ulysses", cfg.ulysses), ("ring", cfg.ring)) if v is not None)
    try:
        local, why = node_local(chosen, dit.num_heads, world // gpus_per_node, gpus_per_node,
                                flags if chosen.source == "explicit" else None)
    except TopologyError as err:
        raise JobTopologyError(str(err)) from None
    return local, why or reason


def check_output_dir(folder: Path) -> None:
    """--output-dir must be a folder this process can write, or creatable: checked before any
    step runs (a file there, or a read-only folder, would otherwise fail after the denoising)."""
    import os

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {folder}: exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing} (where it would be created)"
        raise ConfigError(f"--output-dir {folder}: the {what} is not writable")


# An mp4 of flat or slowly changing content takes about 0.1 bit per pixel and frame; real content
# more. Below this much free space the outputs surely do not fit, so the job is refused up front.
MP4_MIN_BITS_PER_PIXEL = 0.1
RECORD_BYTES = 4 * 1024  # a JSON record is 4-30 KiB


def min_output_bytes(cfg: RunConfig, dit) -> int:
    """A lower bound on the bytes a job writes: its latents exactly (fp32), its videos and grids
    at `MP4_MIN_BITS_PER_PIXEL`, its records."""
    per_prompt = RECORD_BYTES
    if cfg.save_latents or cfg.no_video:
        per_prompt += 4 * dit.in_channels * math.prod(dit.latent_grid(cfg.height, cfg.width, cfg.frames))
    if not cfg.no_video:
        pixels = cfg.height * cfg.width * (cfg.frames + (8 if cfg.save_grid else 0))
        per_prompt += int(pixels * MP4_MIN_BITS_PER_PIXEL / 8)
    return per_prompt * len(cfg.prompts)


def check_output_space(cfg: RunConfig, dit) -> None:
    """Refuse before any step runs when --output-dir's disk cannot hold even the least the job
    writes (a full disk would otherwise fail after the denoising)."""
    import shutil

    existing = next(p for p in (cfg.output_dir, *cfg.output_dir.parents) if p.exists())
    free, need = shutil.disk_usage(existing).free, min_output_bytes(cfg, dit)
    if free < need:
        raise ConfigError(f"--output-dir {cfg.output_dir}: {free / 2**10:,.0f} KiB free on its disk; "
                          f"{len(cfg.prompts)} prompt(s) at {cfg.height}x{cfg.width}x{cfg.frames} write at least "
                          f"{need / 2**10:,.0f} KiB")


def output_paths(cfg: RunConfig, index: int) -> dict[str, Path]:
    """Where prompt `index`'s files go; refuses up front to overwrite unless --overwrite."""
    from .video import output_stem

    stem = output_stem(cfg.prompts[index], cfg.seed + index)
    paths = {"video": cfg.output_dir / f"{stem}.mp4", "record": cfg.output_dir / f"{stem}.json"}
    if cfg.no_video:  # the latents are then the result
        del paths["video"]
    if cfg.save_latents or cfg.no_video:
        paths["latents"] = cfg.output_dir / f"{stem}.latents.safetensors"
    if cfg.save_grid:
        paths["grid"] = cfg.output_dir / f"{stem}.png"
    existing = [str(p) for p in paths.values() if p.exists()]
    # With --skip-existing a record means done, and files without one are a killed run's leftovers.
    if existing and not (cfg.overwrite or cfg.skip_existing):
        raise ConfigError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    return paths


def _plan_memory(cfg: RunConfig, dit, table: TopologyTable, world: int, dtype: torch.dtype,
                 device_memory: int | None, gpus_per_node: int | None, text_weights: bool):
    """The memory plan and the topology (and its reason) of the plan's CFG degree."""
    chosen: dict[int, tuple[ResolvedTopology, str]] = {}

    def shape_for(degree: int):
        chosen[degree] = choose_topology(cfg, dit, table, world, degree, gpus_per_node)
        t = chosen[degree][0].topology
        shape = JobShape(preset=cfg.preset, dit=dit, height=cfg.height, width=cfg.width, frames=cfg.frames,
                         dtype=dtype_name(dtype), world=world, dp=t.dp, cfg_degree=t.cfg, ulysses=t.ulysses,
                         ring=t.ring, text_llm=text_weights,
                         cache_streams=held_streams(cfg.cache, 2 if cfg.uses_cfg and t.cfg == 1 else 1))
        return shape, chosen[degree][0]

    memory = plan_job(cfg, shape_for, cfg_options(cfg, world), device_memory)
    return memory, chosen[memory.topology.topology.cfg][1]


def host_memory_bytes() -> int | None:
    """The machine's memory (MemTotal), or None where /proc/meminfo is not there."""
    from .record import proc_bytes

    return proc_bytes("/proc/meminfo", "MemTotal")


def check_host_memory(cfg: RunConfig, memory: JobMemory, available: int) -> None:
    """On the CPU the DiT's weights and activations live in host memory: refuse up front, with the
    estimate, what would otherwise be killed by the kernel minutes later."""
    plan = memory.plan
    need = plan.weights + plan.activations
    if need > available:
        gib = 2**30
        raise ConfigError(
            f"--preset {cfg.preset} at {cfg.height}x{cfg.width}x{cfg.frames} on the CPU needs about {need / gib:.1f} "
            f"GiB per process (weights {plan.weights / gib:.1f}, activations {plan.activations / gib:.1f}); this "
            f"machine has {available / gib:.1f} GiB per process: run it on GPUs, or take a smaller preset or size"
        )


def check_attention(cfg: RunConfig, num_tokens: int, topology: ResolvedTopology, device_type: str) -> None:
    """The --attention backend's limits (CUDA, package, SP size, even tokens)."""
    problem = backend_problem(cfg.attention, device_type=device_type, sp_size=topology.topology.sp,
                              num_tokens=num_tokens)
    if problem is not None:
        raise ConfigError(f"--attention {cfg.attention}: {problem}")


def resolve_job(cfg: RunConfig, *, world: int, device: torch.device, device_memory: int | None = None,
                gpus_per_node: int | None = None, check_files: bool = True,
                text_weights: bool | None = None, host_memory_per_rank: int | None = None) -> ResolvedJob:
    """The job ``cfg`` makes on ``world`` ranks of ``device`` type with ``device_memory`` bytes per
    GPU (None: no GPU to plan for; a --max-gpu-memory budget still is). ``gpus_per_node``: keep
    Ulysses inside a node (multi-node jobs). ``check_files``: the weight folders and output paths
    (off where the job runs elsewhere, e.g. a batch file rendered for a cluster). ``text_weights``:
    whether the family's real text encoder is loaded (default: with --model-dir).
    ``host_memory_per_rank``: on the CPU, the host memory each process may use. Raises ConfigError
    (or the family's ModelInputError) with the message every rank prints alike."""
    if world < 1:
        raise ConfigError(f"--gpus {world}: must be at least 1")
    family = get_family(cfg.preset)
    dit = family.config(cfg.preset)
    dtype, text_dtype = resolve_dtypes(cfg, device, family.text.dtype_on_gpu)
    if check_files and cfg.model_dir is not None:
        family.check_model_dir(cfg.model_dir, dit)
    if check_files:
        check_output_dir(cfg.output_dir)
        check_output_space(cfg, dit)
    # Output names carry the seed: without one they are checked once rank 0 has drawn it.
    paths = [output_paths(cfg, i) for i in range(len(cfg.prompts))] if check_files and cfg.seed is not None else None
    try:
        table = table_for(family.topology_path(cfg.preset), dit.num_heads, cfg.topology_file, model=f"preset {cfg.preset}")
    except TopologyError as err:
        raise JobTopologyError(str(err)) from None
    if text_weights is None:
        text_weights = cfg.model_dir is not None and family.text.has_weights(dit)
    memory, reason = _plan_memory(cfg, dit, table, world, dtype, device_memory, gpus_per_node, text_weights)
    check_attention(cfg, math.prod(dit.token_grid(cfg.height, cfg.width, cfg.frames)), memory.topology, device.type)
    if device.type == "cpu" and host_memory_per_rank is not None:
        check_host_memory(cfg, memory, host_memory_per_rank)
    return ResolvedJob(cfg=cfg, family=family, dit=dit, world=world, device=device, dtype=dtype,
                       text_dtype=text_dtype, table=table, topology=memory.topology, reason=reason, memory=memory,
                       paths=paths)


__all__ = ["ModelInputError", "ResolvedJob", "cfg_options", "choose_topology", "output_paths", "resolve_job"]
