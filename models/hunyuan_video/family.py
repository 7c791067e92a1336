"""HunyuanVideo as a ``models.family.ModelFamily``: its presets, weights, text encoders and VAE
as the launcher uses them (the launcher never imports this package directly)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..chunking import chunk_dit
from ..demo import WEIGHTS_DIR as DEMO_WEIGHTS_DIR
from ..family import ModelFamily, ModelInputError, PresetDefaults, TextSpec, VaeSpec
from ..step_cache import CacheSpec
from ..tokens import build_dit
from ..vae_tiles import TiledPass
from ..weights import init_random_
from .config import PRESETS, HunyuanVideoConfig
from .cost import forward_work
from .dit import HunyuanVideoDiT, patchify, unpatchify
from .vae_memory import VAE_LARGEST_MEASURED_UNTILED, decode_bytes, tile_shape

# The release's default negative prompt, used when classic CFG is on (--cfg-scale != 1) and no
# --negative-prompt is given (its inference code does the same).
NEGATIVE_PROMPT = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                   "bad teeth, bad eyes, bad limbs, distortion")
LLM_PARAMS = 7_500_000_000  # the release's llava-llama-3-8b language model (its 32 decoder layers)
LLM_LAYERS = 32
GIB = 2**30

DEFAULTS = {
    "hunyuan-video-13b": PresetDefaults(height=720, width=1280, frames=129, steps=50),
    "hunyuan-video-2block": PresetDefaults(height=720, width=1280, frames=129, steps=50),
    "tiny": PresetDefaults(height=64, width=96, frames=9, steps=4),
    # Its weights ship with the code (models/demo/); trained with this shift, shown at 8 fps, and
    # with 10% of captions dropped to "" so that classic CFG against the empty prompt works
    # (scale 5 measured best: docs/DEMO_MODEL.md).
    "hunyuan-video-demo": PresetDefaults(height=128, width=128, frames=17, steps=20, flow_shift=3.0, fps=8,
                                         cfg_scale=5.0, negative_prompt="", model_dir=DEMO_WEIGHTS_DIR),
}


def build(cfg: HunyuanVideoConfig, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The DiT in eval mode; on "meta" shapes only, else seeded random weights."""
    return build_dit(HunyuanVideoDiT, cfg, device=device, dtype=dtype, seed=seed)


def load(model: nn.Module, path: Path, **kwargs) -> nn.Module:
    from .checkpoint import load_dit_weights

    return load_dit_weights(model, path, **kwargs)


def blocks(model: HunyuanVideoDiT) -> list[tuple[str, nn.Module]]:
    """The 20 double- then 40 single-stream blocks (13B), with their state-dict prefixes."""
    return [(f"double_blocks.{i}", b) for i, b in enumerate(model.double_blocks)] + [
        (f"single_blocks.{i}", b) for i, b in enumerate(model.single_blocks)
    ]


def check_model_dir(model_dir: Path, cfg: HunyuanVideoConfig) -> None:
    """The text encoder and VAE folders are there (the DiT's checkpoint is checked on load)."""
    from .text_encoder import find_encoder_folders
    from .vae import find_vae_files

    if cfg.text_encoder == "release":
        find_encoder_folders(model_dir)
    try:
        find_vae_files(model_dir)
    except FileNotFoundError as err:
        raise ModelInputError(str(err)) from None


def weight_files(model_dir: Path, fp8: bool, cfg: HunyuanVideoConfig) -> list[Path]:
    """The DiT checkpoint file(s), the VAE's weights and config, and each text encoder folder's
    weight and config files (a DiT on the built-in encoder has none), as the loaders resolve them."""
    from ..weights import resolve_checkpoint
    from .text_encoder import find_encoder_folders
    from .vae import find_vae_files

    files = list(resolve_checkpoint(model_dir, prefer_fp8=fp8))
    files += [f for f in find_vae_files(model_dir) if f is not None]
    if cfg.text_encoder == "builtin":
        return files
    enc = find_encoder_folders(model_dir)
    for folder in (enc.llm, enc.clip):
        files += sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
    return files


# --- text -------------------------------------------------------------------------------------


def load_text(model_dir: Path | None, cfg: HunyuanVideoConfig, *, device, dtype):
    from .text_encoder import load_text_encoder

    if cfg.text_encoder == "builtin":
        model_dir = None  # a DiT trained on the weightless encoder: no text folders to read
    return load_text_encoder(None if model_dir is None else str(model_dir), text_dim=cfg.text_states_dim,
                             pooled_dim=cfg.pooled_dim, device=device, dtype=dtype)


def text_streamable(encoder):
    """The LLM's decoder layers may stream; everything else of both encoders stays resident."""
    from .text_encoder import HunyuanTextEncoders

    if not isinstance(encoder, HunyuanTextEncoders):
        return None
    llm = encoder.llm.model
    resident = [child for name, child in llm.named_children() if name != "layers"] + [encoder.clip.model]
    return resident, [(f"layers.{i}", layer) for i, layer in enumerate(llm.layers)]


def text_weight_bytes(streamed: bool) -> int:
    """The LLM's peak on the GPU: all of it in 16 bits, or (streamed) embeddings/head, a few
    layers and the activations."""
    layer = LLM_PARAMS // LLM_LAYERS * 2
    return 3 * layer + 2 * GIB if streamed else LLM_PARAMS * 2 + GIB


# --- VAE --------------------------------------------------------------------------------------


