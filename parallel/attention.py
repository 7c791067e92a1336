"""Hybrid Ulysses x Ring joint attention with the model family seam's contract (docs/ARCHITECTURE.md):

    attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_lens) -> (img_out, txt_out)

Image tensors ``[B, C, H, D]`` are this rank's shard of the sequence (``parallel/sequence.py``
layout: SP rank s holds padded positions [s*C, (s+1)*C)); text tensors ``[B, L, H, D]`` are whole
and identical on every rank; ``txt_lens`` [B] counts each item's valid (leading) text tokens.
Result: softmax over [all valid image tokens of all ranks, valid text tokens], scale
1/sqrt(D), non-causal; ``img_out`` is this rank's shard, ``txt_out`` whole (identical on every
rank) with padded text rows zero. Inference only (no autograd).

Algorithm on SP group ring x ulysses (U, R):
 1. one all-to-all over the Ulysses group turns q, k, v from [B, C, H, D] into this rank's ring
    chunk for H/U heads: [B, U*C, H/U, D]; text is sliced to the same heads locally.
 2. R == 1: one kernel call, image and text queries against [valid image keys, valid text keys]
    (with one text length and no padding the text rows are written straight behind the image
    rows of the all-to-all's output buffer, so no concatenation copy is made; that path can also
    run in head chunks whose all-to-alls overlap the other chunks' kernels, ``head_chunks``).
    R > 1: ring over the ring group (``parallel/ring.py``): K/V chunks travel by async P2P while
    the kernel runs; partials merge by an fp32 log-sum-exp. Text queries attend to this rank's
    chunk; the ring ranks' text partials merge by one all-gather.
 3. all-to-all back (heads -> sequence) for image output; all-gather of heads for text output.

Padding never leaks: the number of valid image tokens ``n`` is known to the object
(``num_valid_tokens=n`` at construction or :meth:`HybridAttention.set_valid_tokens`; ``None``
means "no padding", n = C * P). Padding sits at the end of the last ring chunk(s), so each
block attends to a prefix of its keys: no mask, and the fused kernels stay usable.

Bad input (shapes, heads not divisible by ulysses, a shard length that does not match ``n``)
raises ``ValueError`` before any collective. On the first call (``check_inputs="first"``, the
default) the SP ranks also exchange their input signatures in one small collective, so an input
that is wrong on one rank only makes *every* rank raise instead of hanging; ``"always"`` does this
on every call (tests), ``"never"`` skips it (a later mismatch then surfaces as the process-group
timeout).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import gather_heads, heads_to_seq, post_heads_to_seq, post_seq_to_heads, seq_to_heads, unpack_heads
from .kernels import Kernel, KernelChain, select_kernel
from .local import TextKV, local_joint_attention  # noqa: F401 - re-exported
from .ring import fold_attention, merge_text_over_ring, ring_attention
from .sequence import SequenceParallel, shard_length, valid_in_chunk

CHECK_MODES = ("first", "always", "never")
DEFAULT_HEAD_CHUNKS = 1


@dataclass(frozen=True)
class CallPlan:
    """What one call computes, derived (and validated) from the inputs before any collective."""

    batch: int
    local_tokens: int  # C
    heads: int
    head_dim: int
    txt_tokens: int  # L (0 without text)
    txt_lens: tuple[int, ...]
    n_valid: int
    dtype: str

    def chunk_valid(self, sp: SequenceParallel) -> tuple[int, ...]:
        """Valid image tokens of each ring chunk (U*C tokens each)."""
        chunk = sp.ulysses_size * self.local_tokens
        return tuple(valid_in_chunk(self.n_valid, chunk, j) for j in range(sp.ring_size))


def _shape_problems(img, txt, txt_lens) -> list[str]:
    names = ("img_q", "img_k", "img_v")
    problems = []
    if any(t.dim() != 4 for t in img):
        return [f"image q/k/v must be [B, tokens, heads, head_dim], got shapes {[tuple(t.shape) for t in img]}"]
    if len({t.shape for t in img}) != 1 or len({(t.dtype, t.device) for t in img}) != 1:
        problems.append("image q/k/v differ: " + ", ".join(f"{n} {tuple(t.shape)} {t.dtype}" for n, t in zip(names, img, strict=True)))
    b, _, h, d = img[0].shape
    if txt is not None:
        if any(t.dim() != 4 for t in txt) or len({t.shape for t in txt}) != 1:
            problems.append(f"text q/k/v must share one [B, L, H, D] shape, got {[tuple(t.shape) for t in txt]}")
        elif (txt[0].shape[0], txt[0].shape[2], txt[0].shape[3]) != (b, h, d) or any(
            (t.dtype, t.device) != (img[0].dtype, img[0].device) for t in txt
        ):
            problems.append(f"text {tuple(txt[0].shape)} {txt[0].dtype} does not match image [B={b}, H={h}, D={d}] {img[0].dtype}")
    if txt_lens is not None and (txt_lens.dim() != 1 or txt_lens.shape[0] != b):
        problems.append(f"txt_lens must be [B={b}], got {tuple(txt_lens.shape)}")
    return problems


def check_inputs(img, txt, txt_lens, sp: SequenceParallel, n_valid: int | None) -> tuple[CallPlan | None, str | None]:
    """Validate one call's inputs locally; returns (plan, None) or (None, why)."""
    problems = _shape_problems(img, txt, txt_lens)
    if problems:
        return None, "; ".join(problems)
    b, c, h, d = img[0].shape
    length = txt[0].shape[1] if txt is not None else 0
    lens = tuple(int(x) for x in txt_lens.tolist()) if txt_lens is not None and txt is not None else (length,) * b
    n = c * sp.sp_size if n_valid is None else n_valid
    if h % sp.ulysses_size:
        problems.append(f"ulysses {sp.ulysses_size} does not divide {h} heads")
    if any(x < 0 or x > length for x in lens):
        problems.append(f"txt_lens {list(lens)} must lie in [0, {length}]")
    if n < 1 or shard_length(n, sp.sp_size) != c:
        problems.append(
            f"image shard has {c} tokens, but {n} valid tokens over {sp.sp_size} ranks need "
            f"{shard_length(max(n, 1), sp.sp_size)} per rank (see parallel/sequence.py)"
        )
    if problems:
        return None, "; ".join(problems)
    return CallPlan(batch=b, local_tokens=c, heads=h, head_dim=d, txt_tokens=length, txt_lens=lens, n_valid=n, dtype=str(img[0].dtype)), None


