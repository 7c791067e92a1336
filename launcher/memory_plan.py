"""The memory planner: how a job's weights, CFG passes and VAE tiles are placed so that every rank
stays under a GPU memory budget, at the least cost in speed and quality.

Knobs, from cheapest to dearest:

1. layer streaming of the last ``k`` DiT blocks from host memory (exact; the copies overlap the
   compute, so the cost is ~0 while a block's copy is shorter than a block's compute);
2. token chunking: the blocks' token-wise parts (norms, projections, the MLP) run over chunks of
   ``CHUNK_TOKENS`` tokens, so a block's peak is what its attention holds (exact: the same
   result; a few more kernel launches), for a family that supports it (``set_token_chunk``);
3. CFG passes one after the other on the same ranks instead of in parallel (cfg 2 -> 1: each rank
   holds half as many tokens);
4. the small VAE tiles (17x16x16 latents) instead of the release's (slower decode, ~3x less memory);
5. FP8 weights (float8 e4m3 with per-channel scales; lossy, see docs/BENCHMARKS.md), only when
   ``--fp8 auto`` allows it and nothing exact fits.

Per-rank denoise peak (bytes) = resident weights + streaming slots + activations (one forward at
this rank's tokens, chunked or not, ``dit_activations``) + what a step cache holds (``cache_bytes``)
+ FP8 temporaries + the runtime overhead
of the job's world size (``runtime_overhead``: CUDA context and allocator slack, plus NCCL's
buffers on N ranks). The decode peak (first rank of each replica, DiT freed) is the VAE's. The
text phase runs before the DiT is loaded and is freed: its peak (the encoders, the LLM's layers
streamed one by one when resident ones do not fit) is checked against the budget alone.

Named profiles fix the knobs instead: ``default`` (everything resident), ``light`` (stream half
the blocks, token chunks, small VAE tiles), ``extreme`` (stream every block, FP8 storage, token
chunks, small tiles, sequential CFG, streamed LLM).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from typing import Any

from torch import nn

import models
from models.fp8 import quantize_model, weight_bytes
from parallel.sequence import shard_length

from .config import DTYPES, ConfigError
from .memory_estimate import GIB, RuntimeOverhead, dit_activations, runtime_overhead

# Tokens per chunk when the planner (or a light / extreme profile) chunks: the token-wise parts'
# temporaries stay well under attention's own tensors at the sizes that need chunking (4 N x C
# held against 17 T x C), and the matmuls stay large (4096 x 3072 x 12288 at the 13B's widths).
CHUNK_TOKENS = 4096
PROFILES = ("default", "light", "extreme")
FP8_MODES = ("off", "auto", "storage", "matmul")
VAE_WEIGHT_ALLOWANCE = 250_000_000 * 2  # fp16 weights of a VAE its family did not measure


@dataclass(frozen=True, kw_only=True)
class Placement:
    """One combination of the knobs. ``streamed``: the last N DiT blocks live in host memory."""

    streamed: int = 0
    fp8: str = "off"  # off, storage, matmul
    cfg_degree: int = 1
    vae_tiling: str = "release"
    stream_text: bool = False
    prefetch: int = 1
    chunk_tokens: int | None = None  # the blocks' token-wise parts in chunks of this many tokens

    def label(self, blocks: int, dtype: str = "bf16") -> str:
        parts = [f"fp8-{self.fp8}" if self.fp8 != "off" else dtype]
        if self.streamed:
            parts.append(f"stream {self.streamed}/{blocks} blocks")
        if self.chunk_tokens:
            parts.append(f"token chunks of {self.chunk_tokens}")
        parts.append(f"cfg {'parallel' if self.cfg_degree == 2 else 'sequential'}")
        parts.append("untiled VAE" if self.vae_tiling == "off" else f"{self.vae_tiling} VAE tiles")
        if self.stream_text:
            parts.append("streamed LLM")
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """A placement and its per-rank estimate (bytes)."""

    placement: Placement
    resident_weights: int
    slots: int
    activations: int
    fp8_temp: int
    decode: int  # the VAE decode, its weights included
    step_cache: int = 0  # the image streams a step cache holds (cache_bytes)
    text: int
    blocks: int
    weights: int = 0  # every DiT weight in this placement's format, resident or streamed
    vae_weights: int = 0
    dtype: str = "bf16"  # the DiT's --dtype (the blocks' unless FP8)
    overhead: RuntimeOverhead  # of the job's world size

    @property
    def denoise(self) -> int:
        return self.resident_weights + self.slots + self.activations + self.step_cache + self.fp8_temp + self.overhead.total

    @property
    def text_phase(self) -> int:
        """The text encoders' peak (0 when only the weightless built-in one runs) with the overhead."""
        return self.text + self.overhead.total

    @property
    def peak(self) -> int:
        return max(self.denoise, self.decode + self.overhead.total, self.text_phase)

    @property
    def label(self) -> str:
        return self.placement.label(self.blocks, self.dtype)

    def decodes_beside_dit(self, limit: int | None) -> bool:
        """Whether the VAE decode fits under ``limit`` while the DiT stays placed (its activations
        freed): then each video is written as soon as its prompt is done. None: no limit (CPU)."""
        beside = self.resident_weights + self.slots + self.fp8_temp + self.decode + self.overhead.total
        return limit is None or beside <= limit

    def to_dict(self) -> dict:
        return {"label": self.label, "streamed_blocks": self.placement.streamed, "fp8": self.placement.fp8,
                "cfg": self.placement.cfg_degree, "vae_tiling": self.placement.vae_tiling,
                "stream_text": self.placement.stream_text, "peak_bytes": self.peak,
                "denoise_bytes": self.denoise, "resident_weight_bytes": self.resident_weights,
                "slot_bytes": self.slots, "activation_bytes": self.activations, "step_cache_bytes": self.step_cache,
                "chunk_tokens": self.placement.chunk_tokens, "text_bytes": self.text,
                "text_phase_bytes": self.text_phase, "runtime_overhead_bytes": self.overhead.to_dict()}


