"""Wan2.1 text-to-video as a ``models.family.ModelFamily``: its presets, weights, umT5 text
encoder, VAE and sampler as the launcher uses them (the launcher never imports this package
directly). Classic CFG (two forwards per step), so `--cfg 2` is the default split on 2+ GPUs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..chunking import chunk_dit
from ..family import ModelFamily, ModelInputError, PresetDefaults, TextSpec, VaeSpec
from ..step_cache import CacheSpec
from ..tokens import build_dit
from ..vae_tiles import TiledPass
from ..weights import init_random_
from .config import PRESETS, WanConfig
from .cost import forward_work
from .dit import WanDiT, patchify, unpatchify
from .scheduler import FlowUniPC

# The release's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"

# The release's t2v defaults: 50 steps, CFG 5.0, 81 frames at 16 fps; flow shift 5.0 at 720p and
# 3.0 at 480p (the 1.3B model's size).
DEFAULTS = {
    "wan2.1-t2v-14b": PresetDefaults(height=720, width=1280, frames=81, steps=50, flow_shift=5.0, cfg_scale=5.0, fps=16),
    "wan2.1-t2v-1.3b": PresetDefaults(height=480, width=832, frames=81, steps=50, flow_shift=3.0, cfg_scale=5.0, fps=16),
    "wan-tiny": PresetDefaults(height=64, width=96, frames=9, steps=4, flow_shift=5.0, cfg_scale=5.0, fps=16),
}
UMT5_XXL_PARAMS = 5_700_000_000  # the encoder half of umT5-XXL (what the release loads)


def build(cfg: WanConfig, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The DiT in eval mode; on "meta" shapes only, else seeded random weights."""
    return build_dit(WanDiT, cfg, device=device, dtype=dtype, seed=seed)


def load(model: nn.Module, path: Path, **kwargs) -> nn.Module:
    from .checkpoint import load_dit_weights

    return load_dit_weights(model, path)


def blocks(model: WanDiT) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def check_model_dir(model_dir: Path, cfg=None) -> None:
    """The umT5 and VAE files are there (the DiT's checkpoint is checked on load)."""
    from .text_encoder import find_text_files
    from .vae import find_vae_files

    find_text_files(model_dir)
    try:
        find_vae_files(model_dir)
    except FileNotFoundError as err:
        raise ModelInputError(str(err)) from None


def weight_files(model_dir: Path, fp8: bool, cfg=None) -> list[Path]:
    from .checkpoint import dit_files
    from .text_encoder import find_text_files
    from .vae import find_vae_files

    vae = find_vae_files(model_dir)
    files = list(dit_files(model_dir)) + [vae.weights] + ([vae.config] if vae.config else [])
    return files + [p for p in _text_paths(find_text_files(model_dir)) if p.is_file()]


def _text_paths(found) -> list[Path]:
    """Every path a text-file lookup result names (a dataclass of paths or folders)."""
    values = vars(found).values() if hasattr(found, "__dict__") else found
    out = []
    for v in values:
        if isinstance(v, Path):
            out += sorted(v.iterdir()) if v.is_dir() else [v]
    return out


# --- text -------------------------------------------------------------------------------------


def load_text(model_dir: Path | None, cfg: WanConfig, *, device, dtype):
    from .text_encoder import load_text_encoder

    return load_text_encoder(model_dir, text_dim=cfg.text_dim, text_len=cfg.text_len, device=device, dtype=dtype)


def text_streamable(encoder):
    from .text_encoder import text_streamable as streamable

    return streamable(encoder)


def text_weight_bytes(streamed: bool) -> int:
    from .text_encoder import text_weight_bytes as weight_bytes

    return weight_bytes(streamed)


# --- VAE --------------------------------------------------------------------------------------


