"""`python -m launcher plan`: what a `generate` job would run on N GPUs, without GPUs.

No process group and no weights: the job is resolved by the same function `generate` runs on
every rank (``launcher/resolve.py``: topology, memory plan, validation and its messages), and the
token counts come from the family's token grid and ``parallel/sequence.py``'s padding.

    python -m launcher plan --size 720x1280 --frames 129 --gpus 4
    python -m launcher plan --model hunyuan-video-13b --gpus 8 --cfg 2 --json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from models.step_cache import CACHES
from models.chunking import token_spans
from parallel.sequence import padded_length, shard_length
from parallel.topology import ResolvedTopology, Topology, TopologyError, factorisations

from .config import DTYPES, VAE_TILINGS, ConfigError, RunConfig, family_of, parse_size
from .memory_plan import FP8_MODES, PROFILES, JobMemory, parse_memory
from .memory_estimate import MemoryEstimate, dit_activations
from .plan_output import format_plan, plan_to_dict
from .predict import assumptions, format_predictions, link_of, load_calibration, predict_all, prediction_dict
from .resolve import ResolvedJob, resolve_job


@dataclass(frozen=True, kw_only=True)
class Plan:
    """One job on ``gpus`` ranks: its topology and why, its tokens, its memory per rank."""

    preset: str
    height: int
    width: int
    frames: int
    gpus: int
    dtype: str
    heads: int
    topologies: tuple[Topology, ...]  # every valid one for gpus / cfg / dp, preferred first
    chosen: ResolvedTopology
    reason: str
    latent_grid: tuple[int, int, int]
    token_grid: tuple[int, int, int]
    image_tokens: int
    tokens_per_rank: int  # padding included
    padded_tokens: int  # tokens_per_rank x sequence-parallel size
    pad_tokens: int
    text_tokens: int
    memory: MemoryEstimate
    placement: JobMemory  # the memory plan generate runs with (the estimate above is its breakdown)
    mlp_hidden: int
    chunks: int  # token chunks of this rank's image tokens (1: unchunked)
    text_encoders: tuple[int, int]  # the family's real text encoders' GPU bytes: resident, LLM streamed

    @property
    def topology(self) -> Topology:
        return self.chosen.topology


@dataclass(frozen=True, kw_only=True)
class MemoryKnobs:
    """`plan`'s memory flags, as `generate` takes them."""

    max_gpu_memory: int | None = None
    memory_profile: str | None = None
    fp8: str = "off"
    stream_blocks: int | None = None
    chunk_tokens: int | None = None
    text_llm: bool = False  # count the family's real text encoder (generate with --model-dir)
    cache: str = "off"  # the step cache, whose held tensors the plan counts


def plan_config(*, preset: str, height: int, width: int, frames: int, dtype: str, cfg: int, dp: int,
                ulysses: int | None, ring: int | None, vae_tiling: str, knobs: MemoryKnobs | None,
                topology_file) -> RunConfig:
    """The RunConfig `generate` would build from these flags (validated the same way). The
    prompt and output folder are placeholders; cfg 2 stands for classic CFG (a negative pass)."""
    knobs = knobs or MemoryKnobs()
    return RunConfig(
        preset=preset, model_dir=None, random_weights=True, prompts=("plan",), height=height, width=width, frames=frames,
        steps=1, seed=0, guidance=6.0, flow_shift=7.0, output_dir=Path("."), dtype=dtype, vae_tiling=vae_tiling,
        negative_prompt="negative" if cfg == 2 else None, cfg_scale=2.0 if cfg == 2 else 1.0, cfg_degree=cfg,
        dp=dp, ulysses=ulysses, ring=ring, max_gpu_memory=knobs.max_gpu_memory, memory_profile=knobs.memory_profile,
        fp8=knobs.fp8, stream_blocks=knobs.stream_blocks, chunk_tokens=knobs.chunk_tokens, cache=knobs.cache,
        topology_file=None if topology_file is None else Path(topology_file),
    )


def make_plan(
    *,
    preset: str = "hunyuan-video-13b",
    height: int,
    width: int,
    frames: int,
    gpus: int,
    dtype: str = "bf16",
    cfg: int = 1,
    dp: int = 1,
    ulysses: int | None = None,
    ring: int | None = None,
    vae_tiling: str = "auto",
    memory_knobs: MemoryKnobs | None = None,
    topology_file: str | os.PathLike | None = None,
    gpus_per_node: int | None = None,
) -> Plan:
    """The plan of one job. Raises ConfigError (size, frames, preset, dtype, GPUs) or TopologyError
    with the same messages `generate` gives (both from ``resolve_job``)."""
    run = plan_config(preset=preset, height=height, width=width, frames=frames, dtype=dtype, cfg=cfg, dp=dp,
                      ulysses=ulysses, ring=ring, vae_tiling=vae_tiling, knobs=memory_knobs,
                      topology_file=topology_file)
    job = resolve_job(run, world=gpus, device=torch.device("cuda"), check_files=False, gpus_per_node=gpus_per_node,
                      text_weights=memory_knobs is not None and memory_knobs.text_llm)
    return plan_of(job)