# --------------------------------------------------------------------------------------------
# Sizes from shapes (meta device)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DitSizes:
    """Bytes of the DiT's parts at a dtype: outside the blocks, and per block in execution order
    (``bf16`` and as FP8), plus the largest block linear's bf16 weight (the FP8 dequant buffer)."""

    other: int
    blocks: tuple[int, ...]
    blocks_fp8: tuple[int, ...]
    largest_linear: int


@functools.cache
def dit_sizes(preset: str, dtype: str) -> DitSizes:
    model = models.build_model(preset, device="meta", dtype=DTYPES[dtype])
    family = models.get_family(preset)
    blocks = [block for _, block in family.blocks(model)]
    plain = tuple(weight_bytes(blk) for blk in blocks)
    linears = [m.weight for blk in blocks for m in blk.modules() if isinstance(m, nn.Linear)]
    largest = max(w.numel() * w.element_size() for w in linears)
    other = weight_bytes(model) - sum(plain)
    # On the meta device: swaps the block linears for Float8Linear, no values.
    quantize_model(model, include=family.block_prefixes(model))
    return DitSizes(other=other, blocks=plain, blocks_fp8=tuple(weight_bytes(blk) for blk in blocks),
                    largest_linear=largest)


# --------------------------------------------------------------------------------------------
# Estimates and choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobShape:
    """What the planner needs to know of a job."""

    preset: str
    dit: Any  # the family's DiT config
    height: int
    width: int
    frames: int
    dtype: str
    world: int  # GPUs of the job
    dp: int
    cfg_degree: int
    ulysses: int
    ring: int
    text_llm: bool  # a real LLM text encoder will be loaded (--model-dir)
    cache_streams: int = 0  # image-stream tensors [S, C] the step cache holds (models.step_cache.held_streams)


