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


def encode_prompts(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, device, dtype) -> list[TextConditioning]:
    """Every prompt (then the negative prompt, if any) on the CPU; the encoders are freed
    before returning so the DiT gets their memory."""
    from models.hunyuan_video.text_encoder import load_text_encoder

    encoder = load_text_encoder(
        None if cfg.model_dir is None else str(cfg.model_dir),
        text_dim=dit_cfg.text_states_dim, pooled_dim=dit_cfg.pooled_dim, device=device, dtype=dtype,
    )
    texts = list(cfg.prompts) + ([cfg.negative_prompt] if cfg.uses_cfg else [])
    conds = [encoder.encode([p]).to("cpu") for p in texts]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return conds


def load_dit_weights(cfg: RunConfig, dtype) -> torch.nn.Module | None:
    """The DiT on the meta device with the checkpoint's tensors (memory-mapped) assigned, or
    None without --model-dir. Strict: a bad checkpoint raises here, before any collective."""
    if cfg.model_dir is None:
        return None
    return models.load_weights(models.build_model(cfg.preset, device="meta", dtype=dtype), cfg.model_dir)


def materialise_dit(cfg: RunConfig, loaded, device, dtype):
    if loaded is None:
        # Random weights are one fixed model per preset (seed 0); --seed only changes the noise.
        return models.build_model(cfg.preset, device=device, dtype=dtype, seed=0)
    return loaded.to(device)


def load_vae_for(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, device):
    """The release's VAE from --model-dir, else seeded random weights of the preset's VAE size."""
    from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE, load_vae

    vae_dtype = torch.float16 if device.type == "cuda" else torch.float32  # the release decodes in fp16
    if cfg.model_dir is not None:
        return load_vae(cfg.model_dir, device=device, dtype=vae_dtype)
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAE_PRESETS[dit_cfg.vae_preset])
    vae.to_empty(device=device)
    models.weights.init_random_(vae, 0)
    return vae.to(vae_dtype).eval().requires_grad_(False)


def noise_tokens(cfg: RunConfig, dit_cfg: HunyuanVideoConfig, seed: int) -> torch.Tensor:
    """The whole video's noise as tokens `[1, S, C*pt*ph*pw]` (fp32, CPU): identical on every rank."""
    shape = (1, dit_cfg.in_channels, *dit_cfg.latent_grid(cfg.height, cfg.width, cfg.frames))
    return patchify(initial_noise(shape, seed), dit_cfg.patch_size)


def tokens_to_latents(tokens: torch.Tensor, cfg: RunConfig, dit_cfg: HunyuanVideoConfig) -> torch.Tensor:
    """`[1, S, F]` -> latents `[1, C, T, h, w]`."""
    return unpatchify(tokens, dit_cfg.token_grid(cfg.height, cfg.width, cfg.frames), dit_cfg.patch_size)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, C, T, h, w]` -> video `[3, F, H, W]` in [-1, 1] (fp32, CPU)."""
    from models.hunyuan_video.vae_tiling import TILING_PRESETS

    z = latents.to(vae.post_quant_conv.weight.device) / vae.config.scaling_factor
    mode = "release" if tiling == "auto" else tiling
    video = vae.decode(z, tiling=None if mode == "off" else TILING_PRESETS[mode])
    return video[0].float().cpu()


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
