"""The phases of a `generate` job (text, DiT, denoise, VAE, files), free of process groups.

`launcher/job.py` runs them on one or many ranks; the collectives they need come from parallel/.
"""

from __future__ import annotations

from pathlib import Path

import torch

import models
from models.hunyuan_video import HunyuanVideoConfig, patchify, unpatchify
from models.sampling import TextConditioning, initial_noise

from .config import ConfigError, RunConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLatents(RuntimeError):
    """NaN or Inf appeared in the latents; the message names the step."""


def resolve_device(cfg: RunConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this process")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if use_cuda else "fp32")
    return device, _DTYPES[name]


def text_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The text encoders' dtype: fp16 on GPU unless asked otherwise (the release's default
    `--text-encoder-precision`; its states feed the DiT and, with `--noise release`, the noise's
    dtype), fp32 on the CPU."""
    if cfg.text_dtype != "auto":
        return _DTYPES[cfg.text_dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


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
    if existing and not cfg.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    return paths


def check_model_dir(cfg: RunConfig) -> None:
    """Cheap checks that every weight folder a job will read is there (run on every rank before
    any collective, so a missing folder fails everywhere at once)."""
    if cfg.model_dir is None:
        return
    from models.hunyuan_video.text_encoder import find_encoder_folders
    from models.hunyuan_video.vae import find_vae_files

    find_encoder_folders(cfg.model_dir)
    try:
        find_vae_files(cfg.model_dir)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None


def encode_prompts(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, device, dtype, *, stream: bool = False) -> list[TextConditioning]:
    """Every prompt (then the negative prompt, if any) on the CPU; the encoders are freed
    before returning so the DiT gets their memory. ``stream``: the LLM's decoder layers stay in
    host memory and are streamed to ``device`` one at a time (for budgets below its ~15 GiB)."""
    from models.hunyuan_video.text_encoder import HunyuanTextEncoders, load_text_encoder

    encoder = load_text_encoder(
        None if cfg.model_dir is None else str(cfg.model_dir),
        text_dim=dit_cfg.text_states_dim, pooled_dim=dit_cfg.pooled_dim,
        device="cpu" if stream else device, dtype=dtype,
    )
    placed = stream_llm(encoder, device) if stream and isinstance(encoder, HunyuanTextEncoders) else None
    texts = list(cfg.prompts) + ([cfg.negative_prompt] if cfg.uses_cfg else [])
    try:
        conds = [encoder.encode([p]).to("cpu") for p in texts]
    finally:
        if placed is not None:
            placed.close()
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return conds


def stream_llm(encoder, device):
    """Put the encoders (loaded on the CPU) on ``device`` except the LLM's decoder layers, which
    are streamed from host memory. Returns the PlacedBlocks (close it when done)."""
    from parallel.placement import place_blocks

    llm = encoder.llm.model
    for name, child in llm.named_children():
        if name != "layers":
            child.to(device)
    encoder.clip.model.to(device)
    layers = [(f"layers.{i}", layer) for i, layer in enumerate(llm.layers)]
    return place_blocks(layers, device=device, streamed=len(layers), materialise=lambda name, m: m,
                        structure=lambda name, m: m.to("meta"))


def load_dit_weights(cfg: RunConfig, dtype, fp8: str = "off") -> torch.nn.Module | None:
    """The DiT on the meta device with the checkpoint's tensors (memory-mapped) assigned, or
    None without --model-dir. Strict: a bad checkpoint raises here, before any collective.
    With ``fp8`` (storage / matmul) the block linears are float8: the release's fp8 file and
    its scale map when the folder has them, else the bf16 checkpoint quantised while read."""
    if cfg.model_dir is None:
        return None
    model = models.build_model(cfg.preset, device="meta", dtype=dtype)
    if fp8 != "off":
        from models.fp8 import quantize_model

        quantize_model(model, mode=fp8)
    return models.load_weights(model, cfg.model_dir)


def dit_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The DiT's blocks in execution order, with their state-dict prefixes."""
    return [(f"double_blocks.{i}", b) for i, b in enumerate(model.double_blocks)] + [
        (f"single_blocks.{i}", b) for i, b in enumerate(model.single_blocks)
    ]


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
            models.weights.init_random_(module, 0, prefix=name)
        else:
            module.to(device)
        return _to_fp8(module, fp8)

    return materialise