def estimate(shape: JobShape, p: Placement) -> MemoryPlan:
    sizes = dit_sizes(shape.preset, shape.dtype)
    per_block = sizes.blocks_fp8 if p.fp8 != "off" else sizes.blocks
    n = len(per_block)
    resident = sizes.other + sum(per_block[: n - p.streamed])
    slots = (p.prefetch + 1) * max(per_block[n - p.streamed :]) if p.streamed else 0
    family = models.get_family(shape.preset)
    text_len = family.text.max_tokens
    tokens = math.prod(shape.dit.token_grid(shape.height, shape.width, shape.frames))
    local = shard_length(tokens, shape.ulysses * shape.ring)
    acts = dit_activations(
        image_tokens=local, text_tokens=text_len, hidden=shape.dit.hidden_size, mlp_hidden=shape.dit.mlp_hidden,
        ulysses=shape.ulysses, ring=shape.ring, dtype_bytes=DTYPES[shape.dtype].itemsize, chunk_tokens=p.chunk_tokens,
    ).peak
    fp8_temp = sizes.largest_linear if p.fp8 == "storage" else (local + text_len) * 4 * shape.dit.mlp_hidden if p.fp8 == "matmul" else 0
    latent = shape.dit.latent_grid(shape.height, shape.width, shape.frames)
    # A VAE the family measured counts its own weights; others get a generous allowance.
    vae_weights = family.vae.weight_bytes(shape.dit) if family.vae.calibrated(shape.dit) else VAE_WEIGHT_ALLOWANCE
    decode = family.vae.decode_bytes(latent, p.vae_tiling) + vae_weights
    text = family.text.weight_bytes(p.stream_text) if shape.text_llm else 0
    return MemoryPlan(placement=p, resident_weights=resident, slots=slots, activations=acts,
                      step_cache=cache_bytes(shape, local), fp8_temp=fp8_temp,
                      decode=decode, text=text, blocks=n, weights=sizes.other + sum(per_block),
                      vae_weights=vae_weights, dtype=shape.dtype, overhead=runtime_overhead(shape.world))


def cache_bytes(shape: JobShape, local_tokens: int) -> int:
    """What the step cache holds on a rank: ``shape.cache_streams`` image streams of this rank's
    tokens, in the DiT's dtype (fp32 where the family's stream is fp32 between blocks)."""
    if not shape.cache_streams:
        return 0
    spec = models.get_family(shape.preset).cache(shape.dit)
    width = 4 if spec.stream_fp32 else DTYPES[shape.dtype].itemsize
    return shape.cache_streams * local_tokens * shape.dit.hidden_size * width


def chunk_choices(preset: str) -> tuple[int | None, ...]:
    """Unchunked, then CHUNK_TOKENS where the family's DiT chunks its token-wise parts."""
    return (None,) if models.get_family(preset).set_token_chunk is None else (None, CHUNK_TOKENS)


def candidates(shape: JobShape, fp8: str, tiling: str = "auto") -> list[Placement]:
    """Placements in order of cost, for the shape's CFG degree (the caller tries cfg 2, then 1):
    the first that fits wins. Rungs: FP8 mode, then VAE tiling, then token chunking; within a
    rung, k = 0, 1, ... streamed blocks (streaming is the cheapest knob while copies overlap the
    compute). ``tiling``: the user's --vae-tiling (auto: the family's tilings, fastest first)."""
    n = len(dit_sizes(shape.preset, shape.dtype).blocks)
    modes = (["off"] if fp8 in ("off", "auto") else [fp8]) + (["storage"] if fp8 == "auto" else [])
    tilings = models.get_family(shape.preset).vae.tilings if tiling == "auto" else (tiling,)
    rungs = [Placement(fp8=m, cfg_degree=shape.cfg_degree, vae_tiling=t, chunk_tokens=c)
             for m in modes for t in tilings for c in chunk_choices(shape.preset)]
    return [replace(r, streamed=k) for r in rungs for k in range(n + 1)]


