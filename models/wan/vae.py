"""The Wan2.1 causal video VAE: 4x in time, 8x in space, 16 latent channels.

Layouts: video `[B, 3, F, H, W]` in [-1, 1] with F = 4k+1 and H, W multiples of 8; latents
`[B, 16, T, h, w]` with T = (F-1)/4 + 1, h = H/8, w = W/8.

Normalisation: the DiT works on normalised latents (mu - mean) / std, per channel, with the
release's 16 means and stds (`WanVaeConfig.latents_mean`, `latents_std`). `encode` returns them
and `decode` takes them; the network itself sees the raw ones.

Both passes run the release's chunked causal schedule (`vae_blocks.FrameCache`): encode takes
frame 0 alone and then 4 frames at a time, decode one latent frame at a time, so activations of
one chunk are alive at once whatever the video's length.

State-dict keys are the release's (`Wan2.1_VAE.pth`); `load_vae` reads that file or the
diffusers folder (`vae/`), converting diffusers' key names (`diffusers_to_release`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import CheckpointError, assign_state_dict, check_state_dict, read_state_dict
from .vae_blocks import CausalConv3d, Decoder, Encoder, FrameCache

# The release's per-channel statistics of the raw latent mean (wan/modules/vae.py, WanVAE).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class WanVaeConfig:
    """The VAE's hyper-parameters; the defaults are the Wan2.1 release's.

    `temporal_downsample[i]`: whether encoder stage i (of len(dim_mult) - 1 resampling stages)
    also halves time; the decoder uses the reverse. 2 of 3 give the 4x temporal compression.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            problems.append(
                f"temporal_downsample has {len(self.temporal_downsample)} entries for "
                f"{len(self.dim_mult) - 1} resampling stages (len(dim_mult) - 1)"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            problems.append(f"latents_mean / latents_std need z_dim = {self.z_dim} entries")
        if any(s <= 0 for s in self.latents_std):
            problems.append("latents_std must be positive")
        if self.base_dim % 2 or self.num_res_blocks < 1:
            problems.append("base_dim must be even (the decoder's up-sampling halves widths), num_res_blocks >= 1")
        if problems:
            raise ValueError("WanVaeConfig: " + "; ".join(problems))

    @property
    def time_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


VAE_PRESETS = {
    "wan2.1": WanVaeConfig(),
    # The release's structure (4 stages, 4x/8x, middle attention, width-changing shortcuts, the
    # decoder's halving) at a width where a CPU decode of a 5x8x8 latent takes ~0.1 s.
    "tiny": WanVaeConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


class WanVAE(nn.Module):
    """Keys: `encoder.*`, `conv1.*` (moments 1x1x1), `conv2.*` (latents 1x1x1), `decoder.*`."""

    def __init__(self, config: WanVaeConfig | None = None):
        super().__init__()
        self.config = cfg = config or WanVaeConfig()
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as fp32 `[1, z, 1, 1, 1]` on `like`'s device."""
        cfg = self.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        to = dict(dtype=torch.float32, device=like.device)
        return torch.tensor(cfg.latents_mean, **to).view(shape), torch.tensor(cfg.latents_std, **to).view(shape)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latent mean -> what the DiT sees, (mu - mean) / std, in fp32."""
        mean, std = self._stats(mu)
        return (mu.float() - mean) * (1.0 / std)  # the release multiplies by 1/std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> raw latents z * std + mean, in fp32."""
        mean, std = self._stats(z)
        return z.float() / (1.0 / std) + mean

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """Video `[B, 3, F, H, W]` in [-1, 1] -> raw moments `[B, 2z, T, h, w]` (mean, then logvar),
        in the module's dtype: frame 0 alone, then chunks of 4 frames (the release's schedule)."""
        cfg = self.config
        rt, rs = cfg.time_compression, cfg.spatial_compression
        f, hh, ww = video.shape[2:] if video.ndim == 5 else (0, 0, 0)
        if video.ndim != 5 or video.shape[1] != cfg.in_channels or (f - 1) % rt or hh % rs or ww % rs:
            raise ValueError(
                f"encode expects video [B, {cfg.in_channels}, {rt}k+1, {rs}m, {rs}n], got {tuple(video.shape)}"
            )
        video = video.to(self.conv1.weight)
        cache = FrameCache()
        starts = [0, *range(1, f, rt)]
        chunks = [self.encoder(video[:, :, s : s + (1 if s == 0 else rt)], cache) for s in starts]
        return self.conv1(torch.cat(chunks, dim=2))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video `[B, 3, F, H, W]` in [-1, 1] -> normalised posterior mean `[B, z, T, h, w]` (fp32)."""
        return self.normalize(self.encode_moments(video)[:, : self.config.z_dim])

    def _check_latents(self, z: torch.Tensor) -> WanVaeConfig:
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"decode expects latents [B, {cfg.z_dim}, T, h, w], got {tuple(z.shape)}")
        return cfg

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents `[B, z, T, h, w]` -> unclamped video `[B, 3, 4(T-1)+1, 8h, 8w]` in the
        module's dtype, one latent frame per chunk (the release's schedule)."""
        cfg = self._check_latents(z)
        x = self.conv2(z.to(self.conv2.weight))
        b, _, t, h, w = x.shape
        rt, rs = cfg.time_compression, cfg.spatial_compression
        out = x.new_empty(b, cfg.out_channels, 1 + rt * (t - 1), rs * h, rs * w)
        cache = FrameCache()
        for i in range(t):
            start = 0 if i == 0 else 1 + rt * (i - 1)
            frames = self.decoder(x[:, :, i : i + 1], cache)
            out[:, :, start : start + frames.shape[2]] = frames
        return out

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiling=None) -> torch.Tensor:
        """Normalised latents `[B, z, T, h, w]` -> video `[B, 3, 4(T-1)+1, 8h, 8w]` clamped to
        [-1, 1], in the module's dtype. `tiling`: a `vae_tiling.VaeTiling` (spatial tiles decoded
        one by one and blended, as diffusers' tiled decode), a TILING_PRESETS name, or None."""
        from .vae_tiling import tiled_decode

        self._check_latents(z)
        raw = self.denormalize(z)
        video = self.decode_raw(raw) if tiling is None else tiled_decode(self, raw, tiling)
        return video.clamp_(-1, 1)


def vae_params(preset: str | WanVaeConfig = "wan2.1") -> int:
    """Parameter count of a preset's VAE (encoder included), from shapes on the meta device."""
    cfg = VAE_PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = WanVAE(cfg)
    return sum(math.prod(p.shape) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints: the release's Wan2.1_VAE.pth or diffusers' vae/ folder (AutoencoderKLWan).

RELEASE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_DIR = "vae"
DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
StateDict = dict[str, torch.Tensor]


class VaeCheckpointError(CheckpointError):
    """A VAE checkpoint or config that does not fit the model."""


@dataclass(frozen=True)
class VaeFiles:
    """Where a VAE's weights are: `layout` "release" (config None) or "diffusers"."""

    layout: str
    weights: Path
    config: Path | None = None


def find_vae_files(model_dir: str | Path) -> VaeFiles:
    """The VAE in `model_dir`: `<dir>/Wan2.1_VAE.pth` (release), else `<dir>/vae/` holding
    config.json and diffusion_pytorch_model.safetensors (diffusers; `<dir>` may be that folder).
    A path to a weights file is taken as it is (a .safetensors needs its config.json beside it)."""
    path = Path(model_dir)
    if path.is_file():
        if path.suffix == ".safetensors" and (path.parent / DIFFUSERS_FILES[0]).is_file():
            return VaeFiles("diffusers", path, path.parent / DIFFUSERS_FILES[0])
        if path.suffix != ".safetensors":
            return VaeFiles("release", path)
    elif (path / RELEASE_FILE).is_file():
        return VaeFiles("release", path / RELEASE_FILE)
    for folder in (path / DIFFUSERS_DIR, path):
        config, weights = (folder / name for name in DIFFUSERS_FILES)
        if config.is_file() and weights.is_file():
            return VaeFiles("diffusers", weights, config)
    sub = path / DIFFUSERS_DIR
    raise FileNotFoundError(
        f"no Wan VAE at {path}: looked for {path / RELEASE_FILE} (release layout) and "
        f"{sub / DIFFUSERS_FILES[0]} + {sub / DIFFUSERS_FILES[1]} (diffusers layout)"
    )


# diffusers' config.json values that change the network in ways this model does not build.
_UNSUPPORTED = {"attn_scales": [], "is_residual": False, "patch_size": None}


def config_from_diffusers(path: str | Path) -> WanVaeConfig:
    """WanVaeConfig from diffusers' AutoencoderKLWan config.json (missing keys: its defaults,
    which are the release's). Latent statistics other than the release's are refused: the DiT
    was trained on latents normalised with exactly those."""
    raw = json.loads(Path(path).read_text())
    bad = [f"{k} = {raw[k]!r} (supported: {v!r})" for k, v in _UNSUPPORTED.items() if k in raw and raw[k] != v]
    base = raw.get("base_dim", WanVaeConfig.base_dim)
    if raw.get("decoder_base_dim") not in (None, base):
        bad.append(f"decoder_base_dim = {raw['decoder_base_dim']} (supported: None or base_dim {base})")
    if bad:
        raise VaeCheckpointError(f"{path}: unsupported AutoencoderKLWan config: {'; '.join(bad)}")
    names = {"base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
             "temperal_downsample": "temporal_downsample", "in_channels": "in_channels",
             "out_channels": "out_channels", "latents_mean": "latents_mean", "latents_std": "latents_std"}  # fmt: skip
    try:
        cfg = WanVaeConfig(**{ours: raw[theirs] for theirs, ours in names.items() if theirs in raw})
    except (TypeError, ValueError) as err:
        raise VaeCheckpointError(f"{path}: {err}") from err
    for key, release in (("latents_mean", WAN21_LATENTS_MEAN), ("latents_std", WAN21_LATENTS_STD)):
        ours = getattr(cfg, key)
        if len(ours) != len(release) or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, release)):
            raise VaeCheckpointError(f"{path}: {key} differs from the Wan2.1 release's {list(release)}")
    ratios = (("scale_factor_temporal", cfg.time_compression), ("scale_factor_spatial", cfg.spatial_compression))
    for key, value in ratios:
        if raw.get(key) not in (None, value):
            raise VaeCheckpointError(f"{path}: {key} = {raw[key]} but the network compresses by {value}")
    return cfg


