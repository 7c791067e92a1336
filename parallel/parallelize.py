"""Applying parallelism to a plain model: sequence-parallel attention and CFG over the mesh.

`parallelize(model, mesh, num_tokens=..., backend=...)` swaps the model's joint attention for the
hybrid Ulysses x Ring one (or an anchor backend, `parallel/backends.py`) and returns the
`SequenceShard` that cuts tokens (and their RoPE rows) at the model's boundary and joins them
again: the model itself never changes, so a second model family needs none of this code again.
CFG parallelism (cfg = 2) runs the conditional and the negative pass on two rank groups and
combines their velocities with one all-gather per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .attention import HybridAttention
from .backends import AttentionChoice, backend_problem, build_attention
from .comm import all_gather_stacked
from .kernels import select_kernel
from .mesh import REPLICA_AXES, MeshAxis, ParallelMesh
from .sequence import SequenceParallel, gather_tokens, shard_length, shard_tokens, valid_in_chunk

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice of an image-token sequence of `num_tokens` valid tokens.

    Layout: tokens `[B, S, F]` -> `[B, ceil(S/P), F]` (P = ring x ulysses), padded at the end of the
    global sequence; SP rank s holds positions [s*C, (s+1)*C). RoPE rows `[S, D]` shard on dim 0.
    """

    sp: SequenceParallel
    num_tokens: int
    attention: AttentionChoice = AttentionChoice("model", "sdpa")
    native: HybridAttention | None = None  # the native attention, whose kernels can fall back

    def agree_on_kernel(self, mesh: ParallelMesh | None) -> None:
        """Every rank on the same kernel: after a kernel failed on some rank (and that rank fell
        back within its call), all adopt the furthest fallback. A collective of this rank's
        replica (its cfg and SP ranks): call it on each of them at the same point (once a step)."""
        chains = self.native.kernel_chains if self.native is not None else []
        if mesh is None or not chains:
            return
        level = mesh.max_over(max(c.level for c in chains), REPLICA_AXES)
        for chain in chains:
            chain.adopt(level)

    def current_attention(self) -> AttentionChoice:
        """``attention`` with the kernel now in use and the run-time fallbacks so far."""
        chains = self.native.kernel_chains if self.native is not None else []
        if not chains:
            return self.attention
        return replace(self.attention, kernel=chains[0].name,
                       fallbacks=tuple(f for c in chains for f in c.fallbacks))

    @property
    def local_tokens(self) -> int:
        return shard_length(self.num_tokens, self.sp.sp_size)

    @property
    def local_valid(self) -> int:
        """The valid tokens of this rank's shard (its first ones; padding follows)."""
        return valid_in_chunk(self.num_tokens, self.local_tokens, self.sp.sp_rank)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Local: this rank's contiguous slice (zero-padded past the end)."""
        return shard_tokens(x, dim, self.sp)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Collective over the SP group: every rank gets the whole sequence, padding removed."""
        return gather_tokens(x, dim, self.sp, self.num_tokens)


def parallelize(model, mesh: ParallelMesh | None, *, num_tokens: int, backend: str = "native",
                kernel: str = "auto") -> SequenceShard:
    """Give `model` (anything with `set_attention` and parameters) the joint attention of `mesh`'s
    SP group for a sequence of `num_tokens` image tokens; returns the shard helper, whose
    `attention` says what runs.

    `backend`: one of `parallel.backends.BACKENDS` (the anchors need SP > 1 and CUDA or their
    package; `backend_problem` checks that first). `kernel`: "auto" or a `parallel.kernels` name
    for native; "auto" only for the anchors (each runs its own, see `parallel/backends.py`).
    With no mesh or an SP group of one, on the CPU the model keeps its own SDPA (unless a kernel
    is named); on CUDA it runs
    the kernel the native path selects (cuDNN on Hopper), so 1-GPU baselines use the best kernel
    rather than whatever SDPA's dispatcher picks for a masked call."""
    sp = SequenceParallel.single() if mesh is None or mesh.sp_size == 1 else SequenceParallel.from_mesh(mesh)
    param = next(model.parameters())
    if backend != "native":
        problem = backend_problem(backend, device_type=param.device.type, sp_size=sp.sp_size, num_tokens=num_tokens)
        if problem is not None:
            raise ValueError(problem)
        attn, choice = build_attention(backend, sp, num_tokens=num_tokens, device_type=param.device.type)
    elif sp.sp_size == 1 and param.device.type != "cuda" and kernel == "auto":
        return SequenceShard(sp, num_tokens, AttentionChoice("model", "sdpa"))
    else:
        name, _ = select_kernel(kernel, param.device, param.dtype, model.config.head_dim)
        attn, choice = HybridAttention(sp, num_valid_tokens=num_tokens, kernel=name), AttentionChoice("native", name)
    model.set_attention(attn)
    return SequenceShard(sp, num_tokens, choice, attn if isinstance(attn, HybridAttention) else None)


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


def cache_reduce(mesh: ParallelMesh | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step cache's ``reduce`` (models/step_cache.py) for this rank: its sums added over its
    replica's CFG and SP ranks. One all-reduce hands every rank the same sums, so every rank of
    the replica skips the same steps, whatever its shard holds."""

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        if mesh is None or all(mesh.size(a) == 1 for a in REPLICA_AXES):
            return sums
        return mesh.sum_over(sums, REPLICA_AXES)

    return reduce
