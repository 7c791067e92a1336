"""Token chunking: a block's token-wise parts run over chunks of its tokens, one at a time.

Everything in a DiT block except attention works on each token alone (modulation, norms, the q/k/v
projections, RoPE, the output projection, the MLP, a final layer). Run over chunks of at most
``size`` tokens, their wide intermediates (the MLP's hidden ``[B, T, 4C]``, the single-stream
block's ``linear1`` output) exist for one chunk at a time: under ``torch.inference_mode`` nothing
keeps a chunk's intermediates once its results are copied into the whole-sequence outputs, so a
block's peak is bounded by what attention itself needs (its q, k, v and output for all tokens).

Chunking never changes a reduction: every op sees whole tokens, so in fp32 the result is bit for
bit the unchunked one. One exception, from the BLAS kernels rather than the math: a matmul over a
handful of rows (under ~12 on x86 CPUs) takes another code path whose rounding differs, so no
chunk is smaller than ``MIN_CHUNK`` tokens (a short tail joins the chunk before it).

The model receives ``size`` as plain configuration (``dit.set_token_chunk``, via the family's
``set_token_chunk``); ``None`` means one chunk, the whole sequence, computed as before.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_CHUNK = 16


def token_spans(n: int, size: int | None) -> list[slice]:
    """Slices covering ``range(n)`` with at most ``size`` tokens each (``None``: one slice); the
    last absorbs a remainder below ``MIN_CHUNK`` (so it may hold up to size + MIN_CHUNK - 1)."""
    if size is None or size >= n:
        return [slice(0, n)]
    size = max(size, MIN_CHUNK)
    spans, start = [], 0
    while start < n:
        stop = start + size if n - start - size >= MIN_CHUNK else n
        spans.append(slice(start, stop))
        start = stop
    return spans


def by_chunks(fn: Callable[[slice], torch.Tensor | tuple[torch.Tensor, ...]], n: int, size: int | None):
    """``fn(span)`` -> a tensor (or a tuple of them) ``[B, len(span), ...]`` for the tokens ``span``
    of an ``n``-token sequence; returns the same for all ``n`` tokens, computed ``size`` tokens at a
    time into preallocated outputs (contiguous ``[B, n, ...]``). With one span, ``fn``'s own result."""
    spans = token_spans(n, size)
    if len(spans) == 1:
        return fn(spans[0])
    outs, single = None, False
    for span in spans:
        part = fn(span)
        single = isinstance(part, torch.Tensor)
        parts = (part,) if single else part
        if outs is None:
            outs = tuple(p.new_empty((p.shape[0], n, *p.shape[2:])) for p in parts)
        for out, p in zip(outs, parts):
            out[:, span] = p
        del part, parts  # this chunk's results, before the next chunk allocates its own
    return outs[0] if single else outs


def linear_rows(layer: nn.Module, rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer`` (an ``nn.Linear`` or ``models.fp8.Float8Linear``) restricted to its output
    features ``rows``, on the same weights (no copy): ``linear_rows(l, r)(x) == l(x)[..., r]``.
    Lets a block compute one part of a fused projection now and the other part later, per chunk."""
    if isinstance(layer, nn.Linear):
        return partial(F.linear, weight=layer.weight[rows], bias=None if layer.bias is None else layer.bias[rows])
    return layer.rows(rows)


def chunk_dit(model: nn.Module, tokens: int | None) -> None:
    """A family's ``set_token_chunk`` for a DiT with ``set_token_chunk(tokens)`` (both in-tree)."""
    model.set_token_chunk(tokens)


__all__ = ["MIN_CHUNK", "by_chunks", "chunk_dit", "linear_rows", "token_spans"]
