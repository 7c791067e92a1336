"""Building blocks of the Wan2.1 causal video VAE, run chunk by chunk with a frame cache.

Every activation is `[B, C, T, H, W]`. The release encodes and decodes a video a few frames at a
time (encode: frame 0 alone, then 4 frames per chunk; decode: one latent frame per chunk). A
`FrameCache` carries, from one chunk to the next, the last input frames of every causal conv
(its temporal context), so a chunked pass sees the same inputs as one pass over the whole video
while holding only one chunk's activations.

Attribute names and nesting follow the release's checkpoint (`residual.2.weight`,
`resample.1.weight`, `time_conv.weight`, `head.0.gamma`, ...), so `Wan2.1_VAE.pth` loads as is.
These modules are for inference under `torch.no_grad()`: SiLUs and residual adds run in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .vae import WanVaeConfig

_HALF = (torch.float16, torch.bfloat16)


class FrameCache:
    """State one causal pass carries between chunks, keyed by module: the last input frames of
    each causal conv, and which temporal resamplers have seen their first chunk."""

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()

    def past(self, module: nn.Module) -> torch.Tensor | None:
        return self._frames.get(module)

    def keep(self, module: nn.Module, frames: torch.Tensor) -> None:
        # A copy: a view would keep the whole chunk's activation alive until the next chunk.
        self._frames[module] = frames.clone()

    def first_chunk(self, module: nn.Module) -> bool:
        """True on the first call for `module`, False on every later one."""
        if module in self._started:
            return False
        self._started.add(module)
        return True


class CausalConv3d(nn.Conv3d):
    """Conv3d whose output frame t sees input frames <= t: `[B, C, T, H, W] -> [B, C', T', H', W']`.

    `context` frames of history go in front of the chunk: the cached last frames of the previous
    chunk, topped up with zero frames (all zeros on the first chunk). Space is zero-padded by
    kernel // 2 on each side, as the release does (the conv's own padding, same numbers).
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, *, context: int | None = None):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.context = kernel[0] - 1 if context is None else context

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if self.context == 0:
            return super().forward(x)
        past = cache.past(self) if cache is not None else None
        if past is not None:
            x = torch.cat([past, x], dim=2)
        if cache is not None:
            cache.keep(self, x[:, :, -self.context :])
        missing = self.context - (0 if past is None else past.shape[2])
        if missing > 0:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x||_C * sqrt(C) * gamma over the channel axis (dim 1), per pixel and frame.

    `gamma` is `[C, 1, 1, 1]` for 5-D inputs and `[C, 1, 1]` for per-frame 4-D ones (`images`),
    the release's shapes. Half-precision inputs are normalised in fp32 (the sum of squares of a
    few hundred channels overflows fp16).
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float() if x.dtype in _HALF else x, dim=1).to(x.dtype)
        return y.mul_(self.gamma * self.scale)


