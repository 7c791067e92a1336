"""HunyuanVideo's causal 3D VAE ("884-16c-hy"): 4x in time, 8x in space, 16 latent channels.

Layouts: video `[B, 3, F, H, W]` in [-1, 1] with F = 4k+1 and H, W multiples of 8; latents
`[B, 16, T, h, w]` with T = (F-1)/4 + 1, h = H/8, w = W/8.

Scaling: `decode` takes latents in the VAE's own space. The DiT's latents are that times
`scaling_factor` (0.476986), so the caller decodes `dit_latents / vae.config.scaling_factor`, and
encodes to `vae.encode(video) * vae.config.scaling_factor`, as the release pipeline does.

State-dict keys and shapes equal the release's and diffusers' `AutoencoderKLHunyuanVideo` (the two
are identical), so `load_vae` reads either checkpoint layout with no renaming.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import CheckpointError, check_state_dict
from ..weights import read_state_dict as read_weights
from .vae_blocks import Decoder, Encoder
from .vae_tiling import TilingConfig, tiled_decode, tiled_encode


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The causal VAE's hyper-parameters; the defaults are the release's 884-16c-hy config."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.476986
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        n = len(self.block_out_channels)
        for name in ("time_compression_ratio", "spatial_compression_ratio"):
            ratio = getattr(self, name)
            if ratio < 1 or ratio & (ratio - 1) or ratio.bit_length() > n:
                raise ValueError(
                    f"VAEConfig.{name} = {ratio}: must be a power of 2 of at most 2^{n - 1} "
                    f"(one x2 step per block but the last; block_out_channels has {n} blocks)"
                )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig.block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}"
            )

    def block_scale(self, i: int) -> tuple[int, int, int]:
        """(t, h, w) factor of encoder down block i and decoder up block i (the release's rule).

        Space is resampled in the first log2(spatial ratio) blocks, time in the log2(time ratio)
        blocks just before the last: for the release, (1,2,2), (2,2,2), (2,2,2), (1,1,1).
        """
        n = len(self.block_out_channels)
        s = 2 if i < self.spatial_compression_ratio.bit_length() - 1 else 1
        first_time_block = n - 1 - (self.time_compression_ratio.bit_length() - 1)
        t = 2 if first_time_block <= i < n - 1 else 1
        return (t, s, s)


VAE_PRESETS = {
    "hunyuan-video": VAEConfig(),
    # Same structure (4 blocks, 4x/8x, attention, shortcut convs) at a size CPU tests can run.
    "tiny": VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    # The demo model's VAE (models/demo/): the same structure, narrow enough to train in minutes.
    "demo": VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
}


class HunyuanVideoVAE(nn.Module):
    """Causal 3D VAE. Keys: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """One untiled pass: latents `[B, 16, T, h, w]` -> raw video `[B, 3, 4T-3, 8h, 8w]`."""
        return self.decoder(self.post_quant_conv(z))

    def encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """One untiled pass: video `[B, 3, F, H, W]` -> moments `[B, 32, (F-1)/4+1, H/8, W/8]`."""
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, *, tiling: TilingConfig | None = None, clamp: bool = True
    ) -> torch.Tensor:
        """Latents in VAE space `[B, 16, T, h, w]` (DiT latents / scaling_factor) -> video.

        Returns `[B, 3, 4T-3, 8h, 8w]` in the model's dtype, clamped to [-1, 1] unless clamp=False
        (the network itself does not bound its output; the release clamps after decoding).
        `tiling=None` decodes in one pass, whose memory grows with T*h*w (attention included).
        """
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"decode expects latents [B, {cfg.latent_channels}, T, h, w], got {tuple(z.shape)}"
            )
        z = z.to(self.post_quant_conv.weight)  # the model's dtype and device
        if tiling is None:
            video = self.decode_tile(z)
        else:
            video = tiled_decode(
                self.decode_tile, z, tiling, cfg.time_compression_ratio, cfg.spatial_compression_ratio
            )
        return video.clamp_(-1, 1) if clamp else video

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor, *, tiling: TilingConfig | None = None) -> torch.Tensor:
        """Video `[B, 3, F, H, W]` in [-1, 1] -> moments `[B, 32, T, h, w]`: mean then logvar channels."""
        cfg = self.config
        rt, rs = cfg.time_compression_ratio, cfg.spatial_compression_ratio
        frames, height, width = video.shape[2:] if video.ndim == 5 else (0, 0, 0)
        if (
            video.ndim != 5
            or video.shape[1] != cfg.in_channels
            or (frames - 1) % rt
            or height % rs
            or width % rs
        ):
            raise ValueError(
                f"encode expects video [B, {cfg.in_channels}, {rt}k+1, {rs}m, {rs}n], "
                f"got {tuple(video.shape)}"
            )
        video = video.to(self.post_quant_conv.weight)
        if tiling is None:
            return self.encode_tile(video)
        return tiled_encode(self.encode_tile, video, tiling, rt, rs)

    @torch.no_grad()
    def encode(
        self,
        video: torch.Tensor,
        *,
        tiling: TilingConfig | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Video `[B, 3, F, H, W]` -> latents in VAE space `[B, 16, (F-1)/4+1, H/8, W/8]`.

        The posterior mean, or a draw from it when sample=True. Multiply by scaling_factor for the DiT.
        """
        mean, logvar = self.encode_moments(video, tiling=tiling).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise


# ---------------------------------------------------------------------------------------------
# Checkpoint loading: the release's vae/pytorch_model.pt or diffusers' vae/*.safetensors.

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "pytorch_model.pt",
    "diffusion_pytorch_model.bin",
)
RELEASE_SUBDIR = "hunyuan-video-t2v-720p"  # the release's ckpts/ holds the DiT and VAE under it
_JSON_RENAMES = {"temporal_compression_ratio": "time_compression_ratio"}  # diffusers -> release name


class VAECheckpointError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the model built from the config."""


def find_vae_files(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file, a `vae/` folder, or a folder holding `vae/`."""
    path = Path(path)
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    for folder in (path, path / "vae", path / RELEASE_SUBDIR / "vae"):
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                config = folder / "config.json"
                return folder / name, config if config.is_file() else None
    raise FileNotFoundError(
        f"no VAE weights in {path} or {path / 'vae'}: looked for {', '.join(WEIGHT_FILES)}"
    )


def config_from_json(path: str | Path) -> VAEConfig:
    """VAEConfig from the release's or diffusers' config.json; keys it does not model are ignored."""
    raw = json.loads(Path(path).read_text())
    act = raw.get("act_fn", "silu")
    if act != "silu":
        raise ValueError(f"{path}: act_fn {act!r} is not supported (only 'silu')")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    kwargs = {_JSON_RENAMES.get(k, k): v for k, v in raw.items() if _JSON_RENAMES.get(k, k) in fields}
    n_blocks = len(kwargs.get("block_out_channels", VAEConfig.block_out_channels))
    for key in ("down_block_types", "up_block_types"):
        if key in raw and len(raw[key]) != n_blocks:
            raise ValueError(f"{path}: {key} has {len(raw[key])} entries for {n_blocks} block_out_channels")
    try:
        return VAEConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a VAE checkpoint file on the CPU (memory-mapped where the format allows).

    Unwrapping (`state_dict` / `module` / ...) is the shared reader's; when any key starts with
    `vae.` only those keys are kept, prefix removed (the release's loader does the same: its file
    may hold other modules' weights beside the VAE's).
    """
    sd = read_weights(path)
    if any(k.startswith("vae.") for k in sd):
        sd = {k.removeprefix("vae."): v for k, v in sd.items() if k.startswith("vae.")}
    return sd


def load_vae(
    path_or_dir: str | Path,
    config: VAEConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> HunyuanVideoVAE:
    """Build the VAE and load weights strictly, in eval mode with gradients off.

    path_or_dir: a weights file, a `vae/` folder, or a model folder holding `vae/`. The config is
    `config` if given, else the `config.json` next to the weights, else the release's defaults.
    dtype None keeps the checkpoint's floating dtype; device None means the CPU.
    """
    weights, config_json = find_vae_files(path_or_dir)
    cfg = config or (config_from_json(config_json) if config_json else VAEConfig())
    cfg_source = (
        "the config argument" if config else str(config_json or "the release defaults (no config.json)")
    )
    sd = read_state_dict(weights)
    with torch.device("meta"):
        model = HunyuanVideoVAE(cfg)
    check_state_dict(model, sd, weights, target=f"the VAE built from {cfg_source}", error=VAECheckpointError)
    model.load_state_dict(sd, strict=True, assign=True)  # adopts the (mmapped) tensors: no 2nd copy
    dtype = dtype or next(iter(sd.values())).dtype
    return model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