def agree_across_ranks(plan: CallPlan | None, error: str | None, sp: SequenceParallel) -> None:
    """One small collective over the SP group: every rank raises if any rank's input is bad or
    the ranks' inputs disagree (text and valid counts must be identical everywhere)."""
    reports = [None] * sp.sp_size
    dist.all_gather_object(reports, (plan, error), group=sp.sp_group)
    bad = [f"SP rank {r}: {e}" for r, (_, e) in enumerate(reports) if e is not None]
    if bad:
        raise ValueError("bad attention input: " + "; ".join(bad))
    if len({p for p, _ in reports}) != 1:
        listing = "; ".join(f"SP rank {r}: {p}" for r, (p, _) in enumerate(reports))
        raise ValueError(f"attention inputs differ across SP ranks: {listing}")


def _head_chunks(given: int | None) -> int:
    """``given``, else ``LAUNCHER_ULYSSES_CHUNKS``, else ``DEFAULT_HEAD_CHUNKS``; a positive int."""
    raw = os.environ.get("LAUNCHER_ULYSSES_CHUNKS", str(DEFAULT_HEAD_CHUNKS)) if given is None else given
    try:
        chunks = int(raw)
    except ValueError:
        chunks = 0
    if chunks < 1:
        source = "head_chunks" if given is not None else "LAUNCHER_ULYSSES_CHUNKS"
        raise ValueError(f"{source} must be a positive integer, got {raw!r}")
    return chunks


