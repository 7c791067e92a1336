"""Building blocks of the Wan2.1 DiT (module names follow the release's state-dict keys).

Two dtypes run through a block: `cdt`, the dtype of the Linear weights (bf16 in production), and
`wide = promote(cdt, fp32)`, in which the modulation, norms, RoPE and the residual stream are
computed (fp32 for a bf16 model; in fp32/fp64 models both are simply that dtype). This is what the
release computes under `torch.amp.autocast(bfloat16)` with its fp32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..chunking import by_chunks
from ..hunyuan_video.rope import rotate_half

_LOW = (torch.bfloat16, torch.float16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the small fp32 parts for weights of `dtype` (bf16 -> fp32, fp64 -> fp64)."""
    return torch.promote_types(dtype, torch.float32)


class KeepsFp32(nn.Module):
    """Parameters named by `_keeps_fp32(name)` stay fp32 when the module is cast to bf16/fp16.

    The release holds every weight in fp32 and autocasts only the matmuls; the parameters that
    are used outside a bf16 matmul (modulation tables, norm weights, the time embedding and the
    head) therefore keep their fp32 values here, so `model.to(torch.bfloat16)` changes no result.
    Casts to fp64 and device moves apply to them as to any parameter.
    """

    def _keeps_fp32(self, name: str) -> bool:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        keep = {id(p) for n, p in self.named_parameters() if self._keeps_fp32(n)}

        def keep_fp32(t):
            out = fn(t)
            if id(t) in keep and t.dtype == torch.float32 and out.dtype in _LOW:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in the wide dtype, returned in x's dtype."""
    wide = wide_dtype(x.dtype)
    w = weight.to(wide) if weight is not None else None
    b = bias.to(wide) if bias is not None else None
    return F.layer_norm(x.to(wide), (x.shape[-1],), w, b, eps).to(x.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm holding the release's `weight`/`bias` keys (norm3, the cross-attn norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.eps, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMS norm over the whole last dim (across heads), as the release's q/k norm.

    The statistics are wide; the normalised value is rounded to x's dtype before the (wide)
    weight multiplies it, so a bf16 projection gives a wide result exactly as the release's
    `normed.type_as(x) * fp32_weight`.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = wide_dtype(x.dtype)
        xf = x.to(wide)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(wide)


def linear_in(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`layer(x)` computed in `dtype` (input and weights cast to it)."""
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`[B]` -> `[B, dim]` fp64: cos half then sin half, frequencies 10000^(-i/(dim/2)).

    fp64 as the release: at t ~ 1000 an fp32 argument would be off by ~1e-4 rad.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def rope_table(
    grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[T*H*W, sum(axes_dim)]` for a token grid (T, H, W), t-major rows.

    Axis i rotates `axes_dim[i]` consecutive channels by its integer position with frequencies
    theta^(-2j/axes_dim[i]); each value is repeated for the adjacent pair (2j, 2j+1) it rotates,
    which is the release's complex multiply on (x[2j], x[2j+1]) written in real numbers.
    """
    cos_parts, sin_parts = [], []
    for axis, (n, dim) in enumerate(zip(grid, axes_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
        angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs).repeat_interleave(2, dim=1)
        shape = [1, 1, 1, dim]
        shape[axis] = n
        cos_parts.append(angles.cos().view(shape).expand(*grid, dim))
        sin_parts.append(angles.sin().view(shape).expand(*grid, dim))
    head_dim = sum(axes_dim)
    cos = torch.cat(cos_parts, dim=-1).reshape(-1, head_dim)
    sin = torch.cat(sin_parts, dim=-1).reshape(-1, head_dim)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, S, H, D]`, cos/sin `[S, D]` -> rotated x in the wide dtype of x."""
    wide = wide_dtype(x.dtype)
    xf = x.to(wide)
    cos, sin = cos.to(wide)[None, :, None, :], sin.to(wide)[None, :, None, :]
    return xf * cos + rotate_half(xf) * sin


class _Attention(nn.Module):
    """q, k, v, o projections with RMS q/k norms over the whole hidden dim (keys as the release)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, C]` -> `[B, N, H, C/H]`."""
        return x.unflatten(-1, (self.num_heads, -1))

    def _q(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """q `[B, N, H, D]` of x `[B, N, C]`: projected in `cdt`, normed (wide)."""
        return self._heads(self.norm_q(self.q(x.to(cdt))))

    def _kv(self, context: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k (normed, wide) and v (cdt) `[B, L, H, D]` of context `[B, L, C]`, projected in `cdt`."""
        context = context.to(cdt)
        return self._heads(self.norm_k(self.k(context))), self._heads(self.v(context))


class SelfAttention(_Attention):
    """The projections around the joint attention, which the block calls between them (so that the
    token-wise parts can run in token chunks while attention sees every token)."""

    def qkv(self, x, rope_cos, rope_sin, cdt: torch.dtype) -> tuple[torch.Tensor, ...]:
        """x `[B, T, C]` (any span of tokens), its RoPE rows `[T, D]` -> q, k, v `[B, T, H, D]`
        in `cdt` for the joint-attention callable (called with no text, `txt_q=None`)."""
        q, (k, v) = self._q(x, cdt), self._kv(x, cdt)
        return apply_rope(q, rope_cos, rope_sin).to(cdt), apply_rope(k, rope_cos, rope_sin).to(cdt), v

    def out(self, attn: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """The attention's output `[B, T, H, D]` -> `[B, T, C]` in `cdt`."""
        return self.o(attn.flatten(2).to(cdt))


class CrossAttention(_Attention):
    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v `[B, H, L, D]` in context's dtype (the cdt): once per block, whatever the chunks."""
        return tuple(t.to(context.dtype).transpose(1, 2) for t in self._kv(context, context.dtype))

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x `[B, T, C]` (any span of tokens) attends to all of the text's ``text_kv`` (no key
        mask, as the release's t2v: padded text tokens are keys too) -> `[B, T, C]` in the cdt."""
        k, v = text_kv
        q = self._q(x, k.dtype).to(k.dtype).transpose(1, 2)  # [B, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


def block_keeps_fp32(name: str) -> bool:
    """The block parameters used outside bf16 matmuls: the modulation table and norm weights."""
    return name == "modulation" or "norm" in name


class WanBlock(KeepsFp32):
    """Self-attention, cross-attention to the text, GELU(tanh) MLP; adaLN from a per-block table
    (`modulation` `[1, 6, C]`: shift, scale, gate for attention, then for the MLP)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def _keeps_fp32(self, name: str) -> bool:
        return block_keeps_fp32(name)

    def forward(self, x, e0, rope_cos, rope_sin, context, attention, chunk: int | None = None) -> torch.Tensor:
        """x `[B, S, C]`, e0 `[B, 6, C]` (wide), rope `[S, D]`, context `[B, L, C]` (embedded
        text, in the matmul dtype cdt) -> `[B, S, C]` wide (x + a wide gate times a cdt update
        promotes, as in the release). ``chunk``: at most this many tokens at a time through
        everything but the self-attention (models/chunking.py)."""
        wide, cdt = e0.dtype, context.dtype
        shift, scale, g, ffn_shift, ffn_scale, ffn_g = (self.modulation.to(wide) + e0).chunk(6, dim=1)

        def qkv(span: slice) -> tuple[torch.Tensor, ...]:
            h = layer_norm(x[:, span], self.eps).to(wide) * (1 + scale) + shift
            return self.self_attn.qkv(h, rope_cos[span], rope_sin[span], cdt)

        attn = attention(*by_chunks(qkv, x.shape[1], chunk), None, None, None, None)[0]
        text_kv = self.cross_attn.text_kv(context)

        def rest(span: slice) -> torch.Tensor:
            y = x[:, span] + self.self_attn.out(attn[:, span], cdt) * g
            y = y + self.cross_attn(self.norm3(y), text_kv)
            h = layer_norm(y, self.eps).to(wide) * (1 + ffn_scale) + ffn_shift
            return y + self.ffn(h.to(cdt)) * ffn_g

        return by_chunks(rest, x.shape[1], chunk)


class Head(nn.Module):
    """LayerNorm, (shift, scale) from `modulation` `[1, 2, C]` + the time embedding, Linear.

    The release runs this whole head, its Linear included, in fp32 (autocast(float32))."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """x `[B, S, C]`, e `[B, C]` (both wide) -> `[B, S, pt*ph*pw*C_out]` wide, ordered
        (pt, ph, pw, c) within a token as the release's head emits it; ``chunk`` tokens at a time."""
        wide = e.dtype
        shift, scale = (self.modulation.to(wide) + e.unsqueeze(1)).chunk(2, dim=1)

        def part(span: slice) -> torch.Tensor:
            return linear_in(self.head, layer_norm(x[:, span].to(wide), self.eps) * (1 + scale) + shift, wide)

        return by_chunks(part, x.shape[1], chunk)


__all__ = [
    "CrossAttention", "Head", "KeepsFp32", "LayerNorm", "RMSNorm", "SelfAttention", "WanBlock",
    "apply_rope", "block_keeps_fp32", "layer_norm", "linear_in", "rope_table", "timestep_sinusoid",
    "wide_dtype",
]
