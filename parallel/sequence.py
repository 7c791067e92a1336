"""Token shards of one sequence across the sequence-parallel (SP) group.

The layout (the one :class:`parallel.attention.HybridAttention` assumes):

- A global sequence of ``n`` valid tokens is padded *at the end* to ``padded_length(n, P)``, a
  multiple of the SP size ``P = ring * ulysses``; every rank keeps one contiguous slice of
  ``C = padded / P`` tokens: SP rank ``s`` holds padded positions ``[s*C, (s+1)*C)``.
- ``s = ring_rank * ulysses + ulysses_rank`` (``parallel/mesh.py``), so the ``U`` shards of one
  Ulysses group form one contiguous ring chunk of ``U*C`` tokens, and padding only ever sits at the
  end of the last ring chunk(s). The attention slices those padded keys away instead of masking
  them, which keeps the fused (cuDNN / flash) kernels usable.
- Padded rows carry zeros on the way in; what they hold on the way out is unspecified (finite)
  and :func:`gather_tokens` drops them.

``n`` (the number of valid tokens) must be told to the attention:
``HybridAttention(sp, num_valid_tokens=n)`` or ``attention.set_valid_tokens(n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import all_gather_into


@dataclass(frozen=True, kw_only=True)
class SequenceParallel:
    """This rank's place in the SP group and the groups the attention talks over.

    Groups are ``None`` only in the single-process case (all sizes 1)."""

    sp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_size: int = 1
    ring_rank: int = 0
    ulysses_size: int = 1
    ulysses_rank: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.ring_rank < self.ring_size and 0 <= self.ulysses_rank < self.ulysses_size):
            raise ValueError(f"bad SP coordinates: {self}")
        if self.sp_size > 1 and self.sp_group is None:
            raise ValueError("an SP group of more than one rank needs its process groups")

    @classmethod
    def single(cls) -> "SequenceParallel":
        """One process, no process group: the attention then runs purely locally."""
        return cls(sp_group=None, ring_group=None, ulysses_group=None)

    @classmethod
    def from_mesh(cls, mesh) -> "SequenceParallel":
        """From a :class:`parallel.mesh.ParallelMesh`."""
        from .mesh import SP_AXES, MeshAxis

        return cls(
            sp_group=mesh.group(*SP_AXES),
            ring_group=mesh.group(MeshAxis.RING),
            ulysses_group=mesh.group(MeshAxis.ULYSSES),
            ring_size=mesh.size(MeshAxis.RING),
            ring_rank=mesh.local_rank(MeshAxis.RING),
            ulysses_size=mesh.size(MeshAxis.ULYSSES),
            ulysses_rank=mesh.local_rank(MeshAxis.ULYSSES),
        )

    @property
    def sp_size(self) -> int:
        return self.ring_size * self.ulysses_size

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


def padded_length(n: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= ``n``."""
    return -(-n // parts) * parts


def shard_length(n: int, parts: int) -> int:
    """Tokens per rank for ``n`` valid tokens over ``parts`` ranks (padding included)."""
    return padded_length(n, parts) // parts


def valid_in_chunk(n: int, chunk: int, index: int) -> int:
    """Valid tokens in chunk ``index`` of length ``chunk`` when padding sits at the end."""
    return max(0, min(chunk, n - index * chunk))


def shard_tokens(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    """This rank's contiguous shard of the whole sequence ``x`` along ``dim`` (local; no
    collective). ``[..., n, ...] -> [..., ceil(n/P), ...]``, zero-padded at the end of the global
    sequence."""
    dim = dim % x.dim()
    n = x.shape[dim]
    chunk = shard_length(n, sp.sp_size)
    start = sp.sp_rank * chunk
    piece = x.narrow(dim, min(start, n), max(0, min(chunk, n - start)))
    missing = chunk - piece.shape[dim]
    if missing:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
        piece = F.pad(piece, pad)
    return piece.contiguous()


def gather_tokens(x: torch.Tensor, dim: int, sp: SequenceParallel, n_valid: int) -> torch.Tensor:
    """All shards of the SP group concatenated along ``dim`` and trimmed to ``n_valid`` tokens:
    the inverse of :func:`shard_tokens`. Collective over the SP group; every rank gets the result."""
    dim = dim % x.dim()
    if sp.sp_size == 1:
        return x.narrow(dim, 0, n_valid)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((sp.sp_size * moved.shape[0], *moved.shape[1:]))
    all_gather_into(out, moved, sp.sp_group)
    return out[:n_valid].movedim(0, dim)
