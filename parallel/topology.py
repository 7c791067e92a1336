"""Parallel topology: the degrees (dp, cfg, ring, ulysses) and the YAML tables that choose them.

Pure configuration: nothing here touches ``torch.distributed``. Every rank loads and validates the
same file and arguments identically, so a bad choice makes every rank fail with the same message
before the first collective.

Vocabulary
    world size  = dp * cfg * ring * ulysses
    sp size     = ring * ulysses: the ranks that share one video's token sequence
    "UxR"       = ulysses x ring, written as in the HunyuanVideo release's table ("4x2")

Validity rule (ours, broader than the release's): ``ulysses`` must divide the head count and
``cfg`` is 1 or 2. The release also needed the latent height or width to divide by the degree;
we pad uneven token counts (``parallel/sequence.py``), so that restriction does not apply. For a
(size, frames, GPUs) that the table does not list we take the largest ulysses that divides the
heads, then ring = sp size / ulysses (Ulysses all-to-alls are cheaper than ring passes within a
node, and pure Ulysses needs no log-sum-exp merge).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

CFG_CHOICES = (1, 2)
AXES = ("dp", "cfg", "ring", "ulysses")  # mesh axes, outermost first (parallel.mesh.MeshAxis)


class TopologyError(ValueError):
    """A topology or topology table that cannot run; the message names where and what is valid."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Degrees of the four mesh axes, outermost first: ``dp`` (independent videos), ``cfg``
    (conditional / unconditional branch), ``ring`` (ring attention), ``ulysses`` (all-to-all)."""

    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "cfg", "ring", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TopologyError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg not in CFG_CHOICES:
            raise TopologyError(f"cfg must be one of {list(CFG_CHOICES)}, got {self.cfg}")

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.ring * self.ulysses

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ranks sharing one token sequence."""
        return self.ring * self.ulysses

    @property
    def sp_label(self) -> str:
        """"UxR" as in the release's table, e.g. "4x2"."""
        return f"{self.ulysses}x{self.ring}"

    def __str__(self) -> str:
        return f"dp{self.dp}-cfg{self.cfg}-u{self.ulysses}r{self.ring}"

    def check_heads(self, heads: int) -> None:
        if heads % self.ulysses:
            raise TopologyError(f"ulysses {self.ulysses} does not divide {heads} heads")

    def check_world(self, world_size: int) -> None:
        """Refuse a job whose world size is not the product of the degrees."""
        if self.world_size != world_size:
            raise TopologyError(
                f"dp {self.dp} x cfg {self.cfg} x ring {self.ring} x ulysses {self.ulysses} = "
                f"{self.world_size}, but the world size is {world_size}"
            )

    # The rank layout (torchtitan's ParallelDims): row-major over AXES, ulysses innermost.

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.degree(a) for a in AXES)

    def degree(self, axis: str) -> int:
        return getattr(self, _axis(axis))

    def coords(self, rank: int) -> dict[str, int]:
        """Position of a global rank on each axis."""
        out = {}
        for axis in reversed(AXES):
            rank, out[axis] = divmod(rank, self.degree(axis))
        return {a: out[a] for a in AXES}

    def group_ranks(self, axes: Iterable[str]) -> list[list[int]]:
        """Partition of all ranks into the groups spanned by ``axes`` (flattened in mesh order).
        Each group lists global ranks in its own rank order (row-major over ``axes``)."""
        wanted = {_axis(a) for a in axes}
        keep = [a for a in AXES if a in wanted]
        rest = [a for a in AXES if a not in wanted]
        stride = {a: math.prod(self.degree(b) for b in AXES[AXES.index(a) + 1 :]) for a in AXES}

        def ranks(names, index):
            return sum(i * stride[a] for a, i in zip(names, index))

        spans = [itertools.product(*(range(self.degree(a)) for a in names)) for names in (rest, keep)]
        inner = list(spans[1])
        return [[ranks(rest, r) + ranks(keep, k) for k in inner] for r in spans[0]]


def _axis(axis) -> str:
    """An axis name from a str or a ``parallel.mesh.MeshAxis`` (a str enum)."""
    name = getattr(axis, "value", axis)
    if name not in AXES:
        raise ValueError(f"unknown mesh axis {axis!r}; valid: {', '.join(AXES)}")
    return name


def parse_sp(label: str) -> tuple[int, int]:
    """"4x2" -> (ulysses=4, ring=2)."""
    parts = str(label).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise TopologyError(f"expected ULYSSESxRING such as '4x2', got {label!r}")
    ulysses, ring = (int(p) for p in parts)
    if ulysses < 1 or ring < 1:
        raise TopologyError(f"degrees must be positive, got {label!r}")
    return ulysses, ring


