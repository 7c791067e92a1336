"""RunConfig: what one `generate` job does, validated before any model or process group exists.

Every rank builds the same RunConfig from the same arguments and runs the same checks, so bad
input makes every rank exit with the same message instead of some ranks hanging in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The one dtype table: flag value -> torch dtype (bytes per element: ``dtype.itemsize``).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOISE_SOURCES = ("cpu", "release")  # models.sampling.initial_noise
DEVICES = ("auto", "cpu", "cuda")
VAE_TILINGS = ("auto", "release", "small", "off")  # the HunyuanVideo family's; a family lists its own


class ConfigError(ValueError):
    """Bad user input; the message says what is wrong and what would be valid."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    preset: str
    model_dir: Path | None
    random_weights: bool = False  # no --model-dir on a released preset: said, not silent
    prompts: tuple[str, ...]
    height: int
    width: int
    frames: int
    steps: int
    seed: int | None  # None: rank 0 draws one and every rank uses it
    guidance: float
    flow_shift: float
    output_dir: Path
    dtype: str = "auto"
    text_dtype: str = "auto"  # auto: fp16 on GPU (the release's --text-encoder-precision), fp32 on CPU
    noise: str = "cpu"  # "release": the release's GPU generator, so its seeds reproduce its videos
    device: str = "auto"
    save_latents: bool = False
    save_grid: bool = False
    overwrite: bool = False
    skip_existing: bool = False  # prompts whose record exists are done (a resubmitted batch job)
    fps: int = 24
    vae_tiling: str = "auto"
    negative_prompt: str | None = None
    cfg_scale: float = 1.0
    # Parallel degrees; None lets the topology table (or its rule) choose.
    ulysses: int | None = None
    ring: int | None = None
    cfg_degree: int | None = None
    dp: int = 1
    timeout_s: float = 600.0
    log_all_ranks: bool = False
    # Memory (launcher/memory_plan.py): a per-GPU budget in bytes and/or fixed knobs.
    max_gpu_memory: int | None = None
    memory_profile: str | None = None
    fp8: str = "off"
    stream_blocks: int | None = None
    prefetch: int = 1
    chunk_tokens: int | None = None  # the DiT's token-wise parts in chunks of this many tokens (0: off)
    # Step caching (models/step_cache.py): off, teacache, fbcache; None threshold: the family's default.
    cache: str = "off"
    cache_threshold: float | None = None
    # Benchmarking: another topology table, the SP attention backend, no VAE decode.
    topology_file: Path | None = None
    attention: str = "native"
    attention_kernel: str = "auto"  # native only: parallel.kernels (a failing one falls back at run time)
    no_video: bool = False
    # Regional torch.compile of the DiT's blocks (models/compile.py) and where inductor keeps its caches.
    compile: bool = False
    compile_cache: Path | None = None  # None: inductor's default ($TORCHINDUCTOR_CACHE_DIR or /tmp)

    @property
    def uses_cfg(self) -> bool:
        """Classic CFG with a negative pass (besides the embedded guidance)."""
        return self.negative_prompt is not None and self.cfg_scale != 1.0

    def __post_init__(self) -> None:
        validate(self)


def _nearest_multiples(value: int, m: int) -> str:
    lo = value // m * m
    return f"{m}" if lo == 0 else f"{lo} or {lo + m}"


def _nearest_frames(frames: int, step: int = 4) -> str:
    lo = max(1, (frames - 1) // step * step + 1)
    return f"{lo} or {lo + step}" if frames > 1 else f"1 or {1 + step}"


def parse_size(text: str) -> tuple[int, int]:
    """'720x1280' -> (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 720x1280")
    return int(parts[0]), int(parts[1])


def family_of(preset: str):
    """The model family of ``preset``; an unknown name is a ConfigError listing the valid ones."""
    from models import get_family, list_presets

    try:
        return get_family(preset)
    except ValueError:
        raise ConfigError(f"--preset {preset!r} is unknown; valid: {', '.join(list_presets())}") from None


def validate(cfg: RunConfig) -> None:
    """All checks on a RunConfig; raises ConfigError with one clear message."""
    family = family_of(cfg.preset)
    multiple, step = family.size_multiple, family.frame_step
    for name, v in (("height", cfg.height), ("width", cfg.width)):
        if v <= 0 or v % multiple:
            raise ConfigError(
                f"--size {cfg.height}x{cfg.width}: {name} {v} is not a positive multiple of "
                f"{multiple}; nearest valid {name}: {_nearest_multiples(max(v, 1), multiple)}"
            )
    if cfg.frames < 1 or (cfg.frames - 1) % step:
        raise ConfigError(
            f"--frames {cfg.frames}: the VAE needs {step}n+1 frames; nearest valid: {_nearest_frames(cfg.frames, step)}"
        )
    if cfg.steps < 1:
        raise ConfigError(f"--steps {cfg.steps}: must be at least 1")
    if cfg.seed is not None and not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"--seed {cfg.seed}: must be in [0, 2^63)")
    if cfg.flow_shift <= 0:
        raise ConfigError(f"--flow-shift {cfg.flow_shift}: must be > 0")
    if cfg.fps < 1:
        raise ConfigError(f"--fps {cfg.fps}: must be >= 1")
    tilings = ("auto", *family.vae.tilings, "off")
    if cfg.vae_tiling not in tilings:
        raise ConfigError(f"--vae-tiling {cfg.vae_tiling!r}; valid: {', '.join(tilings)}")
    if cfg.dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype {cfg.dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if cfg.text_dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--text-encoder-precision {cfg.text_dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if cfg.noise not in NOISE_SOURCES:
        raise ConfigError(f"--noise {cfg.noise!r}; valid: {', '.join(NOISE_SOURCES)}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"--device {cfg.device!r}; valid: {', '.join(DEVICES)}")
    if not cfg.prompts or any(not p.strip() for p in cfg.prompts):
        raise ConfigError("no prompt: give --prompt TEXT or --prompts-file FILE with one prompt per line")
    if cfg.cfg_degree not in (None, 1, 2):
        raise ConfigError(f"--cfg {cfg.cfg_degree}: valid: 1 (CFG passes one after the other) or 2 (in parallel)")
    if cfg.cfg_degree == 2 and not cfg.uses_cfg:
        raise ConfigError("--cfg 2 runs the negative pass on its own ranks: give --negative-prompt and --cfg-scale != 1")
    if cfg.skip_existing and (cfg.overwrite or cfg.seed is None):
        raise ConfigError("--skip-existing needs --seed (output names carry it) and excludes --overwrite")
    if cfg.dp < 1 or cfg.timeout_s <= 0:
        raise ConfigError(f"--dp {cfg.dp} / --timeout {cfg.timeout_s}: must be positive")
    _validate_memory(cfg)
    if cfg.model_dir is not None and not cfg.model_dir.is_dir():
        raise ConfigError(f"--model-dir {cfg.model_dir}: no such directory")
    _validate_weights(cfg, family)
    _validate_benchmarking(cfg)
    cache_settings(cfg, family)
    _validate_compile(cfg)


def _validate_compile(cfg: RunConfig) -> None:
    """--compile-cache must be a folder this process can write (or create): inductor would
    otherwise fail at the first step's compile, on whichever ranks see the path so."""
    path = cfg.compile_cache
    if path is None:
        return
    if not cfg.compile:
        raise ConfigError(f"--compile-cache {path} keeps --compile's kernels: give --compile too")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--compile-cache {path}: not a directory (a file is in the way); give a folder")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--compile-cache {path}: {existing} is not a folder this process can write")