def plan_of(job: ResolvedJob) -> Plan:
    """The `plan` view of a resolved job."""
    cfg, dit, topo = job.cfg, job.dit, job.topology.topology
    latent, n = dit.latent_grid(cfg.height, cfg.width, cfg.frames), job.num_tokens
    per_rank, padded = shard_length(n, topo.sp), padded_length(n, topo.sp)
    text = job.family.text.max_tokens
    return Plan(
        preset=cfg.preset, height=cfg.height, width=cfg.width, frames=cfg.frames, gpus=job.world, dtype=cfg.dtype,
        heads=dit.num_heads, topologies=factorisations(job.world, dit.num_heads, cfg=topo.cfg, dp=topo.dp),
        chosen=job.topology, reason=job.reason, latent_grid=latent, token_grid=job.token_grid, image_tokens=n,
        tokens_per_rank=per_rank, padded_tokens=padded, pad_tokens=padded - n, text_tokens=text,
        memory=estimate_memory(job, per_rank), placement=job.memory, mlp_hidden=dit.mlp_hidden,
        chunks=len(token_spans(per_rank, job.memory.plan.placement.chunk_tokens)),
        text_encoders=(job.family.text.weight_bytes(False), job.family.text.weight_bytes(True)),
    )


@functools.cache
def dit_parameter_count(preset: str) -> int:
    """Parameters of the preset's DiT, counted on the meta device (no memory, no weights)."""
    return sum(p.numel() for p in models.build_model(preset, device="meta").parameters())