def profile_placement(profile: str, shape: JobShape) -> Placement:
    """The fixed placement of a named profile (its CFG degree is the shape's)."""
    n = len(dit_sizes(shape.preset, shape.dtype).blocks)
    tilings = models.get_family(shape.preset).vae.tilings
    chunk = chunk_choices(shape.preset)[-1]
    if profile == "default":
        return Placement(cfg_degree=shape.cfg_degree, vae_tiling=tilings[0])
    if profile == "light":
        return Placement(streamed=n // 2, cfg_degree=shape.cfg_degree, vae_tiling=tilings[-1], chunk_tokens=chunk)
    if profile == "extreme":
        return Placement(streamed=n, fp8="storage", cfg_degree=shape.cfg_degree, vae_tiling=tilings[-1],
                         stream_text=shape.text_llm, chunk_tokens=chunk)
    raise ConfigError(f"--memory-profile {profile!r}; valid: {', '.join(PROFILES)}")


def _fits(shape: JobShape, p: Placement, budget: int) -> MemoryPlan | None:
    """``p`` as it is, else with the LLM streamed, if either fits ``budget``."""
    for stream_text in sorted({p.stream_text, True}):
        plan = estimate(shape, replace(p, stream_text=stream_text))
        if plan.peak <= budget:
            return plan
    return None


def choose(shape: JobShape, budget: int, fp8: str = "auto", tiling: str = "auto") -> tuple[MemoryPlan, MemoryPlan | None]:
    """The cheapest plan whose peak fits ``budget`` bytes, and the one to fall back to after an
    out-of-memory error: the next plan that needs at least 10% (and 1 GiB) less, or None.
    Raises ConfigError with the smallest estimate when nothing fits."""
    chosen = None
    for p in candidates(shape, fp8, tiling):
        plan = _fits(shape, p, budget)
        if plan is None:
            continue
        if chosen is None:
            chosen = plan
        elif plan.peak <= chosen.peak - max(GIB, chosen.peak // 10):
            return chosen, plan
    if chosen is None:
        lossy = "storage" if fp8 != "off" else "off"
        best = min((estimate(shape, replace(p, stream_text=shape.text_llm)) for p in candidates(shape, lossy, tiling)),
                   key=lambda m: m.peak)
        raise ConfigError(
            f"--max-gpu-memory {budget / GIB:.1f}GiB: nothing fits; the smallest plan ({best.label}) "
            f"needs {best.peak / GIB:.1f} GiB per GPU (resident weights {best.resident_weights / GIB:.1f}, "
            f"activations {best.activations / GIB:.1f}, runtime {best.overhead.total / GIB:.2f}; VAE decode "
            f"{best.decode / GIB:.1f}, text encoders {best.text / GIB:.1f}, each + runtime); use more GPUs, "
            f"a smaller size{'' if fp8 == 'auto' else ', or --fp8 auto'}"
        )
    return chosen, None


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|mib|mb|g|m)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'24GiB', '24G', '22.5gib', '24000MiB' -> bytes (G = GiB: GPUs are sold in GiB). 'GB' is
    decimal."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-gpu-memory {text!r}: expected a size such as 24GiB or 12000MiB")
    value, unit = float(m.group(1)), (m.group(2) or "gib").lower()
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    if value <= 0:
        raise ConfigError(f"--max-gpu-memory {text!r}: must be positive")
    return int(value * scale)


# --------------------------------------------------------------------------------------------
# One job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobMemory:
    """What a job runs with: the plan, the fallback after an OOM (or None), the topology of the
    plan's CFG degree, the budget (bytes, None = no cap) and why."""

    plan: MemoryPlan
    fallback: MemoryPlan | None
    topology: object  # parallel.topology.ResolvedTopology
    budget: int | None
    reason: str
    limit: int | None = None  # what it planned against: the budget, else the GPU's memory

