"""Collectives of the hybrid attention: Ulysses all-to-alls, head gathers, ring passes.

All take an explicit process group (never a global) and assume the layout of
``parallel/mesh.py``: within a Ulysses group of size ``U``, rank ``u`` holds sequence chunk ``u``
of its ring chunk before the all-to-all and head slice ``[u*H/U, (u+1)*H/U)`` after it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def post_seq_to_heads(
    xs: Sequence[torch.Tensor], group: dist.ProcessGroup, size: int, chunk: int = 0, chunks: int = 1
) -> tuple[torch.Tensor, dist.Work]:
    """Start the Ulysses all-to-all of head chunk ``chunk`` of ``chunks`` of several tensors.

    ``n`` tensors ``[B, C, H, D]`` (this rank's C tokens, all heads); each rank's head slice
    ``H/size`` is cut in ``chunks`` equal chunks of ``hs`` heads. Returns the receive buffer
    ``[size (source rank), n, B, C, hs, D]`` and the collective's work: ``wait()`` before reading
    the buffer (``unpack_heads``). On NCCL the transfer runs on its own stream, so it overlaps
    kernels launched on the current stream meanwhile.
    """
    b, c, h, d = xs[0].shape
    hs = h // size // chunks
    send = xs[0].new_empty((size, len(xs), b, c, hs, d))
    for i, x in enumerate(xs):
        send[:, i].copy_(x.reshape(b, c, size, chunks, hs, d)[:, :, :, chunk].permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)


def unpack_heads(recv: torch.Tensor, extra_tokens: int = 0) -> torch.Tensor:
    """``post_seq_to_heads``'s buffer -> ``[n, B, size*C + extra_tokens, hs, D]``: the group's
    tokens in group-rank order, followed by ``extra_tokens`` uninitialised rows for the caller."""
    size, n, b, c, hs, d = recv.shape
    out = recv.new_empty((n, b, size * c + extra_tokens, hs, d))
    # recv[src] holds sequence chunk src: put it in front of the chunk's tokens.
    out[:, :, : size * c].view(n, b, size, c, hs, d).copy_(recv.permute(1, 2, 0, 3, 4, 5))
    return out


def seq_to_heads(
    xs: Sequence[torch.Tensor], group: dist.ProcessGroup, size: int, extra_tokens: int = 0
) -> torch.Tensor:
    """Ulysses all-to-all of several tensors in one collective.

    ``n`` tensors ``[B, C, H, D]`` (this rank's C tokens, all heads) ->
    ``[n, B, size*C + extra_tokens, H/size, D]``: the group's size*C tokens in group-rank order for
    this rank's heads, followed by ``extra_tokens`` uninitialised rows for the caller to fill.
    """
    recv, work = post_seq_to_heads(xs, group, size)
    work.wait()
    return unpack_heads(recv, extra_tokens)


def post_heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> tuple[torch.Tensor, dist.Work]:
    """Start the inverse Ulysses all-to-all of ``x`` ``[B, size*C, h, D]``. Returns the receive
    buffer ``[size (source rank = head slice), B, C, h, D]`` and the work to ``wait()`` on."""
    b, s, hl, d = x.shape
    send = x.reshape(b, size, s // size, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # [dst chunk, B, C, h, D]
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """Inverse Ulysses all-to-all: ``[B, size*C, h, D]`` -> ``[B, C, size*h, D]``."""
    recv, work = post_heads_to_seq(x, group, size)
    work.wait()
    _, b, c, hl, d = recv.shape
    # recv[src] holds head slice src of this rank's tokens.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, c, size * hl, d)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``out`` (``[size * x.shape[0], ...]``) <- the group's ``x`` concatenated along dim 0.
    torch >= 2.13 renamed all_gather_into_tensor to all_gather_single."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """``x`` -> ``[size, *x.shape]`` in group-rank order."""
    x = x.contiguous()
    # gloo wants the output concatenated along dim 0, not stacked; the memory is the same.
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    all_gather_into(out, x, group)
    return out.view(size, *x.shape)


def gather_heads(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """All-gather head slices: ``[B, L, h, D]`` -> ``[B, L, size*h, D]`` (group-rank order)."""
    b, length, hl, d = x.shape
    return all_gather_stacked(x, group, size).permute(1, 2, 0, 3, 4).reshape(b, length, size * hl, d)


class RingPass:
    """Sends a tensor to the next ring rank and receives the previous rank's, asynchronously.

    ``start(x)`` posts the batched isend/irecv (NCCL runs them on its own stream, so they overlap
    the attention kernel launched next) and returns the receive buffer; ``wait()`` must be called
    before that buffer is read."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int):
        self.group = group
        self.send_to = dist.get_global_rank(group, (rank + 1) % size)
        self.recv_from = dist.get_global_rank(group, (rank - 1) % size)
        self._works: list = []

    def start(self, x: torch.Tensor) -> torch.Tensor:
        if self._works:
            raise RuntimeError("RingPass.start called twice without wait")
        recv = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, self.send_to, self.group),
            dist.P2POp(dist.irecv, recv, self.recv_from, self.group),
        ]
        self._works = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []
