"""Run `srun python -m launcher generate` without torchrun: SLURM_* -> torchrun's variables.

Under torchrun (also torchrun started by srun) ``RANK`` is set and nothing here changes anything.
Inside an ``srun`` job step without torchrun, every task has ``SLURM_PROCID`` and the step's
task count, and ``parallel/mesh.py:init_distributed`` reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``env://``), so this module fills those in.

Only inside a job *step* (``SLURM_STEP_ID`` set): a batch script itself also carries
``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, and a plain `python -m launcher generate` there
must stay one process instead of waiting for ranks that will never start.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

from .config import ConfigError

PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = 20000 + job id % 20000: jobs sharing a node differ


def split_nodelist(nodelist: str) -> list[str]:
    """Split a Slurm host list at the commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {nodelist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {nodelist!r}: unbalanced '['")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, where: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"host list {where!r}: bad range {item!r}")
        # Slurm pads every number to the width of the range's first one: 01-10 -> 01 ... 10.
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1))
    return out


def _expand_host(expr: str) -> list[str]:
    """One host expression with bracket groups: 'r[1-2]n[01-02]' -> r1n01, r1n02, r2n01, r2n02."""
    m = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", expr)
    if m is None:
        if "[" in expr or "]" in expr:
            raise ValueError(f"host list {expr!r}: unbalanced brackets")
        return [expr]
    prefix, spec, rest = m.groups()
    return [prefix + n + tail for n in _expand_range(spec, expr) for tail in _expand_host(rest)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names, in order: 'node[01-02,07],gpu-a' ->
    ['node01', 'node02', 'node07', 'gpu-a'] (what `scontrol show hostnames` prints)."""
    return [host for expr in split_nodelist(nodelist) for host in _expand_host(expr)]


def first_host(nodelist: str) -> str:
    """The first host of a compact host list (where rank 0 runs)."""
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"host list {nodelist!r} names no host")
    return hosts[0]


def _first_count(tasks_per_node: str) -> int:
    """'4(x2),3' -> 4: the tasks on the first node."""
    m = re.match(r"\s*(\d+)", tasks_per_node)
    if m is None:
        raise ValueError(f"tasks per node {tasks_per_node!r}: expected a count such as '4(x2),3'")
    return int(m.group(1))


def master_port(job_id: str) -> int:
    """A port derived from the job id, so two jobs on one head node do not collide."""
    return PORT_BASE + int(job_id) % PORT_SPAN if job_id.isdigit() else PORT_BASE


def slurm_to_torchrun(env: MutableMapping[str, str]) -> dict[str, str]:
    """torchrun's variables for this srun task, or {} when there is nothing to translate
    (torchrun already set RANK, or this is not an srun step). Raises ValueError on a bad list."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if world is None:
        return {}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or world
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_first_count(per_node)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(env.get("SLURM_JOB_ID", ""))),
    }
    return out


def apply_slurm_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set torchrun's variables from SLURM_* in ``env`` (default: this process's environment)
    when running as an srun task without torchrun; returns what was set."""
    env = os.environ if env is None else env
    try:
        values = slurm_to_torchrun(env)
    except ValueError as err:
        raise ConfigError(f"srun task without torchrun: {err}") from None
    env.update(values)
    return values
