"""The phases of a `generate` job (text, DiT, noise, VAE, files), free of process groups.

Each phase takes explicit values (the model family, the DiT config, sizes, devices), never the
whole run config, and reaches the model only through the family (``models.family``).
`launcher/job.py` runs them on one or many ranks; the collectives they need come from parallel/.
"""

from __future__ import annotations

from pathlib import Path

import torch

import models
from models import ModelFamily
from models.sampling import TextConditioning, initial_noise

Size = tuple[int, int, int]  # (height, width, frames) in pixels


class NonFiniteLatents(RuntimeError):
    """NaN or Inf appeared in the latents; the message names the step."""


class RankFailure(RuntimeError):
    """This rank cannot go on and says why in one line (an injected fault, an out-of-memory
    error the other ranks did not share); the job ends non-zero."""


def resolve_device(device: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """--device (auto, cpu, cuda) -> this rank's device: one GPU per process of the node.
    Raises ConfigError (the same on every rank of the node) for cuda without GPUs, or for more
    processes on the node than GPUs visible, rather than letting CUDA fail on a device ordinal."""
    from .config import ConfigError

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this process")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_world > visible:
        raise ConfigError(
            f"{local_world} processes on this node but {visible} GPU(s) visible: start at most {visible} "
            f"per node (--nproc_per_node={visible}), or pass --device cpu to run on the CPU"
        )
    return torch.device("cuda", local_rank)


def encode_prompts(family: ModelFamily, dit, model_dir: Path | None, texts: list[str], device, dtype, *,
                   stream: bool = False) -> list[TextConditioning]:
    """Every text (prompts, then the negative prompt if any), returned on the CPU; the encoders
    are freed before returning so the DiT gets their memory. ``stream``: the encoder's big layers
    stay in host memory and are streamed to ``device`` one at a time (budgets below their size)."""
    encoder = family.text.load(model_dir, dit, device="cpu" if stream else device, dtype=dtype)
    placed = stream_text(family, encoder, device) if stream else None
    try:
        conds = [encoder.encode([p]).to("cpu") for p in texts]
    finally:
        if placed is not None:
            placed.close()
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return conds


def stream_text(family: ModelFamily, encoder, device):
    """Put the encoder (loaded on the CPU) on ``device`` except the layers its family streams,
    which stay in host memory. Returns the PlacedBlocks (close it when done), or None when the
    encoder has nothing to stream (the built-in one)."""
    from parallel.placement import place_blocks

    parts = family.text.streamable(encoder)
    if parts is None:
        return None
    resident, layers = parts
    for module in resident:
        module.to(device)
    return place_blocks(layers, device=device, streamed=len(layers), materialise=lambda name, m: m,
                        structure=lambda name, m: m.to("meta"))


def load_dit_weights(preset: str, model_dir: Path | None, dtype, fp8: str = "off") -> torch.nn.Module | None:
    """The DiT on the meta device with the checkpoint's tensors (memory-mapped) assigned, or
    None without --model-dir. Strict: a bad checkpoint raises here, before any collective.
    With ``fp8`` (storage / matmul) the block linears are float8: the family's fp8 files when
    the folder has them, else the bf16 checkpoint quantised while read."""
    if model_dir is None:
        return None
    model = models.build_model(preset, device="meta", dtype=dtype)
    if fp8 != "off":
        from models.fp8 import quantize_model

        quantize_model(model, mode=fp8, include=models.get_family(preset).block_prefixes(model))
    return models.load_weights(model, model_dir)


def _to_fp8(block: torch.nn.Module, fp8: str) -> torch.nn.Module:
    """A block's linears as float8 (idempotent: a Float8Linear is left as it is)."""
    if fp8 != "off":
        from models.fp8 import quantize_model

        quantize_model(block, mode=fp8, include=("",))
    return block


def _materialiser(device, fp8: str):
    """``materialise(name, module)``: real values on ``device`` in the final structure. Modules
    still on the meta device get the preset's seeded random weights (the same values a whole
    `build_model` would give them); loaded ones (memory-mapped) are copied over."""

    def materialise(name: str, module: torch.nn.Module) -> torch.nn.Module:
        if any(p.is_meta for p in module.parameters()):
            module.to_empty(device=device)
            models.init_random_(module, 0, prefix=name)
        else:
            module.to(device)
        return _to_fp8(module, fp8)

    return materialise


def build_dit(family: ModelFamily, preset: str, loaded, device, dtype, placement, share=None):
    """The DiT placed as ``placement`` says (launcher/memory_plan.py): everything but the blocks
    on ``device``; the first blocks resident there (FP8 if asked), the last ``streamed`` behind a
    layer streamer; its token-wise parts in chunks when the plan asks (through the family).
    Returns ``(model, PlacedBlocks)``."""
    from parallel.placement import place_blocks

    model = loaded if loaded is not None else models.build_model(preset, device="meta", dtype=dtype)
    blocks = family.blocks(model)
    containers = {name.split(".")[0] for name, _ in blocks}
    for name, child in model.named_children():
        if name not in containers:
            _materialiser(device, "off")(name, child)  # embedders and final layer stay in --dtype

    def structure(name: str, block: torch.nn.Module) -> torch.nn.Module:
        return _to_fp8(block.to("meta"), placement.fp8)

    placed = place_blocks(blocks, device=device, streamed=placement.streamed,
                          materialise=_materialiser(device, placement.fp8),
                          structure=structure, prefetch=placement.prefetch, share=share)
    if placement.chunk_tokens:  # the planner offers chunks only to a family that has the setter
        family.set_token_chunk(model, placement.chunk_tokens)
    return model.eval(), placed


def vae_dtype_for(family: ModelFamily, device: torch.device) -> torch.dtype:
    """The family's VAE dtype on GPU whatever --dtype is (HunyuanVideo: fp16, the release's
    --vae-precision default), fp32 on the CPU."""
    return family.vae.dtype_on_gpu if device.type == "cuda" else torch.float32


def load_vae(family: ModelFamily, dit, model_dir: Path | None, device):
    return family.vae.load(model_dir, dit, device=device, dtype=vae_dtype_for(family, device))


def noise_tokens(family: ModelFamily, dit, size: Size, seed: int, source: str, device, dtype) -> torch.Tensor:
    """The whole video's noise as tokens `[1, S, F]` (fp32, CPU): identical on every rank. With
    ``source`` "release" it is drawn on ``device`` in ``dtype`` (the text states' dtype), as the
    HunyuanVideo release draws its latents `[1, C, T', H/8, W/8]`."""
    shape = (1, dit.in_channels, *dit.latent_grid(*size))
    noise = initial_noise(shape, seed, source=source, device=device, dtype=dtype)
    return family.patchify(noise, dit.patch_size)


def tokens_to_latents(family: ModelFamily, dit, tokens: torch.Tensor, size: Size) -> torch.Tensor:
    """`[1, S, F]` -> latents `[1, C, T, h, w]`."""
    return family.unpatchify(tokens, dit.token_grid(*size), dit.patch_size)


def decode_tiling(family: ModelFamily, tiling: str) -> str:
    """``tiling`` "auto" without a plan: the family's default tiles."""
    return family.vae.tilings[0] if tiling == "auto" else tiling


def decode(family: ModelFamily, vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, C, T, h, w]` -> video `[3, F, H, W]` in [-1, 1] on the CPU, in the VAE's
    dtype (``launcher.video.frame_uint8`` converts it as the release does), on this rank alone."""
    return family.vae.decode(vae, latents, decode_tiling(family, tiling))


def write_outputs(paths: dict[str, Path], video: torch.Tensor | None, latents: torch.Tensor, *, fps: int,
                  overwrite: bool) -> None:
    """The mp4 (+ latents, + frame grid), each written to a temporary name and renamed; with
    --no-video (``video`` None) the latents only."""
    from safetensors.torch import save_file

    from .video import write_atomic, write_frame_grid, write_video

    if video is not None:
        write_video(video, paths["video"], fps=fps, overwrite=overwrite)
    if "latents" in paths:
        tensors = {"latents": latents.contiguous()}
        write_atomic(paths["latents"], lambda tmp: save_file(tensors, str(tmp)), overwrite=overwrite)
    if "grid" in paths:
        write_frame_grid(video, paths["grid"], overwrite=overwrite)
