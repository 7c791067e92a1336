"""Wan2.1 text-to-video DiT configuration: one frozen dataclass, a few named presets.

`wan2.1-t2v-1.3b` and `wan2.1-t2v-14b` are the public releases (wan/configs/wan_t2v_*.py of the
release: qk-norm and cross-attention norm on, eps 1e-6, patch (1, 2, 2), 512 text tokens of umT5-XXL
width 4096). `wan-tiny` keeps every structural feature at a size for multi-process CPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    name: str
    hidden_size: int  # the release's `dim`
    num_heads: int
    depth: int  # the release's `num_layers`
    mlp_hidden: int  # the release's `ffn_dim`
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL hidden states
    freq_dim: int = 256  # sinusoidal timestep features
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); patch_embedding is a Conv3d, kernel = stride
    eps: float = 1e-6
    text_len: int = 512  # text is zero-padded to this many tokens, all of them attended to
    rope_theta: float = 10000.0
    # Latent geometry of the VAE this DiT was trained with (4x temporal, 8x spatial).
    vae_temporal_ratio: int = 4
    vae_spatial_ratio: int = 8
    vae_preset: str = "wan2.1"
    guidance_embed: bool = False  # Wan runs classifier-free guidance; nothing is embedded

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        d = self.head_dim
        if d % 2 or d < 6:
            raise ValueError(
                f"preset {self.name!r}: head_dim {d} must be even and >= 6 (the 3-axis RoPE gives "
                "each of t, h, w at least one rotated pair)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_axes_dim(self) -> tuple[int, int, int]:
        """Channels of the head dim rotated by the t, h and w positions (the release's split:
        h and w get 2*(d//6) each, t the rest)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

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


PRESETS: dict[str, WanConfig] = {
    cfg.name: cfg
    for cfg in (
        WanConfig(name="wan2.1-t2v-1.3b", hidden_size=1536, num_heads=12, depth=30, mlp_hidden=8960),
        WanConfig(name="wan2.1-t2v-14b", hidden_size=5120, num_heads=40, depth=40, mlp_hidden=13824),
        # 4 heads of 16 (RoPE split 8/4/4) so that ulysses degrees 1, 2 and 4 divide the heads.
        WanConfig(
            name="wan-tiny",
            hidden_size=64,
            num_heads=4,
            depth=2,
            mlp_hidden=128,
            text_dim=32,
            freq_dim=32,
            text_len=16,
            vae_preset="tiny",
        ),
    )
}


def get_preset(name: str, **overrides) -> WanConfig:
    """The named preset, optionally with fields replaced (e.g. depth for benchmarks)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
    return replace(cfg, **overrides) if overrides else cfg


__all__ = ["PRESETS", "WanConfig", "get_preset"]
