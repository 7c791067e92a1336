"""A second model family defined outside models/, launcher/ and parallel/: a tiny DiT of joint
attention blocks, the weightless built-in text encoder and an identity VAE (the latent is the
video's RGB at 1/8 of its size; decoding repeats each pixel 8 x 8). Importing this module registers it; `VIDEODIT_FAMILIES=toy_family` makes `python -m
launcher` import it, which is all a new family needs besides its own code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import models
from models.attention import sdpa_joint_attention
from models.text_builtin import BuiltinTextEncoder

PRESET = "toy-dit"


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    name: str = PRESET
    in_channels: int = 3  # RGB: the identity VAE's latent is the video
    patch_size: tuple[int, int, int] = (1, 1, 1)
    hidden_size: int = 32
    num_heads: int = 4
    depth: int = 2
    text_dim: int = 16
    guidance_embed: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return 2 * self.hidden_size

    def latent_grid(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        return frames, height // 8, width // 8  # a "VAE" that only subsamples space

    def token_grid(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        return self.latent_grid(height, width, frames)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs; x `[B, S, H, D]`, cos/sin `[S, D]`."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.img_qkv, self.txt_qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size), nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.img_out, self.txt_out = nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mod = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, t, vec, cos, sin, txt_lens, attention):
        h = x * (1 + self.mod(vec)[:, None])
        iq, ik, iv = self.img_qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(2)
        tq, tk, tv = self.txt_qkv(t).unflatten(-1, (3, self.heads, -1)).unbind(2)
        img, txt = attention(rotate(iq, cos, sin), rotate(ik, cos, sin), iv, tq, tk, tv, txt_lens)
        return x + self.img_out(img.flatten(-2)), t + self.txt_out(txt.flatten(-2))


class ToyDiT(nn.Module):
    """Tokens in, tokens out (the seam's contract), one joint attention handed in."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.img_in = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.txt_in = nn.Linear(cfg.text_dim, cfg.hidden_size)
        self.time_in = nn.Linear(1, cfg.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(cfg) for _ in range(cfg.depth))
        self.final = nn.Linear(cfg.hidden_size, cfg.in_channels)
        self.set_attention(sdpa_joint_attention)

    def set_attention(self, attention) -> None:
        self.__dict__["_attention"] = attention

    @property
    def dtype(self) -> torch.dtype:
        return self.final.weight.dtype

    def rope(self, grid):
        pos = torch.arange(grid[0] * grid[1] * grid[2], dtype=torch.float32)
        freqs = 1.0 / 100.0 ** (torch.arange(0, self.config.head_dim, 2) / self.config.head_dim)
        angles = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance=None):
        return self.leave(self.run_blocks(self.enter(img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled)))

    # The stage contract of models/step_cache.py, which is all a family needs for --cache.

    def enter(self, img, rope_cos, rope_sin, txt, txt_mask, timestep, pooled, guidance=None) -> "ToyStream":
        vec = torch.tanh(self.time_in(timestep[:, None].to(self.dtype) / 1000.0))
        return ToyStream(img=self.img_in(img.to(self.dtype)), txt=self.txt_in(txt.to(self.dtype)), vec=vec,
                         rope=(rope_cos.to(img.device), rope_sin.to(img.device)), lens=txt_mask.bool().sum(1).cpu())

    def run_blocks(self, s: "ToyStream", start: int = 0, stop: int | None = None) -> "ToyStream":
        x, t = s.img, s.txt
        for block in self.blocks[start:stop]:
            x, t = block(x, t, s.vec, *s.rope, s.lens, self.__dict__["_attention"])
        return dataclasses.replace(s, img=x, txt=t)

    def leave(self, s: "ToyStream") -> torch.Tensor:
        return self.final(s.img)

    def tea_signal(self, s: "ToyStream"):
        """The first block's modulated input, a shard of the tokens."""
        return s.img * (1 + self.blocks[0].mod(s.vec)[:, None]), True


@dataclass(frozen=True)
class ToyStream:
    img: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    rope: tuple
    lens: torch.Tensor


class IdentityVAE(nn.Module):
    """No weights: `decode` maps latent `[1, 3, F, h, w]` -> video `[3, F, 8h, 8w]` (nearest)."""


def build(cfg: ToyConfig, *, device="cpu", dtype=None, seed: int = 0) -> nn.Module:
    with torch.device("meta"):
        model = ToyDiT(cfg)
    if dtype is not None:
        model.to(dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        models.init_random_(model, seed)
    return model.eval().requires_grad_(False)


def patchify(latent: torch.Tensor, patch) -> torch.Tensor:
    """`[B, C, T, H, W]` -> `[B, T*H*W, C]` (t-major)."""
    return latent.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, grid, patch) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, grid)


def decode(vae, latents: torch.Tensor, tiling: str) -> torch.Tensor:
    video = latents[0].clamp(-1, 1).float()
    return video.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2).cpu()


def no_checkpoints(model, path):
    raise models.CheckpointError(f"{path}: the toy family has no checkpoint format")


FAMILY = models.register_family(models.ModelFamily(
    name="toy",
    presets={PRESET: ToyConfig()},
    defaults={PRESET: models.PresetDefaults(height=64, width=64, frames=3, steps=3)},
    build=build,
    load=no_checkpoints,
    blocks=lambda model: [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)],
    patchify=patchify,
    unpatchify=unpatchify,
    text=models.TextSpec(load=lambda model_dir, cfg, *, device, dtype: BuiltinTextEncoder(
        cfg.text_dim, 8, 16, device=device, dtype=dtype), max_tokens=16),
    vae=models.VaeSpec(load=lambda model_dir, cfg, *, device, dtype: IdentityVAE(), decode=decode,
                       tilings=("whole",)),
    guidance="cfg",
    cache=lambda cfg: models.CacheSpec(tea_coefficients=(1.0, 0.0), tea_threshold=0.1, fb_threshold=0.1),
    frame_step=1,
    topology_table=None,  # no YAML: the rule picks the degrees
))
