"""The attention a rank runs after the Ulysses all-to-all: its ring chunk of image queries (and
the text queries) against every ring chunk's image keys plus the valid text keys.

Shapes (``h`` = heads per Ulysses rank, ``S`` = tokens of one ring chunk = ulysses * shard):
    q ``[B, S, h, D]``, kv ``[2, B, S, h, D]`` contiguous (it travels the ring as one message),
    text queries ``[B, L, h, D]``, text keys/values in :class:`parallel.local.TextKV`.

``chunk_valid[j]`` is the number of valid (non-padding) image tokens of ring chunk ``j``; padding
sits at the end of a chunk, so valid keys are always the prefix ``[:, :chunk_valid[j]]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import RingPass, all_gather_stacked
from .kernels import Kernel
from .local import TextKV, attend, empty_partial, merge_blocks, merge_stacked


def fold_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    txt_q: torch.Tensor | None,
    text: TextKV | None,
    n_valid: int,
    kernel: Kernel,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring of one: image and text queries in one kernel call against [valid image keys, valid
    text keys]; no log-sum-exp merge at all. Returns (image out, text out) in q.dtype."""
    s = q.shape[1]
    has_txt = txt_q is not None and txt_q.shape[1] > 0
    q_all = torch.cat([q, txt_q], dim=1) if has_txt else q
    out, _ = attend(q_all, k[:, :n_valid], v[:, :n_valid], kernel, scale, text)
    return out[:, :s], (out[:, s:] if has_txt else None)


def ring_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    txt_q: torch.Tensor | None,
    text: TextKV | None,
    *,
    chunk_valid: tuple[int, ...],
    group: dist.ProcessGroup,
    size: int,
    rank: int,
    kernel: Kernel,
    scale: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Ring over ``size`` ranks: at step ``t`` this rank holds the K/V of ring chunk
    ``(rank - t) % size`` while the next chunk is already in flight (P2P overlapped with the
    kernel). Image partials are kept (one ``[B, S, h, D]`` per step) and merged once at the end,
    in float32 by log-sum-exp (:func:`parallel.local.merge_blocks`).

    Text keys are attended once (step 0, with this rank's own chunk). Text queries see only this
    rank's own image chunk here, plus the text keys on ring rank 0 only, so that the partials of
    the ring ranks cover every key exactly once; :func:`merge_text_over_ring` combines them.
    Returns (image out [B, S, h, D] in q.dtype, text partial (out, lse) or None)."""
    passer = RingPass(group, size, rank)
    outs, lses = [], []  # this rank's partial per ring step, merged once at the end
    txt_partial = None
    cur = kv.contiguous()  # P2P needs it; a no-op for the all-to-all's output in practice
    for step in range(size):
        nxt = passer.start(cur) if step + 1 < size else None
        n = chunk_valid[(rank - step) % size]
        k, v = cur[0][:, :n], cur[1][:, :n]
        block = attend(q, k, v, kernel, scale, text if step == 0 else None)
        if block is not None:
            outs.append(block[0])
            lses.append(block[1])
        if step == 0 and txt_q is not None:
            txt_partial = attend(txt_q, k, v, kernel, scale, text if rank == 0 else None) or empty_partial(txt_q)
        if nxt is not None:
            passer.wait()
            cur = nxt
    return merge_blocks(outs, lses, q.dtype), txt_partial


def merge_text_over_ring(
    partial: tuple[torch.Tensor, torch.Tensor], group: dist.ProcessGroup, size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Combine the ring ranks' text partials: one all-gather of ``[B, L, h, D+1]`` float32
    (output and log-sum-exp packed), then the same fixed-order merge on every rank, so the text
    stream stays bit-identical across ranks. Returns ``[B, L, h, D]`` in ``dtype``."""
    out, lse = partial
    d = out.shape[-1]
    packed = torch.cat([out.float(), lse.transpose(1, 2).unsqueeze(-1)], dim=-1)
    stacked = all_gather_stacked(packed, group, size)  # [R, B, L, h, D+1]
    return merge_stacked(stacked[..., :d], stacked[..., d]).to(dtype)
