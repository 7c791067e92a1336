"""What `python -m launcher plan` prints: the plan as a table (``format_plan``) or as JSON values
(``plan_to_dict``). Formatting only: every number comes from the resolved job (launcher/plan.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import DTYPES
from .memory_estimate import GIB

if TYPE_CHECKING:
    from parallel.topology import Topology

    from .plan import Plan

NOT_INCLUDED = ("CUDA context, NCCL buffers and allocator slack (the memory plan above counts them); "
                "text encoders (rank 0, before the DiT loads; the plan counts them with --with-text-encoder)")

# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _grid(g) -> str:
    return "x".join(map(str, g))


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _gib(n: int | None) -> str:
    return "     -" if n is None else f"{n / GIB:6.2f}"


def format_plan(plan: Plan) -> str:
    """The human-readable plan (what `plan` prints without --json)."""
    head = (
        f"{plan.preset}: {plan.height}x{plan.width}, {plan.frames} frames on {_gpus(plan.gpus)} "
        f"({plan.dtype}, {plan.heads} heads)"
    )
    sections = (_topology_lines(plan), _token_lines(plan), _memory_lines(plan))
    return "\n\n".join(["\n".join(lines) for lines in ([head], *sections)])


def _topology_lines(plan: Plan) -> list[str]:
    topo = plan.topology
    lines = [
        (
            f"valid topologies for {_gpus(plan.gpus)}, cfg {topo.cfg}, dp {topo.dp} "
            f"(ulysses must divide {plan.heads} heads):"
        ),
        "      dp  cfg  ring  ulysses",
    ]
    for t in plan.topologies:
        mark = "*" if t == topo else " "
        lines.append(f"  {mark} {t.dp:3d} {t.cfg:4d} {t.ring:5d} {t.ulysses:8d}   {t.sp_label}")
    lines.append(f"chosen: {topo.sp_label} (ulysses {topo.ulysses} x ring {topo.ring}), by {plan.reason}")
    return lines


def _token_lines(plan: Plan) -> list[str]:
    grids = f"latent {_grid(plan.latent_grid)} -> token grid {_grid(plan.token_grid)}"
    padded = f"{plan.topology.sp} x {plan.tokens_per_rank:,}"
    pad = f"padded sequence {plan.padded_tokens:,} = {padded}, {plan.pad_tokens:,} pad tokens"
    return [
        f"tokens: {grids} = {plan.image_tokens:,} image tokens, + {plan.text_tokens} text tokens",
        f"  per rank: {plan.tokens_per_rank:,} image tokens + the {plan.text_tokens} text tokens ({pad})",
    ]


def _memory_lines(plan: Plan) -> list[str]:
    mem, acts = plan.memory, plan.memory.activations
    if mem.vae_tiling == "off":
        vae = f"untiled, one pass over {_grid(mem.vae_tile)} latents, fp16"
    else:
        vae = f"{mem.vae_tiling} tiling, largest tile {_grid(mem.vae_tile)} latents, fp16"
    if mem.vae_weights is not None:
        vae += f", incl. {mem.vae_weights / GIB:.2f} VAE weights"
    placed = plan.placement.plan
    weights = f"{mem.dit_params:,} params x {DTYPES[plan.dtype].itemsize} B ({plan.dtype})"
    if placed.placement.streamed or placed.placement.fp8 != "off":
        weights = f"on the GPU as planned ({placed.label}) of {mem.dit_params:,} params"
    forward = f"{plan.tokens_per_rank:,} + {plan.text_tokens} tokens ({acts.peak_phase} phase of one block)"
    others = f"{mem.denoise / GIB:.2f} on the others"
    return [*_placement_lines(plan),
        "memory per rank, GiB (estimate):",
        f"  DiT weights      {_gib(mem.dit_weights)}  {weights}, on every rank",
        f"  DiT activations  {_gib(acts.peak)}  one forward at {forward}",
        *([f"  step cache       {_gib(mem.step_cache)}  the residuals and signals --cache keeps"] if mem.step_cache else []),
        f"  denoise          {_gib(mem.denoise)}  every rank",
        f"  VAE decode       {_gib(mem.decode)}  first rank of each dp replica, DiT freed: {vae}",
        f"  peak             {_gib(mem.writer_peak)}  first rank of each dp replica; {others}",
        *(f"  note: {n}" for n in mem.notes),
        f"  not included: {NOT_INCLUDED}",
    ]


def _placement_lines(plan: Plan) -> list[str]:
    m = plan.placement
    p = m.plan
    lines = [
        f"memory plan ({m.reason}):",
        f"  chosen: {p.label}",
        f"    peak {p.peak / GIB:.2f} GiB per GPU: resident weights {p.resident_weights / GIB:.2f}, streaming slots "
        f"{p.slots / GIB:.2f}, activations {p.activations / GIB:.2f}, "
        f"{f'step cache {p.step_cache / GIB:.2f}, ' if p.step_cache else ''}FP8 buffers {p.fp8_temp / GIB:.2f}, "
        f"{p.overhead.note()}; VAE decode {p.decode / GIB:.2f}, text encoders {p.text / GIB:.2f}",
        *_chunk_lines(plan), _text_line(plan),
    ]
    if m.fallback is not None:
        lines.append(f"  after an out-of-memory error, once: {m.fallback.label} ({m.fallback.peak / GIB:.2f} GiB)")
    return lines + [""]


def _chunk_lines(plan: Plan) -> list[str]:
    chunk = plan.memory.activations.chunk_tokens
    if chunk is None:
        return []
    return [f"  token chunks: the blocks' norms, projections and MLP run {chunk:,} tokens at a time "
            f"({plan.chunks} chunks of this rank's {plan.tokens_per_rank:,} image tokens): same result, "
            f"the MLP's hidden [tokens, {plan.mlp_hidden:,}] held for one chunk only"]


def _text_line(plan: Plan) -> str:
    """The text phase (before the DiT loads): what it needs, counted or not."""
    p, overhead = plan.placement.plan, plan.placement.plan.overhead.total
    resident, streamed = plan.text_encoders
    if p.text:
        how = "the LLM streamed layer by layer" if p.placement.stream_text else "resident"
        return (f"  text phase: {p.text_phase / GIB:.2f} GiB per GPU (text encoders {p.text / GIB:.2f}, {how}, "
                f"+ runtime), before the DiT loads")
    if not resident:
        return "  text phase: the built-in text encoder (no weights on the GPU)"
    return (f"  text phase: not counted (random weights); the release's encoders need "
            f"{(resident + overhead) / GIB:.2f} GiB resident, {(streamed + overhead) / GIB:.2f} GiB with the LLM "
            f"streamed layer by layer (--with-text-encoder counts them)")


def plan_to_dict(plan: Plan) -> dict:
    """The plan as plain JSON values (what `plan --json` prints); sizes in bytes."""
    topo, mem = plan.topology, plan.memory

    def degrees(t: Topology) -> dict:
        return {"dp": t.dp, "cfg": t.cfg, "ring": t.ring, "ulysses": t.ulysses, "label": t.sp_label}

    return {
        "model": plan.preset, "height": plan.height, "width": plan.width, "frames": plan.frames,
        "gpus": plan.gpus, "dtype": plan.dtype, "heads": plan.heads,
        "topologies": [degrees(t) for t in plan.topologies],
        "chosen": {**degrees(topo), "source": plan.chosen.source, "reason": plan.reason},
        "tokens": {
            "latent_grid": list(plan.latent_grid), "token_grid": list(plan.token_grid),
            "image": plan.image_tokens, "per_rank": plan.tokens_per_rank, "padded": plan.padded_tokens,
            "pad": plan.pad_tokens, "text": plan.text_tokens,
        },
        "memory_bytes": {
            "dit_params": mem.dit_params, "dit_weights": mem.dit_weights,
            "activations": mem.activations.peak, "activations_phase": mem.activations.peak_phase,
            "denoise": mem.denoise, "vae_tiling": mem.vae_tiling, "vae_tile": list(mem.vae_tile),
            "vae_weights": mem.vae_weights, "vae_decode": mem.vae_decode, "decode": mem.decode,
            "writer_peak": mem.writer_peak, "other_ranks_peak": mem.denoise,
        },
        "notes": list(mem.notes),
        "memory_plan": {
            "reason": plan.placement.reason, "chosen": plan.placement.plan.to_dict(),
            "fallback": None if plan.placement.fallback is None else plan.placement.fallback.to_dict(),
            "chunks_per_rank": plan.chunks,
            "text_encoders": {"resident": plan.text_encoders[0], "llm_streamed": plan.text_encoders[1]},
        },
    }