def build_dit(cfg: RunConfig, loaded, device, dtype, placement, share=None):
    """The DiT placed as ``placement`` says (launcher/memory_plan.py): everything but the blocks
    on ``device``; the first blocks resident there (FP8 if asked), the last ``streamed`` behind a
    layer streamer. Returns ``(model, PlacedBlocks)``."""
    from parallel.placement import place_blocks

    model = loaded if loaded is not None else models.build_model(cfg.preset, device="meta", dtype=dtype)
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            _materialiser(device, "off")(name, child)  # embedders and final layer stay in --dtype

    def structure(name: str, block: torch.nn.Module) -> torch.nn.Module:
        return _to_fp8(block.to("meta"), placement.fp8)

    placed = place_blocks(dit_blocks(model), device=device, streamed=placement.streamed,
                          materialise=_materialiser(device, placement.fp8),
                          structure=structure, prefetch=placement.prefetch, share=share)
    return model.eval(), placed


def vae_dtype_for(device: torch.device) -> torch.dtype:
    """fp16 on GPU whatever --dtype is (the release's --vae-precision default), fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_vae_for(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, device):
    """The release's VAE from --model-dir, else seeded random weights of the preset's VAE size."""
    from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE, load_vae

    vae_dtype = vae_dtype_for(device)
    if cfg.model_dir is not None:
        return load_vae(cfg.model_dir, device=device, dtype=vae_dtype)
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAE_PRESETS[dit_cfg.vae_preset])
    vae.to_empty(device=device)
    models.weights.init_random_(vae, 0)
    return vae.to(vae_dtype).eval().requires_grad_(False)


def noise_tokens(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, seed: int, device, dtype) -> torch.Tensor:
    """The whole video's noise as tokens `[1, S, C*pt*ph*pw]` (fp32, CPU): identical on every rank.
    With `--noise release` it is drawn on ``device`` in ``dtype`` (the text states' dtype), as the
    release's pipeline draws its latents `[1, C, T', H/8, W/8]`."""
    shape = (1, dit_cfg.in_channels, *dit_cfg.latent_grid(cfg.height, cfg.width, cfg.frames))
    noise = initial_noise(shape, seed, source=cfg.noise, device=device, dtype=dtype)
    return patchify(noise, dit_cfg.patch_size)


def tokens_to_latents(tokens: torch.Tensor, cfg: RunConfig, dit_cfg: HunyuanVideoConfig) -> torch.Tensor:
    """`[1, S, F]` -> latents `[1, C, T, h, w]`."""
    return unpatchify(tokens, dit_cfg.token_grid(cfg.height, cfg.width, cfg.frames), dit_cfg.patch_size)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, C, T, h, w]` -> video `[3, F, H, W]` in [-1, 1] on the CPU, in the VAE's
    dtype (fp16 on GPU): the release maps it to [0, 1] in that dtype before converting to uint8,
    so `launcher.video.frame_uint8` does too."""
    from models.hunyuan_video.vae_tiling import TILING_PRESETS

    z = latents.to(vae.post_quant_conv.weight.device) / vae.config.scaling_factor
    mode = "release" if tiling == "auto" else tiling
    video = vae.decode(z, tiling=None if mode == "off" else TILING_PRESETS[mode])
    return video[0].cpu()


def write_outputs(cfg: RunConfig, paths: dict[str, Path], video: torch.Tensor | None, latents: torch.Tensor) -> None:
    """The mp4 (+ latents, + frame grid), each written to a temporary name and renamed; with
    --no-video (``video`` None) the latents only."""
    from safetensors.torch import save_file

    from .video import write_atomic, write_frame_grid, write_video

    if video is not None:
        write_video(video, paths["video"], fps=cfg.fps, overwrite=cfg.overwrite)
    if "latents" in paths:
        tensors = {"latents": latents.contiguous()}
        write_atomic(paths["latents"], lambda tmp: save_file(tensors, str(tmp)), overwrite=cfg.overwrite)
    if "grid" in paths:
        write_frame_grid(video, paths["grid"], overwrite=cfg.overwrite)