def _fixed(cfg, shape: JobShape) -> Placement:
    """The profile's placement with the explicit flags applied over it."""
    p = profile_placement(cfg.memory_profile or "default", shape)
    if cfg.stream_blocks is not None:
        n = len(dit_sizes(shape.preset, shape.dtype).blocks)
        if cfg.stream_blocks > n:
            raise ConfigError(f"--stream-blocks {cfg.stream_blocks}: the {shape.preset} DiT has {n} blocks")
        p = replace(p, streamed=cfg.stream_blocks)
    if cfg.fp8 in ("storage", "matmul"):
        p = replace(p, fp8=cfg.fp8)
    if cfg.vae_tiling != "auto":
        p = replace(p, vae_tiling=cfg.vae_tiling)
    if cfg.chunk_tokens is not None:
        if models.get_family(shape.preset).set_token_chunk is None and cfg.chunk_tokens:
            raise ConfigError(f"--chunk-tokens: the {shape.preset} DiT does not run its blocks in token chunks")
        p = replace(p, chunk_tokens=cfg.chunk_tokens or None)
    return replace(p, prefetch=cfg.prefetch)


def plan_job(cfg, shape_for: Callable[[int], tuple[JobShape, object]], cfg_options: list[int],
             device_memory: int | None) -> JobMemory:
    """The memory plan of a `generate` job (every rank computes the same one, before any
    collective). ``shape_for(cfg_degree)`` gives the job's shape and resolved topology for a CFG
    degree; ``cfg_options`` the degrees allowed (the user's, or 2 then 1); ``device_memory`` the
    GPU's total bytes (None on CPU). Explicit knobs (a profile, --stream-blocks, --fp8 storage or
    matmul, --chunk-tokens) are taken as given and only checked against a budget; otherwise the planner chooses
    under --max-gpu-memory, or under the GPU's own memory."""
    fixed = (cfg.memory_profile is not None or cfg.stream_blocks is not None or cfg.fp8 in ("storage", "matmul")
             or cfg.chunk_tokens is not None)
    budget = cfg.max_gpu_memory
    if fixed:
        shape, topo = shape_for(cfg_options[0])
        plan = estimate(shape, _fixed(cfg, shape))
        if budget is not None and plan.peak > budget:
            raise ConfigError(f"--max-gpu-memory {budget / GIB:.1f}GiB: the requested placement ({plan.label}) "
                              f"needs {plan.peak / GIB:.1f} GiB per GPU; leave the knobs to the planner")
        return JobMemory(plan, None, topo, budget, "explicit flags" if cfg.memory_profile is None
                         else f"profile {cfg.memory_profile}", budget if budget is not None else device_memory)
    limit = budget if budget is not None else device_memory
    if limit is None:  # no budget and no GPU memory to plan for (the CPU, or `plan` without a budget)
        shape, topo = shape_for(cfg_options[0])
        tiling = models.get_family(shape.preset).vae.tilings[0] if cfg.vae_tiling == "auto" else cfg.vae_tiling
        return JobMemory(estimate(shape, Placement(cfg_degree=shape.cfg_degree, prefetch=cfg.prefetch,
                                                   vae_tiling=tiling)), None, topo, None,
                         "no budget: everything resident")
    error = None
    for degree in cfg_options:
        shape, topo = shape_for(degree)
        try:
            plan, fallback = choose(shape, limit, "auto" if cfg.fp8 == "auto" else "off", cfg.vae_tiling)
        except ConfigError as err:
            error = err
            continue
        plan, fallback = (replace(m, placement=replace(m.placement, prefetch=cfg.prefetch)) if m else None
                          for m in (plan, fallback))
        why = f"budget {limit / GIB:.1f} GiB" if budget is not None else f"GPU memory {limit / GIB:.1f} GiB"
        return JobMemory(plan, fallback, topo, budget, why, limit)
    raise error