def estimate_memory(job: ResolvedJob, local_tokens: int) -> MemoryEstimate:
    """Per-rank bytes of the denoise and decode phases: the memory plan `generate` runs with
    (``launcher/memory_plan.py``), broken down for the table; only the activations' phase is
    computed here again, by the planner's formula (``launcher/memory_estimate.py``)."""
    cfg, dit, topo, vae, plan = job.cfg, job.dit, job.topology.topology, job.family.vae, job.memory.plan
    acts = dit_activations(
        image_tokens=local_tokens, text_tokens=job.family.text.max_tokens, hidden=dit.hidden_size,
        mlp_hidden=dit.mlp_hidden, ulysses=topo.ulysses, ring=topo.ring, dtype_bytes=job.dtype.itemsize,
        chunk_tokens=plan.placement.chunk_tokens,
    )
    assert acts.peak == plan.activations, "plan and planner must share one activation model"
    tiling = plan.placement.vae_tiling
    latent = dit.latent_grid(cfg.height, cfg.width, cfg.frames)
    calibrated = vae.calibrated(dit)
    notes = [] if calibrated else [f"VAE decode: no measurements for the {cfg.preset!r} preset's VAE; not estimated"]
    if calibrated and vae.note(latent, tiling):
        notes.append(vae.note(latent, tiling))
    return MemoryEstimate(
        # On the GPU: the resident blocks, the streaming slots and FP8's dequantisation buffers.
        dit_params=dit_parameter_count(cfg.preset), dit_weights=plan.resident_weights + plan.slots + plan.fp8_temp,
        activations=acts, step_cache=plan.step_cache,
        vae_tiling=tiling, vae_tile=vae.tile_shape(latent, tiling),
        vae_weights=plan.vae_weights if calibrated else None,
        vae_decode=plan.decode - plan.vae_weights if calibrated else None, notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--preset", dest="preset", default="hunyuan-video-13b", help="DiT preset")
    p.add_argument("--size", help="HEIGHTxWIDTH in pixels, multiples of 16 (default: the preset's)")
    p.add_argument("--frames", type=int, help="4n+1 frames (default: the preset's)")
    p.add_argument("--gpus", type=int, help="GPUs (world size) the job would run on (default: --nodes x "
                   "--gpus-per-node)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (Ulysses stays inside one)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: all on one node)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="DiT weights and activations")
    p.add_argument("--cfg", type=int, choices=(1, 2),
                   help="2: classic CFG (negative prompt) with the two passes on separate ranks (default: 2 for "
                   "a preset that runs classic CFG, as Wan2.1, when the GPUs split evenly; else 1)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--ulysses", type=int, help="Ulysses degree (default: the topology table's choice)")
    p.add_argument("--ring", type=int, help="ring degree (default: the topology table's choice)")
    p.add_argument("--vae-tiling", default="auto", choices=VAE_TILINGS, help="auto = release")
    p.add_argument("--max-gpu-memory", help="per-GPU budget (e.g. 24GiB): show the placement generate would pick")
    p.add_argument("--memory-profile", choices=PROFILES, help="a fixed placement: default, light, extreme")
    p.add_argument("--fp8", default="off", choices=FP8_MODES, help="as generate's --fp8")
    p.add_argument("--stream-blocks", type=int, help="as generate's --stream-blocks")
    p.add_argument("--chunk-tokens", type=int, help="as generate's --chunk-tokens")
    p.add_argument("--cache", default="off", choices=CACHES, help="as generate's --cache (counts what the cache holds)")
    p.add_argument("--with-text-encoder", action="store_true",
                   help="count the release's LLM text encoder (generate with --model-dir)")
    p.add_argument("--topology", dest="topology_file", help="topology YAML instead of configs/topology/ (e.g. a "
                   "sweep's topology.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pred = p.add_argument_group("step-time prediction (--predict)")
    pred.add_argument("--predict", action="store_true",
                      help="predicted s/step, communication share and efficiency of every valid topology")
    pred.add_argument("--gpu-kind", default="NVIDIA H200", help="calibrated GPU kind (configs/calibration/)")
    pred.add_argument("--kernel", default="cudnn", help="attention kernel to price (cudnn, flash)")
    pred.add_argument("--intra-node-gbps", type=float,
                      help="GB/s per GPU inside a node (default: the calibration's NVLink rate; e.g. 25 for PCIe)")
    pred.add_argument("--inter-node-gbps", type=float, default=50.0,
                      help="GB/s per GPU across nodes (default 50 = 400 Gb/s InfiniBand/RoCE, one NIC per GPU)")
    pred.add_argument("--inter-node-latency-us", type=float, default=10.0, help="per message across nodes")


def plan_from_args(args: argparse.Namespace) -> Plan:
    defaults = family_of(args.preset).defaults[args.preset]
    height, width = parse_size(args.size) if args.size else (defaults.height, defaults.width)
    gpus = world_of(args)
    return make_plan(
        preset=args.preset, height=height, width=width,
        frames=args.frames if args.frames is not None else defaults.frames, gpus=gpus,
        dtype=args.dtype, cfg=args.cfg if args.cfg is not None else _default_cfg(defaults, gpus, args.dp), dp=args.dp,
        ulysses=args.ulysses, ring=args.ring, vae_tiling=args.vae_tiling, memory_knobs=_memory_knobs(args),
        topology_file=args.topology_file, gpus_per_node=args.gpus_per_node if args.nodes > 1 else None,
    )


def world_of(args: argparse.Namespace) -> int:
    """--gpus, or --nodes x --gpus-per-node (which must agree with --gpus when both are given)."""
    if args.nodes < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
        raise ConfigError("--nodes and --gpus-per-node must be at least 1")
    if args.nodes > 1 and args.gpus_per_node is None:
        raise ConfigError(f"--nodes {args.nodes}: give --gpus-per-node too")
    from_nodes = args.nodes * args.gpus_per_node if args.gpus_per_node is not None else None
    if args.gpus is None and from_nodes is None:
        raise ConfigError("give --gpus, or --nodes and --gpus-per-node")
    if args.gpus is not None and from_nodes is not None and args.gpus != from_nodes:
        raise ConfigError(f"--gpus {args.gpus} but --nodes {args.nodes} x --gpus-per-node {args.gpus_per_node} "
                          f"= {from_nodes}")
    return args.gpus if args.gpus is not None else from_nodes


def _default_cfg(defaults, gpus: int, dp: int) -> int:
    """What `generate` takes by default: the two CFG passes in parallel when the preset runs
    classic CFG and the ranks split evenly."""
    return 2 if defaults.cfg_scale != 1.0 and gpus % (2 * dp) == 0 else 1


def _memory_knobs(args: argparse.Namespace) -> MemoryKnobs | None:
    given = (args.max_gpu_memory, args.memory_profile, args.stream_blocks, args.chunk_tokens)
    if all(v is None for v in given) and args.fp8 == "off" and not args.with_text_encoder and args.cache == "off":
        return None
    budget = None if args.max_gpu_memory is None else parse_memory(args.max_gpu_memory)
    return MemoryKnobs(max_gpu_memory=budget, memory_profile=args.memory_profile, fp8=args.fp8,
                       stream_blocks=args.stream_blocks, chunk_tokens=args.chunk_tokens,
                       text_llm=args.with_text_encoder, cache=args.cache)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (or `error: ...` on stderr); 0 on success, 2 on bad input."""
    try:
        plan = plan_from_args(args)
        predicted = plan_predictions(plan, args) if args.predict else None
    except (ConfigError, TopologyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = plan_to_dict(plan)
        if predicted is not None:
            out["prediction"] = prediction_dict(*predicted)
        print(json.dumps(out))
    else:
        print(format_plan(plan) + ("" if predicted is None else "\n\n" + "\n".join(format_predictions(*predicted))))
    return 0


def plan_predictions(plan: Plan, args: argparse.Namespace):
    """(every valid topology's prediction, the chosen topology, the assumptions) for --predict."""
    cal = load_calibration(args.gpu_kind)
    link = link_of(args, plan.gpus)
    # The preset's own CFG setting: Wan's classic CFG costs two forwards per step on a cfg-1 replica.
    predicted = predict_all(plan.preset, plan.height, plan.width, plan.frames, plan.topologies, cal, link,
                            kernel=args.kernel)
    return predicted, plan.topology, assumptions(cal, link, args.nodes, args.kernel)
