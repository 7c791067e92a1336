"""Local (single-device) attention kernels that also return the log-sum-exp.

Every kernel has one signature and one convention, whatever the library underneath:

    kernel(q, k, v, scale) -> (out, lse)
        q [B, Sq, H, D], k and v [B, Sk, H, D] (last dim contiguous; other strides free), Sk >= 1
        out [B, Sq, H, D] in q.dtype
        lse [B, H, Sq] float32, natural log: lse = log(sum_k exp(scale * q.k))

Non-causal, no mask: callers attend to a subset of keys by slicing (``parallel/local.py``), which
keeps the fused kernels usable. Only :func:`math_attention` takes a key mask, for references.

Names (``select_kernel``): "cudnn" (torch's cuDNN SDPA), "flash" (torch's FlashAttention-2),
"efficient" (torch's memory-efficient kernel; also fp32), "fa2" / "fa3" (the flash-attn packages,
when importable), "math" (explicit fp32; any device). "auto" picks cuDNN on Hopper when a probe
call on this device agrees with "math", else flash, else math.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

log = logging.getLogger("launcher")

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]

# Keep one math block's score matrix under ~64 Mi floats (256 MiB) however long the sequence.
_MATH_BLOCK_ELEMENTS = 1 << 26


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D], a view


def _lse_bhs(lse: torch.Tensor, b: int, h: int, s: int) -> torch.Tensor:
    # cuDNN returns [B, H, S, 1]; the memory-efficient kernel pads S up to a multiple of 32.
    return lse.reshape(b, h, -1)[..., :s].float()


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit fp32 softmax attention; ``key_mask`` [B, Sk] bool (True = attend) optional.

    Rows with no key to attend get out 0 and lse -inf. Queries are processed in blocks so the
    score matrix stays bounded on long sequences."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    kf, vf = _bhsd(k).float(), _bhsd(v).float()
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device)
        bias.masked_fill_(~key_mask.to(torch.bool), float("-inf"))
        bias = bias[:, None, None, :]  # [B, 1, 1, Sk]
    step = max(1, _MATH_BLOCK_ELEMENTS // max(1, b * h * sk))
    outs, lses = [], []
    for start in range(0, sq, step):
        qf = _bhsd(q[:, start : start + step]).float()
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, sq_blk, Sk]
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, sq_blk]
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - finite[..., None])
        outs.append(torch.matmul(probs, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=2)


def cudnn_attention(q, k, v, scale):
    b, sq, h, _ = q.shape
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, False, False, scale=scale
    )
    return res[0].transpose(1, 2), _lse_bhs(res[1], b, h, sq)


def flash_attention(q, k, v, scale):
    b, sq, h, _ = q.shape
    res = torch.ops.aten._scaled_dot_product_flash_attention(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, False, False, scale=scale)
    return res[0].transpose(1, 2), _lse_bhs(res[1], b, h, sq)


def efficient_attention(q, k, v, scale):
    b, sq, h, _ = q.shape
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, False, scale=scale
    )
    return res[0].transpose(1, 2), _lse_bhs(res[1], b, h, sq)


def fa2_attention(q, k, v, scale):
    from flash_attn import flash_attn_func  # optional package; imported on first use

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse.float()  # [B, H, Sq], natural log


def fa3_attention(q, k, v, scale):
    from flash_attn_interface import flash_attn_func  # FlashAttention-3 (Hopper) package

    res = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return res[0], res[1].float()


KERNELS: dict[str, Kernel] = {
    "cudnn": cudnn_attention,
    "flash": flash_attention,
    "efficient": efficient_attention,
    "fa2": fa2_attention,
    "fa3": fa3_attention,
    "math": math_attention,
}


def probe_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, tol: float = 2e-2) -> str | None:
    """Run ``name`` once on a small random problem; ``None`` if it matches :func:`math_attention`
    (output and log-sum-exp), else why not. Used by "auto" so a kernel that fails or uses another
    LSE convention on this torch / device is never picked silently."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, n, 2, head_dim, generator=gen).to(device, dtype) for n in (67, 131, 131))
        scale = 1.0 / math.sqrt(head_dim)
        out, lse = KERNELS[name](q, k, v, scale)
        ref_out, ref_lse = math_attention(q, k, v, scale)
        err = (out.float() - ref_out.float()).norm() / ref_out.float().norm()
        lse_err = (lse - ref_lse).abs().max()
        if not (err < tol and lse_err < tol * 10):
            return f"mismatch: out rel err {err:.2e}, lse max err {lse_err:.2e}"
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(err).__name__}: {err}"


def auto_candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return ("math",)
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    return ("cudnn", "flash", "math") if hopper else ("flash", "math")


# What a kernel that fails at run time gives way to: the next of these after it (fa2 / fa3, when
# they fail, to torch's flash kernel and on), down to math, which runs anywhere.
FALLBACK_ORDER = ("cudnn", "fa3", "fa2", "flash", "efficient", "math")


class KernelChain:
    """A kernel that, when it raises at run time (a cuDNN execution failure, an unsupported
    shape or device), runs the call again with the next kernel of :data:`FALLBACK_ORDER` and
    keeps that one; it warns at each switch and keeps the switches in ``fallbacks``.

    The switch happens inside one call on one rank (a kernel call is local, so the ranks stay in
    step); the caller makes every rank use the same kernel afterwards by agreeing on the highest
    ``level`` (the position in :data:`FALLBACK_ORDER`) over the ranks and calling :meth:`adopt`."""

    def __init__(self, name: str):
        self.level = FALLBACK_ORDER.index(name)
        self.fallbacks: list[dict] = []  # {"from", "to", "error"}, in order

    @property
    def name(self) -> str:
        return FALLBACK_ORDER[self.level]

    def __call__(self, q, k, v, scale):
        while True:
            try:
                return KERNELS[self.name](q, k, v, scale)
            except (RuntimeError, NotImplementedError, ImportError) as err:
                if self.name == "math":
                    raise
                self._switch(self.level + 1, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")

    def adopt(self, level: int) -> None:
        """Use the kernel at ``level`` (another rank's fallback), if it is further down."""
        if level > self.level:
            self._switch(level, "another rank's kernel failed")

    def _switch(self, level: int, why: str) -> None:
        old, self.level = self.name, level
        self.fallbacks.append({"from": old, "to": self.name, "error": why})
        log.warning("attention kernel %s gives way to %s (%s)", old, self.name, why)


def select_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, Kernel]:
    """Resolve a kernel name ("auto" or one of :data:`KERNELS`) for inputs on ``device``."""
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; valid: auto, {', '.join(KERNELS)}")
        return name, KERNELS[name]
    for candidate in auto_candidates(device, dtype):
        if candidate == "math" or probe_kernel(candidate, device, dtype, head_dim) is None:
            return candidate, KERNELS[candidate]
    raise AssertionError("unreachable: math is always a candidate")