def load_vae_for(model_dir: Path | None, cfg: WanConfig, *, device, dtype) -> nn.Module:
    """The release's VAE from ``model_dir``, else seeded random weights of the preset's VAE."""
    from .vae import VAE_PRESETS, WanVAE, load_vae

    if model_dir is not None:
        return load_vae(model_dir, device=device, dtype=dtype, config=VAE_PRESETS[cfg.vae_preset])
    with torch.device("meta"):
        vae = WanVAE(VAE_PRESETS[cfg.vae_preset])
    vae.to_empty(device=device)
    init_random_(vae, 0)
    return vae.to(dtype).eval().requires_grad_(False)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, 16, T, h, w]` (normalised, as the DiT sees them) -> video `[3, F, H, W]`
    in [-1, 1] on the CPU in the VAE's dtype."""
    return split_decode(vae, latents, tiling)()


def split_decode(vae, latents: torch.Tensor, tiling) -> TiledPass:
    """The decode as diffusers' spatial tiles (one window with tiling "off" or small latents);
    ``tiling`` a name or a ``vae_tiling.VaeTiling``."""
    from .vae_tiling import decode_grid

    raw = vae.denormalize(latents.to(device=next(vae.parameters()).device, dtype=vae.dtype))
    grid = decode_grid(tuple(raw.shape[2:]), None if tiling == "off" else tiling, vae.config.spatial_compression)
    return TiledPass(grid, lambda w: vae.decode_raw(raw[(slice(None), slice(None), *w)]),
                     lambda video: video.clamp_(-1, 1)[0].cpu())


def _decode_bytes(latent, tiling: str) -> int:
    from .vae_tiling import decode_bytes

    return decode_bytes(latent, "off" if tiling == "off" else tiling)


def _tile_shape(latent, tiling: str):
    from .vae_tiling import tile_shape

    return tile_shape(latent, tiling)


def _vae_weight_bytes(cfg: WanConfig) -> int:
    from .vae import vae_params

    return vae_params(cfg.vae_preset) * 4


# TeaCache for Wan2.1 T2V (TeaCache4Wan2.1 with retention steps: the signal is the time
# modulation e0, the first 5 steps always computed), the polynomial fitted per model size. 0.2 is
# that script's default threshold (14B); the 1.3B model gets a lower one. FBCache: 0.1, a starting
# point (no published Wan value we rely on); random weights cannot calibrate either.
_TEA_14B = (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)
_TEA_1_3B = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)


def cache_spec(cfg: WanConfig) -> CacheSpec:
    """The 14B polynomial for 14B-wide models, else the 1.3B one (also the tiny test presets')."""
    big = cfg.hidden_size >= 5120
    return CacheSpec(tea_coefficients=_TEA_14B if big else _TEA_1_3B, tea_threshold=0.2 if big else 0.08,
                     fb_threshold=0.1, tea_warmup=5, tea_signal="the time modulation e0 (whole on every rank)",
                     stream_fp32=True,
                     note=f"TeaCache4Wan2.1 {'14B' if big else '1.3B'} polynomial with retention steps")


FAMILY = ModelFamily(
    name="wan",
    presets=PRESETS,
    defaults=DEFAULTS,
    build=build,
    load=load,
    blocks=blocks,
    patchify=patchify,
    unpatchify=unpatchify,
    text=TextSpec(load=load_text, max_tokens=512, streamable=text_streamable, weight_bytes=text_weight_bytes,
                  dtype_on_gpu=torch.bfloat16),
    vae=VaeSpec(load=load_vae_for, decode=decode, tilings=("tiles", "small"), decode_bytes=_decode_bytes,
                split_decode=split_decode,
                tile_shape=_tile_shape, weight_bytes=_vae_weight_bytes, dtype_on_gpu=torch.float32),
    check_model_dir=check_model_dir,
    forward_work=forward_work,
    set_token_chunk=chunk_dit,
    cache=cache_spec,
    weight_files=weight_files,
    scheduler=FlowUniPC,
    guidance="cfg",
    default_negative_prompt=NEGATIVE_PROMPT,
    released=frozenset({"wan2.1-t2v-1.3b", "wan2.1-t2v-14b"}),
    preset_tables={"wan2.1-t2v-1.3b": "wan_1.3b"},
)