def load_vae_for(model_dir: Path | None, cfg: HunyuanVideoConfig, *, device, dtype) -> nn.Module:
    """The release's VAE from ``model_dir``, else seeded random weights of the preset's VAE size."""
    from .vae import VAE_PRESETS, HunyuanVideoVAE, load_vae

    if model_dir is not None:
        return load_vae(model_dir, device=device, dtype=dtype)
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAE_PRESETS[cfg.vae_preset])
    vae.to_empty(device=device)
    init_random_(vae, 0)
    return vae.to(dtype).eval().requires_grad_(False)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    """DiT latents `[1, C, T, h, w]` -> video `[3, F, H, W]` in [-1, 1] on the CPU, in the VAE's
    dtype (the release maps to [0, 1] in that dtype before converting to uint8)."""
    if tiling != "off":
        return split_decode(vae, latents, tiling)()
    return _finish_video(vae.decode(_vae_space(vae, latents), clamp=False))


def _vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """DiT latents -> the VAE's own space, on its device and in its dtype (as `vae.decode` casts)."""
    z = latents.to(vae.post_quant_conv.weight.device) / vae.config.scaling_factor
    return z.to(vae.post_quant_conv.weight)


def _finish_video(video: torch.Tensor) -> torch.Tensor:
    return video.clamp_(-1, 1)[0].cpu()


def _no_grad(fn):
    """A tile map without autograd (``vae.decode`` runs under no_grad; its tiles must too)."""

    def run(window):
        with torch.no_grad():
            return fn(window)

    return run


def _tiling(tiling):
    """A tiling name ("release", "small") or a ``vae_tiling.TilingConfig`` -> the config."""
    from .vae_tiling import TILING_PRESETS

    return TILING_PRESETS[tiling] if isinstance(tiling, str) else tiling


def split_decode(vae, latents: torch.Tensor, tiling) -> TiledPass:
    """The tiled decode as tiles of the release's plan (``decode`` runs the same pass); ``tiling``
    a name or a ``TilingConfig``."""
    from .vae_tiling import decode_grid

    z, cfg = _vae_space(vae, latents), vae.config
    grid = decode_grid(tuple(z.shape[2:]), _tiling(tiling), cfg.time_compression_ratio,
                       cfg.spatial_compression_ratio)
    return TiledPass(grid, _no_grad(lambda w: vae.decode_tile(z[(slice(None), slice(None), *w)])), _finish_video)


def split_encode(vae, video: torch.Tensor, tiling) -> TiledPass:
    """Video `[3, F, H, W]` in [-1, 1] -> DiT latents `[1, 16, T, h, w]` (the posterior mean x
    scaling_factor, on the CPU in the VAE's dtype), as tiles of the release's plan in pixels."""
    from .vae_tiling import encode_grid

    x, cfg = video[None].to(vae.post_quant_conv.weight), vae.config
    grid = encode_grid(tuple(x.shape[2:]), _tiling(tiling), cfg.time_compression_ratio,
                       cfg.spatial_compression_ratio)

    def finish(moments: torch.Tensor) -> torch.Tensor:
        return (moments.chunk(2, dim=1)[0] * cfg.scaling_factor).cpu()

    return TiledPass(grid, _no_grad(lambda w: vae.encode_tile(x[(slice(None), slice(None), *w)])), finish)


@functools.cache
def _vae_params(vae_preset: str) -> int:
    from .vae import VAE_PRESETS, HunyuanVideoVAE

    with torch.device("meta"):
        return sum(p.numel() for p in HunyuanVideoVAE(VAE_PRESETS[vae_preset]).parameters())


def vae_note(latent, tiling: str) -> str | None:
    """The decode model is calibrated on the release's VAE, untiled up to 17x40x40 latents."""
    if tiling == "off" and latent[0] * latent[1] * latent[2] > VAE_LARGEST_MEASURED_UNTILED:
        return "VAE decode: untiled beyond the largest measured latent (17x40x40); extrapolated"
    return None


# TeaCache's published HunyuanVideo polynomial (TeaCache4HunyuanVideo) and its 1.6x threshold;
# First-Block Cache at ParaAttention's HunyuanVideo default. Calibrated on the 13B release, and
# used for every preset of the family (the demo model shares its block structure).
CACHE = CacheSpec(
    tea_coefficients=(7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    tea_threshold=0.1, fb_threshold=0.06, tea_warmup=1,
    tea_signal="the first double block's modulated image input (a shard per rank)",
    note="TeaCache4HunyuanVideo polynomial, threshold 0.1 (1.6x published); FBCache 0.06 (ParaAttention)",
)


FAMILY = ModelFamily(
    name="hunyuan_video",
    presets=PRESETS,
    defaults=DEFAULTS,
    build=build,
    load=load,
    blocks=blocks,
    patchify=patchify,
    unpatchify=unpatchify,
    text=TextSpec(load=load_text, max_tokens=256, streamable=text_streamable, weight_bytes=text_weight_bytes,
                  has_weights=lambda cfg: cfg.text_encoder == "release"),
    vae=VaeSpec(load=load_vae_for, decode=decode, tilings=("release", "small"), decode_bytes=decode_bytes,
                split_decode=split_decode, split_encode=split_encode,
                tile_shape=tile_shape, weight_bytes=lambda cfg: _vae_params(cfg.vae_preset) * 2,
                calibrated=lambda cfg: cfg.vae_preset == "hunyuan-video", note=vae_note),
    check_model_dir=check_model_dir,
    forward_work=forward_work,
    set_token_chunk=chunk_dit,
    cache=lambda cfg: CACHE,
    weight_files=weight_files,
    guidance="embedded",
    default_negative_prompt=NEGATIVE_PROMPT,
    released=frozenset({"hunyuan-video-13b", "hunyuan-video-demo"}),
)