def sp_factorisations(sp_size: int, heads: int) -> tuple[tuple[int, int], ...]:
    """All (ulysses, ring) with ulysses * ring == sp_size and ulysses | heads, largest ulysses
    first (the order of preference)."""
    if sp_size < 1 or heads < 1:
        raise TopologyError(f"need sp_size >= 1 and heads >= 1, got {sp_size}, {heads}")
    return tuple(
        (u, sp_size // u)
        for u in range(sp_size, 0, -1)
        if sp_size % u == 0 and heads % u == 0
    )


def factorisations(world_size: int, heads: int, *, cfg: int = 1, dp: int = 1) -> tuple[Topology, ...]:
    """Valid topologies for a world size with the given cfg and dp degrees, preferred first."""
    if world_size % (cfg * dp):
        raise TopologyError(f"world size {world_size} is not divisible by cfg {cfg} x dp {dp}")
    sp_size = world_size // (cfg * dp)
    return tuple(
        Topology(dp=dp, cfg=cfg, ring=r, ulysses=u) for u, r in sp_factorisations(sp_size, heads)
    )


def all_topologies(world_size: int, heads: int) -> tuple[Topology, ...]:
    """Every valid (dp, cfg, ring, ulysses) for a world size, for ``plan`` and sweeps."""
    found = []
    for cfg in CFG_CHOICES:
        for dp in range(1, world_size + 1):
            if world_size % (cfg * dp) == 0:
                found.extend(factorisations(world_size, heads, cfg=cfg, dp=dp))
    return tuple(found)


def preferred_topology(world_size: int, heads: int, *, cfg: int = 1, dp: int = 1) -> Topology:
    """The rule for combinations a table does not list: largest ulysses dividing the heads."""
    return factorisations(world_size, heads, cfg=cfg, dp=dp)[0]


def _labels(pairs) -> str:
    return ", ".join(f"{u}x{r}" for u, r in pairs)


# --------------------------------------------------------------------------------------------
# YAML tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TopologyEntry:
    """One (size, frames, sp GPUs) row: the release's published (ulysses, ring) choices and
    the one we run by default."""

    height: int
    width: int
    frames: int
    gpus: int
    default: tuple[int, int]
    published: tuple[tuple[int, int], ...]
    predicted: bool = False  # chosen by the step-time model (`sweep --predict-missing`), not measured

    @property
    def key(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


@dataclass(frozen=True, kw_only=True)
class ResolvedTopology:
    """A chosen topology and why: "explicit", "table" (the table's default) or "rule"."""

    topology: Topology
    source: str
    entry: TopologyEntry | None = None


@dataclass(frozen=True, kw_only=True)
class TopologyTable:
    """A model's topology table, loaded and validated by :func:`load_topology_table`."""

    path: str
    model: str
    heads: int
    entries: Mapping[tuple[int, int, int, int], TopologyEntry] = field(default_factory=dict)

    def lookup(self, *, height: int, width: int, frames: int, gpus: int) -> TopologyEntry | None:
        """The entry for (H, W, frames, sp GPUs); a portrait size uses its landscape entry."""
        for h, w in ((height, width), (width, height)):
            entry = self.entries.get((h, w, frames, gpus))
            if entry is not None:
                return entry
        return None

    def resolve(
        self,
        *,
        height: int,
        width: int,
        frames: int,
        world_size: int,
        cfg: int = 1,
        dp: int = 1,
        ulysses: int | None = None,
        ring: int | None = None,
    ) -> ResolvedTopology:
        """Degrees for a job. Explicit ``ulysses``/``ring`` win (one may be given, the other is
        derived); else the table's default; else the rule (largest ulysses dividing the heads).
        Raises :class:`TopologyError` naming the file, the job and the valid choices."""
        where = f"{self.path}: {height}x{width}x{frames} on {world_size} GPUs"
        try:
            Topology(cfg=cfg, dp=dp)
        except TopologyError as err:
            raise TopologyError(f"{where}: {err}") from None
        if world_size < 1 or world_size % (cfg * dp):
            raise TopologyError(f"{where}: world size is not divisible by cfg {cfg} x dp {dp}")
        sp_size = world_size // (cfg * dp)
        valid = sp_factorisations(sp_size, self.heads)
        entry = self.lookup(height=height, width=width, frames=frames, gpus=sp_size)
        if ulysses is None and ring is None:
            u, r = entry.default if entry else valid[0]
            return ResolvedTopology(
                topology=Topology(dp=dp, cfg=cfg, ring=r, ulysses=u),
                source="table" if entry else "rule",
                entry=entry,
            )
        u, r = self._complete(where, sp_size, ulysses, ring, valid)
        return ResolvedTopology(
            topology=Topology(dp=dp, cfg=cfg, ring=r, ulysses=u), source="explicit", entry=entry
        )

    def _complete(self, where, sp_size, ulysses, ring, valid) -> tuple[int, int]:
        for name, value in (("ulysses", ulysses), ("ring", ring)):
            if value is not None and (value < 1 or sp_size % value):
                raise TopologyError(
                    f"{where}: {name} {value} does not divide the {sp_size} sequence-parallel "
                    f"GPUs; valid: {_labels(valid)}"
                )
        u = ulysses if ulysses is not None else sp_size // ring
        r = ring if ring is not None else sp_size // ulysses
        if u * r != sp_size:
            raise TopologyError(
                f"{where}: {u}x{r} uses {u * r} GPUs, not {sp_size}; valid: {_labels(valid)}"
            )
        if self.heads % u:
            raise TopologyError(
                f"{where}: ulysses {u} does not divide {self.heads} heads; valid: {_labels(valid)}"
            )
        return u, r


_TOP_KEYS = {"model", "heads", "entries"}
_ENTRY_KEYS = {"size", "frames", "gpus"}
_GPU_KEYS = {"default", "published"}
_GPU_OPTIONAL = {"predicted"}


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise TopologyError(f"{where}: {msg}")


def _check_keys(obj: Any, allowed: set[str], where: str, optional: frozenset[str] = frozenset()) -> None:
    _require(isinstance(obj, dict), where, f"expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(map(str, obj)) - allowed - optional)
    _require(not unknown, where, f"unknown key(s) {unknown}; valid: {sorted(allowed | optional)}")
    missing = sorted(allowed - set(map(str, obj)))
    _require(not missing, where, f"missing key(s) {missing}")


def _parse_size(value: Any, where: str) -> tuple[int, int]:
    parts = str(value).lower().split("x")
    ok = len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts)
    _require(ok, where, f"size must be HEIGHTxWIDTH such as 720x1280, got {value!r}")
    return int(parts[0]), int(parts[1])


def _parse_label(value: Any, where: str) -> tuple[int, int]:
    try:
        return parse_sp(value)
    except TopologyError as err:
        raise TopologyError(f"{where}: {err}") from None


def _parse_gpu_row(row: Any, gpus: Any, heads: int, where: str) -> tuple[int, tuple, tuple]:
    _require(isinstance(gpus, int) and gpus > 0, where, f"GPU count must be a positive integer, got {gpus!r}")
    _check_keys(row, _GPU_KEYS, where, frozenset(_GPU_OPTIONAL))
    _require(isinstance(row.get("predicted", False), bool), f"{where}.predicted", "must be true or false")
    _require(isinstance(row["published"], list) and row["published"], f"{where}.published", "must be a non-empty list")
    published = tuple(_parse_label(v, f"{where}.published") for v in row["published"])
    default = _parse_label(row["default"], f"{where}.default")
    valid = sp_factorisations(gpus, heads)
    for u, r in (*published, default):
        _require(u * r == gpus, where, f"{u}x{r} uses {u * r} GPUs, not {gpus}; valid: {_labels(valid)}")
        _require(heads % u == 0, where, f"ulysses {u} does not divide {heads} heads; valid: {_labels(valid)}")
    _require(default in published, f"{where}.default", f"{default[0]}x{default[1]} is not among published {_labels(published)}")
    return gpus, default, published


def _parse_entry(raw: Any, heads: int, where: str) -> list[TopologyEntry]:
    _check_keys(raw, _ENTRY_KEYS, where)
    height, width = _parse_size(raw["size"], f"{where}.size")
    frames = raw["frames"]
    _require(isinstance(frames, int) and frames > 0, f"{where}.frames", f"must be a positive integer, got {frames!r}")
    rows = raw["gpus"]
    _require(isinstance(rows, dict) and rows, f"{where}.gpus", "must be a non-empty mapping GPUs -> choices")
    out = []
    for gpus, row in rows.items():
        g, default, published = _parse_gpu_row(row, gpus, heads, f"{where}.gpus.{gpus}")
        out.append(TopologyEntry(height=height, width=width, frames=frames, gpus=g, default=default,
                                 published=published, predicted=row.get("predicted", False)))
    return out


def parse_topology_table(data: Any, path: str) -> TopologyTable:
    """Validate a parsed YAML document; errors name ``path`` and the offending key."""
    _check_keys(data, _TOP_KEYS, path)
    heads = data["heads"]
    _require(isinstance(heads, int) and heads > 0, f"{path}: heads", f"must be a positive integer, got {heads!r}")
    _require(isinstance(data["entries"], list), f"{path}: entries", "must be a list")
    entries: dict[tuple[int, int, int, int], TopologyEntry] = {}
    for i, raw in enumerate(data["entries"]):
        where = f"{path}: entries[{i}]"
        for entry in _parse_entry(raw, heads, where):
            key = (entry.height, entry.width, entry.frames, entry.gpus)
            _require(key not in entries, where, f"duplicate row {entry.key} on {entry.gpus} GPUs")
            entries[key] = entry
    return TopologyTable(path=path, model=str(data["model"]), heads=heads, entries=entries)


def load_topology_table(path: str | os.PathLike) -> TopologyTable:
    """Load and validate a topology YAML (``configs/topology/<family>.yaml``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise TopologyError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise TopologyError(f"{path}: not valid YAML: {err}") from None
    return parse_topology_table(data, path)


def default_table_path(model: str) -> str:
    """``configs/topology/<model>.yaml`` (of the checkout, or the installed package's copy)."""
    from models.configs import config_file

    return str(config_file("topology", f"{model}.yaml"))
