"""Process groups and the device mesh: the only module that calls ``init_process_group``.

Rank layout (row-major over the axes, ulysses innermost)::

    rank = ((dp_i * cfg + cfg_i) * ring + ring_i) * ulysses + ulysses_i

so the ranks of one Ulysses group are adjacent (0..U-1, U..2U-1, ...): with ``torchrun`` placing
consecutive ranks on one node, the bandwidth-hungry all-to-alls stay on NVLink and only the ring's
point-to-point passes (or dp / cfg, which never talk inside attention) cross nodes. The
sequence-parallel (SP) group is ring x ulysses flattened, with

    sp_rank = ring_i * ulysses + ulysses_i

which is also the order of token shards (``parallel/sequence.py``): the U shards of one Ulysses
group are contiguous in the sequence, so after the all-to-all each rank holds one contiguous ring
chunk.

Nothing here is stored at module level: :func:`build_parallel_mesh` returns a frozen
:class:`ParallelMesh` that owns its groups, and :func:`teardown` ends the process group.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .topology import Topology, TopologyError

DEFAULT_TIMEOUT_S = 600.0


class MeshAxis(str, Enum):
    """Mesh axes, declared outermost first (the order of :data:`MESH_AXES`)."""

    DP = "dp"
    CFG = "cfg"
    RING = "ring"
    ULYSSES = "ulysses"


MESH_AXES: tuple[MeshAxis, ...] = (MeshAxis.DP, MeshAxis.CFG, MeshAxis.RING, MeshAxis.ULYSSES)
SP_AXES: tuple[MeshAxis, ...] = (MeshAxis.RING, MeshAxis.ULYSSES)
# The ranks that make one video together (a dp replica): the cfg branches and their SP group.
REPLICA_AXES: tuple[MeshAxis, ...] = (MeshAxis.CFG, MeshAxis.RING, MeshAxis.ULYSSES)


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """What :func:`init_distributed` set up for this process."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout: _dt.timedelta


def _as_timedelta(timeout: float | _dt.timedelta) -> _dt.timedelta:
    return timeout if isinstance(timeout, _dt.timedelta) else _dt.timedelta(seconds=float(timeout))


def _pick_backend(backend: str | None, device_type: str) -> str:
    if backend is not None:
        return backend
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(
    *,
    backend: str | None = None,
    device_type: str | None = None,
    timeout: float | _dt.timedelta = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> DistInfo:
    """Initialise the default process group (NCCL on CUDA, gloo on CPU) with a timeout.

    - Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): ``env://``.
    - Explicit (tests): pass ``init_method`` (``file://...`` or ``tcp://...``), ``rank`` and
      ``world_size``.
    - Neither: a single process on an in-memory store, so one code path serves 1 GPU too.

    The timeout applies to every collective of every group built by :func:`build_parallel_mesh`;
    a rank that never arrives makes the others fail instead of hanging.
    """
    if dist.is_initialized():
        raise RuntimeError("init_distributed: the default process group already exists")
    timeout = _as_timedelta(timeout)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = _pick_backend(backend, device_type)
    env_rank = os.environ.get("RANK")
    rank = int(rank if rank is not None else env_rank if env_rank is not None else 0)
    world_size = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    local_rank = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    kwargs = dict(backend=backend, timeout=timeout, rank=rank, world_size=world_size)
    if device_type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # eager NCCL init: sub-groups are split, not rebuilt
    if init_method is None and env_rank is None and world_size == 1:
        kwargs["store"] = dist.HashStore()
    else:
        kwargs["init_method"] = init_method or "env://"
    dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device, timeout=timeout)