def cache_settings(cfg: RunConfig, family):
    """The step cache ``cfg`` asks for, with the family's defaults (models.step_cache.CacheSettings)."""
    from models.step_cache import CacheSettings

    spec = family.cache(family.config(cfg.preset)) if family.cache is not None else None
    try:
        return CacheSettings.resolve(cfg.cache, cfg.cache_threshold, spec)
    except ValueError as err:
        raise ConfigError(str(err).replace("this model family", f"the {family.name} family")) from None


def _validate_weights(cfg: RunConfig, family) -> None:
    """A released preset runs the checkpoint a user downloaded; random weights only when asked."""
    if cfg.random_weights and cfg.model_dir is not None:
        raise ConfigError("--random-weights and --model-dir exclude each other: give one")
    if cfg.preset in family.released and cfg.model_dir is None and not cfg.random_weights:
        raise ConfigError(
            f"--preset {cfg.preset} is a released model: give --model-dir with its weights (see the README, "
            f"'Models and their weights'), or --random-weights to run it on seeded random weights (benchmarks)"
        )


def _validate_benchmarking(cfg: RunConfig) -> None:
    """The benchmarking flags' own checks (the backend's limits need the topology: job.py)."""
    from parallel.backends import BACKENDS

    if cfg.topology_file is not None and not cfg.topology_file.is_file():
        raise ConfigError(f"--topology {cfg.topology_file}: no such file")
    if cfg.attention not in BACKENDS:
        raise ConfigError(f"--attention {cfg.attention!r}; valid: {', '.join(BACKENDS)}")
    if cfg.attention_kernel != "auto" and cfg.attention != "native":
        raise ConfigError(f"--attention-kernel {cfg.attention_kernel} is for --attention native; "
                          f"{cfg.attention} runs its own kernels")
    if cfg.no_video and cfg.save_grid:
        raise ConfigError("--save-grid needs the decoded video; it cannot go with --no-video")


def _validate_memory(cfg: RunConfig) -> None:
    from models.chunking import MIN_CHUNK

    from .memory_plan import FP8_MODES, PROFILES

    if cfg.memory_profile is not None and cfg.memory_profile not in PROFILES:
        raise ConfigError(f"--memory-profile {cfg.memory_profile!r}; valid: {', '.join(PROFILES)}")
    if cfg.fp8 not in FP8_MODES:
        raise ConfigError(f"--fp8 {cfg.fp8!r}; valid: {', '.join(FP8_MODES)}")
    if cfg.fp8 == "auto" and cfg.max_gpu_memory is None:
        raise ConfigError("--fp8 auto lets the planner choose FP8 under --max-gpu-memory: give a budget, or "
                          "--fp8 storage / matmul")
    if cfg.stream_blocks is not None and cfg.stream_blocks < 0:
        raise ConfigError(f"--stream-blocks {cfg.stream_blocks}: must be >= 0")
    if cfg.prefetch < 1:
        raise ConfigError(f"--prefetch {cfg.prefetch}: must be >= 1")
    if cfg.chunk_tokens is not None and cfg.chunk_tokens != 0 and cfg.chunk_tokens < MIN_CHUNK:
        raise ConfigError(f"--chunk-tokens {cfg.chunk_tokens}: 0 (off) or at least {MIN_CHUNK} tokens")
    if cfg.max_gpu_memory is not None and cfg.max_gpu_memory <= 0:
        raise ConfigError(f"--max-gpu-memory {cfg.max_gpu_memory}: must be positive")


def read_prompts_file(path: Path) -> tuple[str, ...]:
    """One prompt per non-empty line; '#' starts a comment line. UTF-8, with or without the byte
    order mark some editors write (it would otherwise become part of the first prompt's text)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts-file {path}: cannot read it ({err})") from err
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ConfigError(f"--prompts-file {path}: holds no prompts (one per line expected)")
    return prompts
