"""HunyuanVideo DiT configuration: one frozen dataclass, several named presets.

The `hunyuan-video-13b` preset is the public release (HYVideo-T/2-cfgdistill); the small presets
keep every structural feature (double/single blocks, token refiner, guidance embedding, 3D RoPE)
at sizes that run in CPU tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class HunyuanVideoConfig:
    name: str
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); img_in is a Conv3d with kernel = stride
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth_double: int = 20
    depth_single: int = 40
    refiner_depth: int = 2
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # (t, h, w); sums to head_dim
    rope_theta: float = 256.0
    text_states_dim: int = 4096  # LLM hidden states
    pooled_dim: int = 768  # CLIP pooled output
    guidance_embed: bool = True
    norm_eps: float = 1e-6
    # Latent geometry of the VAE this DiT was trained with (4x temporal, 8x spatial).
    vae_temporal_ratio: int = 4
    vae_spatial_ratio: int = 8
    vae_preset: str = "hunyuan-video"  # models.hunyuan_video.vae.VAE_PRESETS key, for random weights
    # "release": the LLM + CLIP folders of a model directory; "builtin": the weightless hashed-word
    # encoder (models/text_builtin.py) even with --model-dir, for a DiT trained on it.
    text_encoder: str = "release"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.text_encoder not in ("release", "builtin"):
            raise ValueError(f"preset {self.name!r}: text_encoder {self.text_encoder!r}; valid: release, builtin")
        if sum(self.rope_axes_dim) != self.head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(
                f"preset {self.name!r}: rope_axes_dim {self.rope_axes_dim} must be even numbers "
                f"summing to head_dim {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim_in(self) -> int:
        """Features of one patchified input token: C * pt * ph * pw (C outermost)."""
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def patch_dim_out(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_channels * pt * ph * pw

    def latent_grid(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        """Latent shape (T, H, W) for a video of `frames` x `height` x `width` pixels."""
        return (
            (frames - 1) // self.vae_temporal_ratio + 1,
            height // self.vae_spatial_ratio,
            width // self.vae_spatial_ratio,
        )

    def token_grid(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') after patchifying the latent: image tokens = T'*H'*W'."""
        t, h, w = self.latent_grid(height, width, frames)
        pt, ph, pw = self.patch_size
        return t // pt, h // ph, w // pw


PRESETS: dict[str, HunyuanVideoConfig] = {
    cfg.name: cfg
    for cfg in (
        HunyuanVideoConfig(name="hunyuan-video-13b"),
        # 8 heads so that ulysses degrees 1, 2, 4 (and 8) divide the head count.
        HunyuanVideoConfig(
            name="tiny",
            hidden_size=128,
            num_heads=8,
            depth_double=2,
            depth_single=2,
            refiner_depth=1,
            rope_axes_dim=(4, 6, 6),
            text_states_dim=64,
            pooled_dim=32,
            vae_preset="tiny",
        ),
        # The demo model, trained here on procedural videos (models/demo/) and shipped with the
        # code: 128x128x17 videos, the built-in text encoder, no guidance embedding (no distillation).
        HunyuanVideoConfig(
            name="hunyuan-video-demo",
            hidden_size=256,
            num_heads=8,
            depth_double=2,
            depth_single=2,
            refiner_depth=1,
            rope_axes_dim=(8, 12, 12),
            text_states_dim=64,
            pooled_dim=32,
            guidance_embed=False,
            vae_preset="demo",
            text_encoder="builtin",
        ),
        # The release's width and heads with few blocks: real per-block cost on a GPU.
        HunyuanVideoConfig(name="hunyuan-video-2block", depth_double=1, depth_single=1),
    )
}


def get_preset(name: str, **overrides) -> HunyuanVideoConfig:
    """The named preset, optionally with fields replaced (e.g. depth for benchmarks)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
    return replace(cfg, **overrides) if overrides else cfg