class HybridAttention:
    """Joint attention over Ulysses x Ring sequence parallel (see the module docstring).

    ``sp``: this rank's :class:`SequenceParallel` (``SequenceParallel.from_mesh(mesh)``).
    ``num_valid_tokens``: valid global image tokens (``None``: no padding).
    ``kernel``: "auto" or a name from ``parallel.kernels.KERNELS``.
    ``fuse_text``: for pure Ulysses with one text length and no padding, put the text into the
    all-to-all's buffer (one kernel call, no concatenation copies); ``False`` forces the general
    path.
    ``head_chunks``: on that fused path, split this rank's heads into this many chunks and
    pipeline them, so each chunk's all-to-alls overlap the neighbouring chunks' kernels (``None``:
    ``LAUNCHER_ULYSSES_CHUNKS`` or ``DEFAULT_HEAD_CHUNKS``; rounded down to a divisor of the
    rank's heads).

    Keep ``txt_lens`` on the CPU: it is read as Python ints every call (a CUDA tensor would cost a
    device sync per call).
    """

    def __init__(
        self,
        sp: SequenceParallel,
        *,
        num_valid_tokens: int | None = None,
        kernel: str = "auto",
        check_inputs: str = "first",
        fuse_text: bool = True,
        head_chunks: int | None = None,
    ):
        if check_inputs not in CHECK_MODES:
            raise ValueError(f"check_inputs must be one of {CHECK_MODES}, got {check_inputs!r}")
        self.sp = sp
        self.kernel_name = kernel
        self.check_mode = check_inputs
        self.fuse_text = fuse_text  # False: always the general path (A/B benchmarks, tests)
        self.head_chunks = _head_chunks(head_chunks)
        self.num_valid_tokens = num_valid_tokens
        self._kernels: dict[tuple, KernelChain] = {}
        self._calls = 0

    def set_valid_tokens(self, n: int | None) -> None:
        """Valid global image tokens for the following calls (``None``: no padding). Call it on
        every SP rank alike; the next call checks inputs across ranks again (mode "first")."""
        self.num_valid_tokens = n
        self._calls = 0

    def resolved_kernel(self, x: torch.Tensor) -> str:
        """The kernel name this object uses for inputs like ``x`` [B, S, H, D]."""
        return self._kernel(x)[0]

    @property
    def kernel_chains(self) -> list[KernelChain]:
        """The kernels in use (one per input device, dtype and head dim), each with its fallbacks."""
        return list(self._kernels.values())

    def _kernel(self, x: torch.Tensor) -> tuple[str, Kernel]:
        key = (x.device, x.dtype, x.shape[-1])
        if key not in self._kernels:
            self._kernels[key] = KernelChain(select_kernel(self.kernel_name, x.device, x.dtype, x.shape[-1])[0])
        chain = self._kernels[key]
        return chain.name, chain

    def _plan(self, img, txt, txt_lens) -> CallPlan:
        plan, error = check_inputs(img, txt, txt_lens, self.sp, self.num_valid_tokens)
        exchange = self.sp.sp_size > 1 and (self.check_mode == "always" or (self.check_mode == "first" and self._calls == 0))
        self._calls += 1
        if exchange:
            agree_across_ranks(plan, error, self.sp)
        elif error is not None:
            raise ValueError(f"bad attention input: {error}")
        return plan

    @torch.no_grad()
    def __call__(self, img_q, img_k, img_v, txt_q=None, txt_k=None, txt_v=None, txt_lens=None):
        txt = None if txt_q is None or txt_q.shape[1] == 0 else (txt_q, txt_k, txt_v)
        plan = self._plan((img_q, img_k, img_v), None if txt_q is None else (txt_q, txt_k, txt_v), txt_lens)
        _, kernel = self._kernel(img_q)
        sp = self.sp
        if self._fusable(plan, txt):
            img_out, txt_part = self._fused_text(plan, kernel, (img_q, img_k, img_v), txt)
        else:
            img_part, txt_part = self._general(plan, kernel, (img_q, img_k, img_v), txt)
            img_out = heads_to_seq(img_part, sp.ulysses_group, sp.ulysses_size) if sp.ulysses_size > 1 else img_part
        if txt_q is None:
            return img_out, None
        if txt is None:  # text tensors with no tokens
            return img_out, torch.zeros_like(txt_q)
        txt_out = gather_heads(txt_part, sp.ulysses_group, sp.ulysses_size) if sp.ulysses_size > 1 else txt_part.clone()
        for b, n in enumerate(plan.txt_lens):  # padded text rows -> 0 (slicing: no host-to-device mask)
            txt_out[b, n:] = 0
        return img_out, txt_out

    def _fusable(self, plan: CallPlan, txt) -> bool:
        """Pure Ulysses, one text length, no image padding: the text can ride in the
        all-to-all's output buffer and everything is one kernel call with prefix keys."""
        sp = self.sp
        return (
            self.fuse_text and txt is not None and sp.ulysses_size > 1 and sp.ring_size == 1
            and len(set(plan.txt_lens)) == 1 and plan.n_valid == sp.sp_size * plan.local_tokens
        )

    def _heads(self, plan: CallPlan) -> slice:
        hl = plan.heads // self.sp.ulysses_size
        return slice(self.sp.ulysses_rank * hl, (self.sp.ulysses_rank + 1) * hl)

    def _chunks(self, plan: CallPlan) -> int:
        """The largest chunk count <= ``head_chunks`` that divides this rank's heads."""
        hl = plan.heads // self.sp.ulysses_size
        return max(g for g in range(1, min(self.head_chunks, hl) + 1) if hl % g == 0)

    def _fused_text(self, plan, kernel, img, txt):
        """Pure Ulysses, in head chunks: -> (image output [B, C, H, D], text part [B, L, H/U, D]).

        Every chunk's all-to-all is posted first; then, per chunk, wait for it, run the kernel and
        post the output's all-to-all back. NCCL runs the transfers on its own stream, so chunk
        g+1's input and chunk g's output move while chunk g's (g+1's) kernel runs; with one chunk
        nothing overlaps. Per chunk, a [3, B, S+L, hs, D] buffer: the all-to-all writes the image,
        we write this rank's text heads behind it; queries are all rows, keys the prefix [image,
        valid text] (no concatenation copies)."""
        sp, heads, chunks = self.sp, self._heads(plan), self._chunks(plan)
        u, group = sp.ulysses_size, sp.ulysses_group
        hs = (heads.stop - heads.start) // chunks
        posted = [post_seq_to_heads(img, group, u, g, chunks) for g in range(chunks)]
        back, txt_parts = [], []
        for g, (recv, work) in enumerate(posted):
            work.wait()
            qkv = unpack_heads(recv, extra_tokens=plan.txt_tokens)
            mine = slice(heads.start + g * hs, heads.start + (g + 1) * hs)
            img_part, txt_part = self._attend_fused(plan, kernel, qkv, txt, mine)
            back.append(post_heads_to_seq(img_part, group, u))
            txt_parts.append(txt_part)
        b, c = plan.batch, plan.local_tokens
        img_out = img[0].new_empty((b, c, u, chunks, hs, plan.head_dim))
        for g, (recv, work) in enumerate(back):
            work.wait()
            img_out[:, :, :, g] = recv.permute(1, 2, 0, 3, 4)  # recv[src]: head slice src's chunk g
        return img_out.view(b, c, plan.heads, plan.head_dim), torch.cat(txt_parts, dim=2)

    @staticmethod
    def _attend_fused(plan, kernel, qkv, txt, heads: slice):
        """One kernel call on ``qkv`` [3, B, S+L, h, D] whose last L rows get the text's ``heads``."""
        s = qkv.shape[2] - plan.txt_tokens
        for i, t in enumerate(txt):
            qkv[i, :, s:] = t[:, :, heads]
        n_keys = s + plan.txt_lens[0]
        out, _ = kernel(qkv[0], qkv[1][:, :n_keys], qkv[2][:, :n_keys], 1.0 / math.sqrt(plan.head_dim))
        return out[:, :s], out[:, s:]

    def _general(self, plan, kernel, img, txt):
        """Any case: ring of one (fold) or ring of several, text per item by slicing."""
        sp, heads, scale = self.sp, self._heads(plan), 1.0 / math.sqrt(plan.head_dim)
        if sp.ulysses_size > 1:
            qkv = seq_to_heads(img, sp.ulysses_group, sp.ulysses_size)  # [3, B, U*C, H/U, D]
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = img
        # Contiguous head slices (small): torch.cat of the keys with a strided input takes a
        # generic copy kernel about 5x slower than its vectorised one (measured on H200).
        tq, tk, tv = (t[:, :, heads].contiguous() for t in txt) if txt is not None else (None,) * 3
        text = TextKV(tk, tv, plan.txt_lens) if txt is not None else None
        chunk_valid = plan.chunk_valid(sp)
        if sp.ring_size == 1:
            return fold_attention(q, k, v, tq, text, chunk_valid[0], kernel, scale)
        kv = qkv[1:] if sp.ulysses_size > 1 else torch.stack((k, v))
        img_part, partial = ring_attention(
            q, kv, tq, text, chunk_valid=chunk_valid, group=sp.ring_group,
            size=sp.ring_size, rank=sp.ring_rank, kernel=kernel, scale=scale,
        )
        txt_part = merge_text_over_ring(partial, sp.ring_group, sp.ring_size, q.dtype) if partial is not None else None
        return img_part, txt_part