def load_vae(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    config: WanVaeConfig | None = None,
) -> WanVAE:
    """The VAE with its weights loaded strictly, in eval mode with gradients off.

    `model_dir`: see `find_vae_files`. The config is diffusers' config.json in that layout (a
    `config` given too must equal it), else `config`, else the "wan2.1" preset. The release runs
    the VAE in fp32 (the default); bf16 and fp16 work too.
    """
    files = find_vae_files(model_dir)
    cfg = config or VAE_PRESETS["wan2.1"]
    if files.layout == "diffusers":
        cfg = config_from_diffusers(files.config)
        if config is not None and config != cfg:
            raise VaeCheckpointError(f"{files.config}: {cfg} differs from the config argument {config}")
    sd = read_state_dict(files.weights)
    if files.layout == "diffusers":
        sd = diffusers_to_release(sd)
    with torch.device("meta"):
        model = WanVAE(cfg)
    target = "the Wan VAE" + (" (keys in the release's names)" if files.layout == "diffusers" else "")
    check_state_dict(model, sd, files.weights, target=target, error=VaeCheckpointError)
    assign_state_dict(model, sd)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# Key layouts. The release nests `residual.{0,2,3,6}` (norm, conv, norm, conv) and `shortcut` in
# each residual block and lists the decoder's blocks flat (`upsamples.K`); diffusers names them
# norm1/conv1/norm2/conv2/conv_shortcut and groups the decoder into `up_blocks.S.resnets.J` and
# `up_blocks.S.upsamplers.0`. Both maps are renames only (values untouched), inverse of each other;
# the decoder's grouping is read off the keys, so any depth converts. Unknown keys pass unchanged.
_RES = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
        ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))  # fmt: skip
