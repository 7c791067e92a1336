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


def group_moments(
    x: torch.Tensor, groups: int, chunk_elems: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per (batch, group) of x `[B, C, T, ...]`, each `[B, G]`, in >= fp32.

    Frames are reduced in chunks of about `chunk_elems` per batch item, each upcast on its own (an
    fp16 variance can overflow; a whole fp32 copy of a large tile would double its memory), and the
    chunks are merged with Chan's formula: var = sum_k w_k (var_k + (mean_k - mean)^2).
    """
    b, c, t = x.shape[:3]
    acc = torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(b, groups, c // groups, t, -1)  # [B, G, C/G, T, rest]
    step = max(1, chunk_elems // max(1, c * xg.shape[-1]))
    weights, means, variances = [], [], []
    for t0 in range(0, t, step):
        part = xg[:, :, :, t0 : t0 + step]
        var, mean = torch.var_mean(part.to(acc), dim=(2, 3, 4), correction=0)
        weights.append(part.shape[3] / t)
        means.append(mean)
        variances.append(var)
    mean = sum(w * m for w, m in zip(weights, means, strict=True))
    var = sum(w * (v + (m - mean) ** 2) for w, m, v in zip(weights, means, variances, strict=True))
    return mean, var


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same result) that keeps a GPU busy on large 5-D tiles.

    torch's CUDA kernel reduces each (batch, group) row in one thread block: 32 blocks for a whole
    1 GB tile, which left most of an H200 idle and made GroupNorm 36% of a release tile's decode
    time. Here the statistics come from torch's general reductions (spread over many blocks) and
    the affine map is one fused multiply-add with fp32 scale and shift, written in x's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        mean, var = group_moments(x, self.num_groups)
        per_group = c // self.num_groups
        scale = torch.rsqrt(var + self.eps).repeat_interleave(per_group, dim=1) * self.weight.to(mean.dtype)
        shift = self.bias.to(mean.dtype) - mean.repeat_interleave(per_group, dim=1) * scale  # [B, C]
        bcast = (b, c) + (1,) * (x.ndim - 2)
        if torch.is_grad_enabled():  # out= is not differentiable; this path makes an fp32 temporary
            return torch.addcmul(shift.view(bcast), x, scale.view(bcast)).to(x.dtype)
        return torch.addcmul(shift.view(bcast), x, scale.view(bcast), out=torch.empty_like(x))


def _fill_causal_border_(out: torch.Tensor, p: int, tp: int) -> torch.Tensor:
    """Fill the border of `[B, C, tp+T, H+2p, W+2p]` around its written interior, in place:
    p replicated pixels on each spatial side, then tp copies of the first frame in front."""
    if p:
        body = out[:, :, tp:]
        body[..., p:-p, :p] = body[..., p:-p, p : p + 1]
        body[..., p:-p, -p:] = body[..., p:-p, -p - 1 : -p]
        body[..., :p, :] = body[..., p : p + 1, :]
        body[..., -p:, :] = body[..., -p - 1 : -p, :]
    if tp:
        out[:, :, :tp] = out[:, :, tp : tp + 1]
    return out


def causal_pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """`F.pad(x, (p, p, p, p, k-1, 0), mode="replicate")` with p = k//2, done with plain copies.

    `[B, C, T, H, W] -> [B, C, T+k-1, H+2p, W+2p]`. torch's replicate-pad kernel ran at under half
    the copy bandwidth on an H200 (4.2 ms vs 1.9 ms for a 1 GB fp16 activation).
    """
    p, tp = k // 2, k - 1
    b, c, t, h, w = x.shape
    out = x.new_empty(b, c, t + tp, h + 2 * p, w + 2 * p)
    out[:, :, tp:, p : p + h, p : p + w] = x
    return _fill_causal_border_(out, p, tp)


def upsample_causal_pad(x: torch.Tensor, scale: Scale, k: int) -> torch.Tensor:
    """Causal nearest upsampling followed by `causal_pad(., k)`, written straight into one buffer.

    `[B, C, T, H, W] -> [B, C, k-1 + 1 + st(T-1), sh H + 2p, sw W + 2p]`: frame 0 is resized in
    space only, every later frame is repeated st times (so "latent frame 0 = video frame 0 alone"
    survives). Skipping F.interpolate's output saves a pass over, and a copy of, the largest
    activations of the decoder.
    """
    st, sh, sw = scale
    p, tp = k // 2, k - 1
    b, c, t, h, w = x.shape
    out = x.new_empty(b, c, tp + 1 + st * (t - 1), sh * h + 2 * p, sw * w + 2 * p)
    inner = out[:, :, tp:, p : p + sh * h, p : p + sw * w]
    src = x[:, :, :, None, :, None, :, None]  # broadcast over the (st, sh, sw) repeats
    inner[:, :, :1].view(b, c, 1, 1, h, sh, w, sw).copy_(src[:, :, :1])
    if t > 1:
        inner[:, :, 1:].view(b, c, t - 1, st, h, sh, w, sw).copy_(src[:, :, 1:])
    return _fill_causal_border_(out, p, tp)


class CausalConv3d(nn.Module):
    """Conv3d that sees only the current and earlier frames. `[B, C, T, H, W] -> [B, C', T', H', W']`.

    All k-1 temporal padding frames go in front (copies of frame 0), none at the back, so output
    frame t depends on input frames <= t. Space is padded by edge replication too, not zeros:
    that is the release's rule, and zeros would change every border pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: Scale = (1, 1, 1)):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(causal_pad(x, self.kernel_size) if self.kernel_size > 1 else x)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus a (1x1x1 conv) shortcut.

    GroupNorm on the 5-D tensor pools each group over C/groups x T x H x W, future frames included,
    as the release does: this is what makes tiled decoding inexact (per-tile statistics).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class CausalUpsample(nn.Module):
    """Causal nearest upsampling, then a causal 3x3x3 conv. `[B, C, T, H, W] -> [B, C, T', sH, sW]`.

    With temporal factor 2, T' = 1 + 2(T-1) (see `upsample_causal_pad`).
    """

    def __init__(self, channels: int, scale: Scale):
        super().__init__()
        self.scale = scale
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = upsample_causal_pad(x, self.scale, self.conv.kernel_size)
        return self.conv.conv(padded)  # the inner Conv3d: padding is already done


class CausalDownsample(nn.Module):
    """A strided causal 3x3x3 conv. `[B, C, T, H, W] -> [B, C, (T-1)/st + 1, H/sh, W/sw]`.

    T - 1 must be a multiple of st and H, W of sh, sw (what `encode` checks at its input)."""

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
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        )
    return out


class FrameCausalAttention(nn.Module):
    """One-head self-attention over all T*H*W positions, full within a frame, causal across frames.

    `[B, C, T, H, W] -> [B, C, T, H, W]` with a residual connection; head dim = C (512 in the release).
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=eps)
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
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.block_scale(i), g, eps)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=eps)
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
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.block_scale(i), g, eps)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[0], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=eps)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))