def _per_frame_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d applied to every frame of `[B, C, T, H, W]` as a (1, k, k) Conv3d: same numbers,
    no `[(B T), C, H, W]` transposed copies of the largest activations."""
    return F.conv3d(
        x, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding)
    )


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> causal conv -> RMSNorm -> SiLU -> causal conv, plus a shortcut
    (a 1x1x1 conv when the width changes). `residual` keeps the release's indices: 0 norm,
    2 conv, 3 norm, 6 conv; 1 and 4 are the SiLUs and 5 the (inference no-op) dropout."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.ModuleList([
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3),
        ])  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        skip = self.shortcut(x) if self.shortcut is not None else x
        h = conv1(F.silu(norm1(x), inplace=True), cache)
        h = conv2(F.silu(norm2(h), inplace=True), cache)
        return h.add_(skip)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (head dim = C), residual.

    `[B, C, T, H, W] -> same`. Frames never attend to each other, so the block is causal.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [BT, HW, 3C]
        q, k, v = (part.unsqueeze(1) for part in qkv.chunk(3, dim=-1))  # each [BT, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [BT, HW, C]
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4).add(x)


class Resample(nn.Module):
    """x2 down- or up-sampling in space, optionally also in time (mode "down2d", "down3d",
    "up2d", "up3d"). `resample.1` is the spatial Conv2d (index 0 held the release's parameter-free
    pad / nearest-upsample module); `time_conv` the temporal conv of the 3d modes.

    Down: zero pad right/bottom by 1, 3x3 conv stride 2 -> `[B, C, T', H/2, W/2]`. In time, the
    first chunk passes through; every later chunk is convolved (kernel 3, stride 2) with the last
    frame of the chunk before it in front, so frames 1 + 2k, 2 + 2k -> 1 frame.
    Up: time first: the first chunk passes through; later chunks go through a causal conv to 2C
    channels whose halves become frames 2t and 2t+1. Then nearest x2 in space and a 3x3 conv to C/2.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("down2d", "down3d", "up2d", "up3d"):
            raise ValueError(f"Resample mode {mode!r}; valid: down2d, down3d, up2d, up3d")
        self.mode = mode
        if mode.startswith("down"):
            conv = nn.Conv2d(dim, dim, 3, stride=2)
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), (2, 1, 1), context=0) if mode == "down3d" else None
        else:
            conv = nn.Conv2d(dim, dim // 2, 3, padding=1)
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if mode == "up3d" else None
        self.resample = nn.ModuleList([nn.Identity(), conv])

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        if self.mode.startswith("up"):
            if self.time_conv is not None and not cache.first_chunk(self):
                x = _interleave_halves(self.time_conv(x, cache))
            return _per_frame_conv2d(self.resample[1], _nearest2x(x))
        x = _per_frame_conv2d(self.resample[1], F.pad(x, (0, 1, 0, 1)))
        if self.time_conv is None:
            return x
        past = cache.past(self)
        cache.keep(self, x[:, :, -1:])
        return x if past is None else self.time_conv(torch.cat([past, x], dim=2))


def _interleave_halves(y: torch.Tensor) -> torch.Tensor:
    """`[B, 2C, T, H, W] -> [B, C, 2T, H, W]`: channels [0, C) give frame 2t, [C, 2C) frame 2t+1."""
    b, c2, t, h, w = y.shape
    return y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)


def _nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 in H and W (equal to "nearest-exact" at an integer factor), in any dtype."""
    b, c, t, h, w = x.shape
    return x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)


def _run(layers, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, cout: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3)])


def _run_head(head: nn.ModuleList, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
    return head[2](F.silu(head[0](x), inplace=True), cache)


class Encoder(nn.Module):
    """One chunk of video `[B, 3, n, H, W]` -> moments `[B, 2 z, n', H/8, W/8]` (mean, logvar).

    Stages of `num_res_blocks` residual blocks at base_dim x dim_mult[i] channels, each but the
    last followed by a x2 down-sampling (in time too where `temporal_downsample[i]`), then the
    middle (residual, attention, residual) and the head. `downsamples` is one flat list.
    """

    def __init__(self, cfg: WanVaeConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3)
        layers: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i != last:
                layers.append(Resample(cout, "down3d" if cfg.temporal_downsample[i] else "down2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = _run(self.downsamples, self.conv1(x, cache), cache)
        return _run_head(self.head, _run(self.middle, x, cache), cache)


class Decoder(nn.Module):
    """One chunk of latents `[B, z, n, h, w]` -> video `[B, 3, n', 8h, 8w]`.

    conv1 and the middle at base_dim x dim_mult[-1], then stages of num_res_blocks + 1 residual
    blocks at base_dim x dim_mult[::-1][i], each but the last followed by a x2 up-sampling (in
    time too where `temporal_downsample[::-1][i]`) whose conv halves the width, so stage i > 0
    starts from half of its listed width. `upsamples` is one flat list.
    """

    def __init__(self, cfg: WanVaeConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin if i == 0 else cin // 2
            for j in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i != last:
                layers.append(Resample(cout, "up3d" if temporal[i] else "up2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], cfg.out_channels)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = _run(self.middle, self.conv1(x, cache), cache)
        return _run_head(self.head, _run(self.upsamples, x, cache), cache)
