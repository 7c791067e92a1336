"""The table a job resolves with, why a topology was chosen, and multi-node placement.

Pure, like ``parallel/topology.py`` (its vocabulary): ``launcher/resolve.py`` calls these for
`generate`, `plan`, `slurm` and `sweep` alike.
"""

from __future__ import annotations

import os

from .topology import ResolvedTopology, Topology, TopologyError, TopologyTable, load_topology_table

def table_for(family_table: str | None, heads: int, override: str | os.PathLike | None = None,
              model: str = "the model") -> TopologyTable:
    """The table a job resolves with. ``override`` (``--topology FILE``): that file, validated,
    whose heads must be ``model``'s. Else the family's table (None or a missing file: no rows,
    the rule alone), without its rows when the preset has another head count (they were chosen
    for the table's heads). Raises TopologyError naming the file."""
    if override is not None:
        try:
            table = load_topology_table(override)
        except TopologyError as err:
            raise TopologyError(f"--topology {err}") from None
        if table.heads != heads:
            raise TopologyError(f"--topology {table.path}: a table for {table.heads} heads; {model} has {heads}")
        return table
    if family_table is None or not os.path.exists(family_table):
        return TopologyTable(path=family_table or "(no table)", model="", heads=heads, entries={})
    table = load_topology_table(family_table)
    if table.heads != heads:
        table = TopologyTable(path=table.path, model=table.model, heads=heads, entries={})
    return table


def _display_path(path: str) -> str:
    """Relative to the checkout when inside it, else as given (--topology files elsewhere)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(path, root) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


def explain(chosen: ResolvedTopology, table: TopologyTable, height: int, width: int, frames: int,
            ulysses: int | None = None, ring: int | None = None) -> str:
    """Why this topology: the explicit flags, the table row, or the rule."""
    topo, path = chosen.topology, _display_path(table.path)
    if chosen.source == "explicit":
        flags = " ".join(f"--{k} {v}" for k, v in (("ulysses", ulysses), ("ring", ring)) if v is not None)
        return f"explicit override {flags}"
    if chosen.source == "table":
        e = chosen.entry
        published = ", ".join(f"{u}x{r}" for u, r in e.published)
        how = "predicted (not measured) fastest" if e.predicted else "default"
        return f"table {path}: row {e.key} on {e.gpus} sequence-parallel GPUs, {how} of {published}"
    return (
        f"rule: {path} has no row for {height}x{width}x{frames} on {topo.sp} sequence-parallel GPUs; "
        f"the largest ulysses dividing {table.heads} heads, then ring = {topo.sp} / ulysses"
    )


def node_local(chosen: ResolvedTopology, heads: int, nodes: int, per_node: int,
               explicit: str | None) -> tuple[ResolvedTopology, str | None]:
    """Keep every Ulysses group inside one node (its all-to-alls run every layer). Returns the
    topology and, when it had to change, why (None: ``chosen`` already fits). ``explicit``: the
    user's --ulysses/--ring flags, refused when they would span nodes."""
    topo = chosen.topology
    if per_node % topo.ulysses == 0:
        return chosen, None
    fits = [u for u in range(1, topo.sp + 1) if topo.sp % u == 0 and heads % u == 0 and per_node % u == 0]
    if explicit is not None:
        raise TopologyError(
            f"{explicit} on {nodes} nodes x {per_node} GPUs: ulysses {topo.ulysses} does not divide "
            f"--gpus-per-node {per_node}, so a Ulysses group (all-to-all every layer) would span nodes; "
            f"valid --ulysses: {', '.join(map(str, reversed(fits)))} (ring = {topo.sp} / ulysses)"
        )
    u = max(fits)
    local = Topology(dp=topo.dp, cfg=topo.cfg, ulysses=u, ring=topo.sp // u)
    reason = (
        f"rule for {nodes} nodes: the largest ulysses dividing {heads} heads and {per_node} GPUs "
        f"per node ({topo.sp_label} would span nodes), ring = {local.sp} / {u} across nodes"
    )
    return ResolvedTopology(topology=local, source="rule", entry=chosen.entry), reason