_TOP = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_PART = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
         ("middle.1.", "mid_block.attentions.0."))  # fmt: skip
_MID_RES = (("middle.0.", "mid_block.resnets.0."), ("middle.2.", "mid_block.resnets.1."))


def _swap(rest: str, pairs, forward: bool) -> str | None:
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def _res(rest: str, forward: bool) -> str:
    return _swap(rest, _RES, forward) or rest  # resample.1.* and time_conv.* keep their names


def _res_prefixed(rest: str, pairs, forward: bool) -> str | None:
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        if rest.startswith(src):
            return dst + _res(rest[len(src) :], forward)
    return None


def _release_up_index(sd: StateDict) -> dict[int, str]:
    """Flat decoder index K -> diffusers prefix "up_blocks.S.resnets.J." / "up_blocks.S.upsamplers.0."."""
    flat = {int(m[1]): m[2] for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", k))}
    resamplers = {k for k in flat for r in sd if r.startswith(f"decoder.upsamples.{k}.resample.")}
    out, stage, first = {}, 0, 0
    for k in sorted(flat):
        if k in resamplers:
            out[k], stage, first = f"up_blocks.{stage}.upsamplers.0.", stage + 1, k + 1
        else:
            out[k] = f"up_blocks.{stage}.resnets.{k - first}."
    return out


def release_to_diffusers(sd: StateDict) -> StateDict:
    """Release key names -> diffusers' AutoencoderKLWan names (same tensors)."""
    up = _release_up_index(sd)
    out = {}
    for key, value in sd.items():
        new = _swap(key, _TOP, True)
        part, _, rest = key.partition(".")
        if new is None and part in ("encoder", "decoder"):
            new = _swap(rest, _PART, True) or _res_prefixed(rest, _MID_RES, True)
            if new is None and (m := re.match(r"downsamples\.(\d+)\.(.*)", rest)) and part == "encoder":
                new = f"down_blocks.{m[1]}.{_res(m[2], True)}"
            if new is None and (m := re.match(r"upsamples\.(\d+)\.(.*)", rest)) and part == "decoder":
                prefix = up[int(m[1])]
                new = prefix + (m[2] if "upsamplers" in prefix else _res(m[2], True))
            new = None if new is None else f"{part}.{new}"
        out[new or key] = value
    return out


def _diffusers_up_index(sd: StateDict) -> dict[str, int]:
    """Diffusers prefix "up_blocks.S.resnets.J." / "up_blocks.S.upsamplers.0." -> flat index K."""
    resnets: dict[int, int] = {}
    upsamplers: set[int] = set()
    for key in sd:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            resnets[int(m[1])] = max(resnets.get(int(m[1]), 0), int(m[2]) + 1)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", key):
            upsamplers.add(int(m[1]))
    out, first = {}, 0
    for s in range(max([*resnets, *upsamplers], default=-1) + 1):
        n = resnets.get(s, 0)
        out.update({f"up_blocks.{s}.resnets.{j}.": first + j for j in range(n)})
        out[f"up_blocks.{s}.upsamplers.0."] = first + n
        first += n + (s in upsamplers)
    return out


def diffusers_to_release(sd: StateDict) -> StateDict:
    """diffusers' AutoencoderKLWan key names -> the release's (same tensors)."""
    up = _diffusers_up_index(sd)
    out = {}
    for key, value in sd.items():
        new = _swap(key, _TOP, False)
        part, _, rest = key.partition(".")
        if new is None and part in ("encoder", "decoder"):
            new = _swap(rest, _PART, False) or _res_prefixed(rest, _MID_RES, False)
            if new is None and (m := re.match(r"down_blocks\.(\d+)\.(.*)", rest)) and part == "encoder":
                new = f"downsamples.{m[1]}.{_res(m[2], False)}"
            m = re.match(r"(up_blocks\.\d+\.(?:resnets\.\d+|upsamplers\.0)\.)(.*)", rest)
            if new is None and m and part == "decoder":
                new = f"upsamples.{up[m[1]]}." + (m[2] if "upsamplers" in m[1] else _res(m[2], False))
            new = None if new is None else f"{part}.{new}"
        out[new or key] = value
    return out
