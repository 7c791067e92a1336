"""Applying parallelism to a plain model, and the few collectives a generation job needs.

`parallelize(model, mesh, num_tokens=...)` swaps the model's joint attention for the hybrid
Ulysses x Ring one and returns the `SequenceShard` that cuts tokens (and their RoPE rows) at the
model's boundary and joins them again: the model itself never changes, so a second model family
needs none of this code again. CFG parallelism (cfg = 2) runs the conditional and the negative
pass on two rank groups and combines their velocities with one all-gather per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .attention import HybridAttention
from .comm import all_gather_stacked
from .mesh import MeshAxis, ParallelMesh
from .sequence import SequenceParallel, gather_tokens, shard_length, shard_tokens

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice of an image-token sequence of `num_tokens` valid tokens.

    Layout: tokens `[B, S, F]` -> `[B, ceil(S/P), F]` (P = ring x ulysses), padded at the end of the
    global sequence; SP rank s holds positions [s*C, (s+1)*C). RoPE rows `[S, D]` shard on dim 0.
    """

    sp: SequenceParallel
    num_tokens: int

    @property
    def local_tokens(self) -> int:
        return shard_length(self.num_tokens, self.sp.sp_size)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Local: this rank's contiguous slice (zero-padded past the end)."""
        return shard_tokens(x, dim, self.sp)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Collective over the SP group: every rank gets the whole sequence, padding removed."""
        return gather_tokens(x, dim, self.sp, self.num_tokens)


def parallelize(model, mesh: ParallelMesh | None, *, num_tokens: int, kernel: str = "auto") -> SequenceShard:
    """Give `model` (anything with `set_attention`) the hybrid attention of `mesh`'s SP group for a
    sequence of `num_tokens` image tokens; returns the shard helper. With no mesh, or an SP group
    of one, the model keeps its own attention and the shard is the whole sequence."""
    if mesh is None or mesh.sp_size == 1:
        return SequenceShard(SequenceParallel.single(), num_tokens)
    sp = SequenceParallel.from_mesh(mesh)
    model.set_attention(HybridAttention(sp, num_valid_tokens=num_tokens, kernel=kernel))
    return SequenceShard(sp, num_tokens)


def cfg_parallel_velocity(own: Velocity, mesh: ParallelMesh, combine: Callable) -> Velocity:
    """CFG over the mesh's cfg axis: cfg rank 0 runs the conditional pass, rank 1 the negative
    one (`own` is this rank's); one all-gather per step brings both to both ranks, which then
    apply the same `combine(v_cond, v_neg)` to the same inputs and so stay bit-identical."""
    group, size = mesh.group(MeshAxis.CFG), mesh.size(MeshAxis.CFG)
    if size != 2:
        raise ValueError(f"cfg parallelism needs a cfg degree of 2, got {size}")

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = all_gather_stacked(own(x, t).contiguous(), group, size)  # [2, B, S, F]
        return combine(both[0], both[1])

    return velocity


def all_finite(x: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether `x` is finite on every rank of `group` (so that all ranks stop together)."""
    ok = torch.isfinite(x).all().to(torch.int32).reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


def all_true(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (``device``: where the backend's
    tensors live, CUDA for NCCL)."""
    ok = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """`obj` from global rank `src` on every rank (pickled; for small things such as text
    embeddings, which are a few MB). Tensors arrive on the CPU if they left from the CPU."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank of `group`."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
