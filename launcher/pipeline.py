"""One `generate` job on one process: text -> DiT denoising -> VAE decode -> files.

Each phase is its own function so the distributed launcher can reuse them around the shard /
gather steps (parallel/ owns those); this module holds no process-group code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import models
from models.hunyuan_video import patchify, unpatchify
from models.sampling import TextConditioning, denoise_tokens, initial_noise
from models.scheduler import FlowMatchEuler

from .config import ConfigError, RunConfig
from .record import PhaseTimer, command_line, now_iso, peak_memory, versions

log = logging.getLogger("launcher")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLatents(RuntimeError):
    """NaN or Inf appeared in the latents; the message names the step."""


def resolve_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this process")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if use_cuda else "fp32")
    return device, _DTYPES[name]


def output_paths(cfg: RunConfig, index: int) -> dict[str, Path]:
    """Where prompt `index`'s files go; refuses up front to overwrite unless --overwrite."""
    from .video import output_stem

    stem = output_stem(cfg.prompts[index], cfg.seed + index)
    paths = {"video": cfg.output_dir / f"{stem}.mp4", "record": cfg.output_dir / f"{stem}.json"}
    if cfg.save_latents:
        paths["latents"] = cfg.output_dir / f"{stem}.latents.safetensors"
    if cfg.save_grid:
        paths["grid"] = cfg.output_dir / f"{stem}.png"
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    return paths


def encode_text(cfg: RunConfig, dit_cfg, device, dtype) -> list[TextConditioning]:
    """Encode every prompt, then free the encoders before the DiT needs the memory."""
    from models.hunyuan_video.text_encoder import load_text_encoder

    encoder = load_text_encoder(
        None if cfg.model_dir is None else str(cfg.model_dir),
        text_dim=dit_cfg.text_states_dim, pooled_dim=dit_cfg.pooled_dim, device=device, dtype=dtype,
    )
    conds = [encoder.encode([p]).to("cpu") for p in cfg.prompts]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return conds


def load_dit(cfg: RunConfig, device, dtype):
    if cfg.model_dir is None:
        return models.build_model(cfg.preset, device=device, dtype=dtype, seed=cfg.seed)
    model = models.build_model(cfg.preset, device="meta", dtype=dtype)
    return models.load_weights(model, cfg.model_dir).to(device)


def load_vae_for(cfg: RunConfig, dit_cfg, device):
    """The release's VAE from --model-dir, else seeded random weights of the preset's VAE size."""
    from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE, load_vae

    vae_dtype = torch.float16 if device.type == "cuda" else torch.float32  # the release decodes in fp16
    if cfg.model_dir is not None:
        return load_vae(cfg.model_dir, device=device, dtype=vae_dtype)
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAE_PRESETS[dit_cfg.vae_preset])
    vae.to_empty(device=device)
    models.weights.init_random_(vae, cfg.seed)
    return vae.to(vae_dtype).eval().requires_grad_(False)


def _nan_guard(bar):
    def on_step(i: int, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise NonFiniteLatents(f"NaN or Inf in the latents after denoising step {i + 1}")
        bar.update(1)

    return on_step


def denoise(model, cond: TextConditioning, cfg: RunConfig, seed: int, device) -> torch.Tensor:
    """Seeded noise -> denoised latents `[1, C, T, h, w]` (fp32) on one process."""
    dit_cfg = model.config
    latent_shape = (1, dit_cfg.in_channels, *dit_cfg.latent_grid(cfg.height, cfg.width, cfg.frames))
    grid = dit_cfg.token_grid(cfg.height, cfg.width, cfg.frames)
    tokens = patchify(initial_noise(latent_shape, seed), dit_cfg.patch_size).to(device)
    cos, sin = model.rope(grid)
    with tqdm(total=cfg.steps, desc="denoise", unit="step", leave=False) as bar:
        out = denoise_tokens(
            model, tokens, (cos.to(device), sin.to(device)), cond.to(device),
            FlowMatchEuler(steps=cfg.steps, shift=cfg.flow_shift),
            embedded_guidance=cfg.guidance if dit_cfg.guidance_embed else None,
            on_step=_nan_guard(bar),
        )
    return unpatchify(out, grid, dit_cfg.patch_size)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, C, T, h, w]` -> video `[3, F, H, W]` in [-1, 1] (fp32, CPU)."""
    from models.hunyuan_video.vae_tiling import TILING_PRESETS

    z = latents / vae.config.scaling_factor
    mode = "release" if tiling == "auto" else tiling
    video = vae.decode(z, tiling=None if mode == "off" else TILING_PRESETS[mode])
    return video[0].float().cpu()


def record(cfg: RunConfig, index: int, timer: PhaseTimer, device, dtype, paths) -> dict:
    return {
        "prompt": cfg.prompts[index],
        "seed": cfg.seed + index,
        "model": {"preset": cfg.preset, "model_dir": None if cfg.model_dir is None else str(cfg.model_dir)},
        "size": [cfg.height, cfg.width],
        "frames": cfg.frames,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "flow_shift": cfg.flow_shift,
        "fps": cfg.fps,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "topology": {"world_size": 1, "dp": 1, "cfg": 1, "ring": 1, "ulysses": 1},
        "timings_s": dict(timer.seconds),
        "peak_memory": peak_memory(device),
        "versions": versions(),
        "outputs": {k: str(v) for k, v in paths.items()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "command": command_line(),
        "finished": now_iso(),
    }


def run_generate(cfg: RunConfig) -> list[Path]:
    """Generate one video per prompt; returns the video paths."""
    from safetensors.torch import save_file

    from .video import write_atomic, write_frame_grid, write_json_atomic, write_video

    device, dtype = resolve_device(cfg)
    all_paths = [output_paths(cfg, i) for i in range(len(cfg.prompts))]
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer(device)
    dit_cfg = models.hunyuan_video.get_preset(cfg.preset)
    with timer.phase("text_encode"):
        conds = encode_text(cfg, dit_cfg, device, dtype)
    with timer.phase("load_dit"):
        model = load_dit(cfg, device, dtype)
    with timer.phase("load_vae"):
        vae = load_vae_for(cfg, dit_cfg, device)
    written = []
    for i, (cond, paths) in enumerate(zip(conds, all_paths)):
        with timer.phase("denoise"):
            latents = denoise(model, cond, cfg, cfg.seed + i, device)
        with timer.phase("vae_decode"):
            video = decode(vae, latents, cfg.vae_tiling)
        with timer.phase("write"):
            write_video(video, paths["video"], fps=cfg.fps, overwrite=cfg.overwrite)
            if "latents" in paths:
                write_atomic(paths["latents"], lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp)),
                             overwrite=cfg.overwrite)
            if "grid" in paths:
                write_frame_grid(video, paths["grid"], overwrite=cfg.overwrite)
        write_json_atomic(record(cfg, i, timer, device, dtype, paths), paths["record"], overwrite=cfg.overwrite)
        written.append(paths["video"])
    return written