@dataclass(frozen=True, kw_only=True)
class ParallelMesh:
    """The named (dp, cfg, ring, ulysses) mesh of this job and its process groups.

    ``group(axis)`` gives one axis' group; ``group(*SP_AXES)`` the flattened sequence-parallel
    group. Groups are created once, in the same order on every rank, with the job's timeout.
    """

    topology: Topology
    device_mesh: DeviceMesh
    device: torch.device
    rank: int
    world_group: dist.ProcessGroup
    _groups: Mapping[tuple[MeshAxis, ...], dist.ProcessGroup] = field(repr=False)
    # The job's timeout, which every group got; for the waits on point-to-point work.
    timeout: _dt.timedelta = _dt.timedelta(seconds=DEFAULT_TIMEOUT_S)

    def group(self, *axes: MeshAxis | str) -> dist.ProcessGroup:
        key = tuple(MeshAxis(a) for a in axes)
        if key not in self._groups:
            known = [tuple(a.value for a in k) for k in self._groups]
            raise KeyError(f"no process group for axes {[a.value for a in key]}; known: {known}")
        return self._groups[key]

    def size(self, axis: MeshAxis | str) -> int:
        return self.topology.degree(axis)

    def local_rank(self, axis: MeshAxis | str) -> int:
        return self.topology.coords(self.rank)[MeshAxis(axis)]

    def submesh(self, *axes: MeshAxis | str) -> DeviceMesh:
        return self.device_mesh[tuple(MeshAxis(a).value for a in axes)]

    @property
    def sp_size(self) -> int:
        return self.topology.sp

    # The job's few collectives outside attention, each over an explicit group (default: every
    # rank of the job), so no caller touches torch.distributed or a global group.

    def _group(self, axes: Sequence[MeshAxis] | None) -> dist.ProcessGroup:
        return self.world_group if axes is None else self.group(*axes)

    def barrier(self) -> None:
        """Every rank of the job waits here (with the job's timeout)."""
        dist.barrier(group=self.world_group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from global rank `src` on every rank (pickled; for small things such as text
        embeddings, a few MB, or a seed). Tensors arrive on the CPU if they left from the CPU."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.world_group)
        return box[0]

    def gather_objects(self, obj: Any, axes: Sequence[MeshAxis] | None = None) -> list[Any]:
        """Every rank's `obj` of the group of ``axes`` (None: the job), in rank order, on each of them."""
        group = self._group(axes)
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def all_true(self, flag: bool, axes: Sequence[MeshAxis] | None = None) -> bool:
        """Whether ``flag`` holds on every rank of the group of ``axes`` (None: the job)."""
        ok = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self._group(axes))
        return bool(ok.item())

    def max_over(self, value: int, axes: Sequence[MeshAxis] | None = None) -> int:
        """The largest ``value`` over the ranks of the group of ``axes`` (None: the job)."""
        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self._group(axes))
        return int(box.item())

    def sum_over(self, x: torch.Tensor, axes: Sequence[MeshAxis]) -> torch.Tensor:
        """``x`` (a few numbers, on this rank's device) summed over the group of ``axes``; every
        rank gets the same values (an all-reduce hands all ranks one result)."""
        out = x.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self._group(axes))
        return out

    def all_finite(self, x: torch.Tensor, axes: Sequence[MeshAxis] | None = SP_AXES) -> bool:
        """Whether `x` is finite on every rank of the group of ``axes`` (so all stop together)."""
        ok = torch.isfinite(x).all().to(torch.int32).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self._group(axes))
        return bool(ok.item())

    def flag_from_every_rank(self, name: str, wait_s: float) -> list[int]:
        """Set this rank's flag ``name`` in the rendezvous store and wait up to ``wait_s`` seconds
        for every rank of the job to set its own; returns the ranks whose flag is missing. Not a
        collective: for a rank that must ask the others while some may be blocked inside a
        collective it will never join (those cannot answer, and their silence is the answer)."""
        store = dist.distributed_c10d._get_default_store()
        world = dist.get_world_size(self.world_group)
        keys = [f"launcher/{name}/{r}" for r in range(world)]
        store.set(keys[self.rank], "1")
        try:
            store.wait(keys, _as_timedelta(wait_s))
            return []
        except RuntimeError:  # DistStoreError: the wait timed out
            return [r for r, key in enumerate(keys) if not store.check([key])]

    @property
    def sp_rank(self) -> int:
        return self.local_rank(MeshAxis.RING) * self.topology.ulysses + self.local_rank(MeshAxis.ULYSSES)


RING_MAX_CTAS = 16  # measured on 4 x H200 at 720p, ring 4: 16 beat NCCL's default, 8 and 4 (docs/BENCHMARKS.md)


def _ring_options(axes: Sequence[MeshAxis]):
    """NCCL options of the ring groups: their P2P kernels run beside the attention kernel, and
    every SM they hold is one the attention lacks, so they get at most ``RING_MAX_CTAS`` CTAs
    (``LAUNCHER_RING_MAX_CTAS`` overrides it; 0 leaves NCCL's default)."""
    cap = int(os.environ.get("LAUNCHER_RING_MAX_CTAS", RING_MAX_CTAS))
    if cap <= 0 or tuple(axes) != (MeshAxis.RING,) or dist.get_backend() != "nccl":
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = int(cap)
    opts.config.min_ctas = 1
    return opts


def _new_groups(topology: Topology, axes: Sequence[MeshAxis], rank: int, timeout) -> dist.ProcessGroup:
    """Create every group along ``axes`` (all ranks must call this in the same order) and
    return the one holding ``rank``."""
    mine = None
    options = _ring_options(axes)
    for ranks in topology.group_ranks(axes):
        group = dist.new_group(ranks=ranks, timeout=timeout, pg_options=options)
        if rank in ranks:
            mine = group
    return mine


def build_parallel_mesh(
    topology: Topology, *, device: torch.device | str | None = None, timeout: float | _dt.timedelta | None = None
) -> ParallelMesh:
    """Build the mesh over the initialised default group. Collective: every rank must call it."""
    if not dist.is_initialized():
        raise RuntimeError("build_parallel_mesh: call init_distributed first")
    if dist.get_world_size() != topology.world_size:
        raise TopologyError(
            f"topology {topology} is for {topology.world_size} ranks, but the job has {dist.get_world_size()}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    device = torch.device(device)
    # new_group would otherwise take the backend's default timeout, not the job's.
    timeout = _as_timedelta(timeout) if timeout is not None else _default_group_timeout(device)
    rank = dist.get_rank()
    groups = {(axis,): _new_groups(topology, (axis,), rank, timeout) for axis in MESH_AXES}
    groups[SP_AXES] = _new_groups(topology, SP_AXES, rank, timeout)
    groups[REPLICA_AXES] = _new_groups(topology, REPLICA_AXES, rank, timeout)
    mesh = DeviceMesh.from_group(
        [groups[(a,)] for a in MESH_AXES],
        device.type,
        mesh=torch.arange(topology.world_size).reshape(topology.shape),
        mesh_dim_names=tuple(a.value for a in MESH_AXES),
    )
    return ParallelMesh(topology=topology, device_mesh=mesh, device=device, rank=rank, world_group=dist.group.WORLD,
                        _groups=groups, timeout=timeout)


def _default_group_timeout(device: torch.device) -> _dt.timedelta:
    """The default group's timeout (what :func:`init_distributed` was given). torch has no public
    getter, so read the backend's options and fall back to our default."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return _dt.timedelta(seconds=DEFAULT_TIMEOUT_S)


def teardown(abort: bool = False) -> None:
    """Destroy every process group; safe to call when none exists (use in ``finally``).
    ``abort``: after a failure, abort the communicators instead of waiting for peers' work."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if abort and dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except Exception:  # noqa: BLE001 - fall back to the graceful path
            pass
    dist.destroy_process_group()
