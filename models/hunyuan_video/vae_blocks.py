"""Building blocks of HunyuanVideo's causal 3D VAE: causal convs, resnets, resamplers, attention.

Every activation is `[B, C, T, H, W]`. Attribute names follow the release's state-dict keys
(`conv1.conv.weight`, `upsamplers.0.conv.conv.weight`, `attentions.0.to_out.0.weight`, ...), so a
release or diffusers checkpoint loads with no renaming. These modules are for inference (run them
under `torch.no_grad()`): SiLUs and residual adds run in place to keep the peak activation memory
of large tiles down, which autograd would refuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from models.hunyuan_video.vae import VAEConfig

Scale = tuple[int, int, int]  # (t, h, w) resampling factor, each 1 or 2


class CausalConv3d(nn.Module):
    """Conv3d that sees only the current and earlier frames. `[B, C, T, H, W] -> [B, C', T', H', W']`.

    All k-1 temporal padding frames go in front (copies of frame 0), none at the back, so output
    frame t depends on input frames <= t. Space is padded by edge replication too, not zeros:
    that is the release's rule, and zeros would change every border pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: Scale = (1, 1, 1)):
        super().__init__()
        k = kernel_size
        self.pad = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # (W left, W right, H top, H bottom, T front, T back)
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, mode="replicate")
        return self.conv(x)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus a (1x1x1 conv) shortcut.

    GroupNorm on the 5-D tensor pools each group over C/groups x T x H x W, future frames included,
    as the release does: this is what makes tiled decoding inexact (per-tile statistics).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class CausalUpsample(nn.Module):
    """Nearest-neighbour upsampling, then a causal 3x3x3 conv. `[B, C, T, H, W] -> [B, C, T', sH, sW]`.

    With temporal factor 2, T' = 1 + 2(T-1): frame 0 is resized only in space and every later
    frame is doubled. That keeps "latent frame 0 = video frame 0 alone" through the decoder.
    """

    def __init__(self, channels: int, scale: Scale):
        super().__init__()
        self.scale = scale
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        # Doubling every frame and dropping the first copy of frame 0 equals resizing frame 0 in
        # space only and doubling the rest, without splitting and concatenating the tensor.
        return self.conv(up[:, :, self.scale[0] - 1 :])


class CausalDownsample(nn.Module):
    """A strided causal 3x3x3 conv. `[B, C, T, H, W] -> [B, C, (T-1)/st + 1, H/sh, W/sw]` (T = 4k+1, H, W even)."""

    def __init__(self, channels: int, scale: Scale):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
    """SDPA in which query block f attends to key blocks 0..f and nothing later.

    q, k, v: `[B, heads, L, D]` with L = n_blocks * block (block = H*W tokens of one frame).
    One unmasked SDPA per block over a key prefix: no L x L mask is materialised (the release
    builds one: 0.6 GB in fp16 for a 17x32x32 tile, L^2 in general), every fused backend stays
    eligible, and no masked-out score is computed.
    """
    out = torch.empty_like(q)
    for start in range(0, q.shape[2], block):
        end = start + block
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
    return out


class FrameCausalAttention(nn.Module):
    """One-head self-attention over all T*H*W positions, full within a frame, causal across frames.

    `[B, C, T, H, W] -> [B, C, T, H, W]` with a residual connection; head dim = C (512 in the release).
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0", as in the release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, T*H*W, C], frame-major
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, L, C]
        out = self.to_out[0](block_causal_attention(q, k, v, h * w).squeeze(1))  # [B, L, C]
        return x + out.transpose(1, 2).reshape(b, c, t, h, w)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution. `[B, C, T, h, w]` in and out."""

    def __init__(self, channels: int, groups: int, eps: float, add_attention: bool):
        super().__init__()
        attn = [FrameCausalAttention(channels, groups, eps)] if add_attention else []
        self.attentions = nn.ModuleList(attn)  # registered first: the release's key order
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """`num_layers` resnets, then an optional strided causal conv (`downsamplers.0`)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, scale: Scale, groups: int, eps: float):
        super().__init__()
        chans = [in_ch] + [out_ch] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock(chans[i], out_ch, groups, eps) for i in range(num_layers))
        down = scale != (1, 1, 1)
        self.downsamplers = nn.ModuleList([CausalDownsample(out_ch, scale)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional nearest upsample + causal conv (`upsamplers.0`)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, scale: Scale, groups: int, eps: float):
        super().__init__()
        chans = [in_ch] + [out_ch] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock(chans[i], out_ch, groups, eps) for i in range(num_layers))
        up = scale != (1, 1, 1)
        self.upsamplers = nn.ModuleList([CausalUpsample(out_ch, scale)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """Video `[B, in, F, H, W]` -> moments `[B, 2*latent, (F-1)/rt + 1, H/rs, W/rs]` (mean, logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.block_scale(i), g, eps) for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=eps)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """Latents `[B, latent, T, h, w]` -> video `[B, out, rt*(T-1) + 1, rs*h, rs*w]` (no clamp, no tanh)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        # up_blocks registered before mid_block: the release's state_dict order.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.block_scale(i), g, eps) for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[0], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=eps)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))
