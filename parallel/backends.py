"""Sequence-parallel attention backends a job can run: ours and the anchors, behind one contract.

    native        parallel.attention.HybridAttention; kernel "auto" (cuDNN with its log-sum-exp
                  on Hopper, else torch's flash, else math), fp32 log-sum-exp ring merge, pads
                  uneven token counts.
    xfuser        xfuser's ``xFuserLongContextAttention`` as the HunyuanVideo release runs it:
                  an FA2-class kernel, the flash-attn package ("fa") when importable, else torch's
                  flash kernel ("torch_flash"). CUDA only.
    xfuser-cudnn  the same with the best kernel xfuser supports here: torch's cuDNN at ring 1; at
                  ring > 1 the release kernel again (xfuser's cuDNN type returns a zero
                  log-sum-exp, which is wrong for a ring merge).
    yunchang      yunchang's ``LongContextAttention`` (USP, what xfuser builds on) with the release
                  kernel on CUDA; on the CPU (tests) our fp32 math kernel plugged in ("lse:math").

The anchors cannot pad: the image tokens must divide the SP size, and yunchang also needs the
valid text tokens to divide it. :func:`backend_problem` and :func:`text_problem` say so before any
collective; every rank computes the same answer from the same inputs.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

BACKENDS = ("native", "xfuser", "xfuser-cudnn", "yunchang")
_PACKAGES = {"xfuser": "xfuser.core.long_ctx_attention", "xfuser-cudnn": "xfuser.core.long_ctx_attention",
             "yunchang": "yunchang"}


@dataclass(frozen=True)
class AttentionChoice:
    """What runs the joint attention of a job: ``backend`` (one of :data:`BACKENDS`, or "model"
    when the model keeps its own SDPA) and the resolved ``kernel`` name, for logs and records."""

    backend: str
    kernel: str
    note: str = ""
    fallbacks: tuple = ()  # {"from", "to", "error"} per run-time kernel switch (parallel.kernels.KernelChain)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "kernel": self.kernel, "note": self.note or None,
                "fallbacks": list(self.fallbacks)}


def release_kernel() -> tuple[str, str]:
    """The FA2-class kernel the HunyuanVideo release's xfuser call uses, and why."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "fa", "flash-attn package"
    return "torch_flash", "flash-attn not installed: torch's FlashAttention-2 kernel"


def anchor_kernel(backend: str, ring: int, device_type: str = "cuda") -> tuple[str, str]:
    """yunchang ``AttnType`` (or ``lse:<ours>``) an anchor backend runs for a ring degree."""
    if backend == "yunchang" and device_type != "cuda":
        return "lse:math", "CPU: yunchang's algorithm with our fp32 math kernel; its own kernels need CUDA"
    if backend == "xfuser-cudnn" and ring == 1:
        return "torch_cudnn", "xfuser's best kernel here"
    kernel, why = release_kernel()
    if backend == "xfuser-cudnn":
        why = f"ring {ring}: xfuser's cuDNN type has a zero log-sum-exp, so the release kernel ({why})"
    return kernel, why


def backend_problem(backend: str, *, device_type: str, sp_size: int, num_tokens: int) -> str | None:
    """Why ``backend`` cannot run this job (``None`` if it can). No collective, no CUDA call."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}"
    if backend == "native":
        return None
    if backend.startswith("xfuser") and device_type != "cuda":
        return f"{backend} runs on CUDA only (xfuser's attention calls CUDA kernels); this job runs on {device_type}"
    try:
        importlib.import_module(_PACKAGES[backend])
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        extra = "xfuser" if backend.startswith("xfuser") else "yunchang"
        return (f"{backend} needs the {extra} package, which does not import here ({type(err).__name__}: {err}); "
                f"install it (pip install 'videodit-launcher[{extra}]'; [xfuser] brings both), or use native")
    if sp_size == 1:
        return (f"{backend} is a sequence-parallel backend and this job's sequence-parallel size is 1 "
                "(one local kernel runs); use native")
    if num_tokens % sp_size:
        return (f"{backend} cannot pad uneven tokens: {num_tokens} image tokens do not divide over "
                f"{sp_size} sequence-parallel ranks; use native (it pads), or a size/frames/GPU count that divides")
    return None


def text_problem(backend: str, txt_lens: list[int], sp_size: int) -> str | None:
    """yunchang splits the valid text tokens over the SP ranks: they must divide its size."""
    if backend != "yunchang" or sp_size == 1:
        return None
    bad = sorted({n for n in txt_lens if n % sp_size})
    if bad:
        return (f"yunchang splits the valid text tokens over the {sp_size} sequence-parallel ranks: "
                f"{bad} token(s) do not divide; use another prompt length or native")
    return None


def build_attention(backend: str, sp, *, num_tokens: int, device_type: str):
    """The attention object of an anchor backend on SP group ``sp`` and what it runs."""
    from .baselines import XFuserAttention, YunchangAttention

    kernel, why = anchor_kernel(backend, sp.ring_size, device_type)
    if backend == "yunchang":
        attn = YunchangAttention(sp, attn_type=kernel, num_valid_tokens=num_tokens)
    else:
        attn = XFuserAttention(sp, attn_type=kernel, num_valid_tokens=num_tokens)
    return attn, AttentionChoice(backend, kernel, why)
