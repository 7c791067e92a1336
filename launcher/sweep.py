"""`python -m launcher sweep`: measure `generate` over sizes x GPU counts x topologies x backends.

Every configuration is its own process tree, exactly what a user would type:
`python -m launcher generate ...` on 1 GPU, `python -m torch.distributed.run --standalone
--nproc_per_node G -m launcher generate ... --ulysses U --ring R --attention B` on G. Each has a
timeout and its own log (`runs/<name>/log.txt`); a failure (non-zero exit, timeout, no record) is a
row with its exit code and log tail, and the sweep goes on. The numbers come from the JSON record
`generate` writes (`step_s`, `timings_s`, `peak_memory_per_rank`, `attention`).

Backends only differ when the sequence is split, so each size's 1-GPU run happens once (native)
and is the baseline of every backend: speedup = t1 / tN, efficiency = t1 / (N * tN), t = median
seconds per step after the warm-up steps.

With --concurrent, configurations run side by side on disjoint GPU sets (each its own
CUDA_VISIBLE_DEVICES slice; `--standalone` gives each torchrun its own rendezvous port). They share
the host (CPU, PCIe), not GPUs. On the CPU, slots are processes (default: the core count).
Order: the largest GPU count first, then the 1-GPU baselines, then the rest, so that a --budget
(the whole sweep's seconds) cuts the least important runs.

Input and configurations: `launcher/sweep_spec.py`. Outputs (`launcher/sweep_report.py`):
runs.jsonl, table.md, step_time.png, efficiency.png, topology.yaml. Exit status: 0 when every
configuration ran, 1 when some failed (outputs are still written), 2 on bad sweep input.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sweep_report as report
from .sweep_spec import (
    ROOT,
    SweepConfig,
    SweepError,
    SweepSpec,
    add_sweep_args,
    enumerate_configs,
    launch_command,
    spec_from_args,
)

__all__ = ["add_sweep_args", "run_sweep"]


# --------------------------------------------------------------------------------------------
# Running: a small scheduler over GPU (or CPU) slots
# --------------------------------------------------------------------------------------------


@dataclass
class Running:
    config: SweepConfig
    proc: subprocess.Popen
    command: list[str]
    run_dir: Path
    slots: list[int]
    started: float
    deadline: float
    visible: str | None  # its CUDA_VISIBLE_DEVICES
    log: object = field(repr=False)


def visible_devices(spec: SweepSpec) -> list[str]:
    """Slot i -> the device id its runs see (CUDA: the parent's CUDA_VISIBLE_DEVICES entries)."""
    if spec.device == "cuda":
        import torch

        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [x.strip() for x in env.split(",") if x.strip()] if env else [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [str(i) for i in range(os.cpu_count() or 1)]
    return ids[: spec.slots] if spec.slots else ids


def start(c: SweepConfig, spec: SweepSpec, slots: list[int], ids: list[str], end: float | None) -> Running:
    run_dir = spec.output_dir / "runs" / c.name
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob("*.json"):  # a record left by an earlier sweep must not count as this run's
        stale.unlink()
    cmd = launch_command(c, spec, run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    visible = ",".join(ids[i] for i in slots) if spec.device == "cuda" else None
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    log = open(run_dir / "log.txt", "w", encoding="utf-8")
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    # Own session: a timeout kills the whole tree (torchrun and its workers), nothing else.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    now = time.monotonic()
    deadline = now + spec.timeout if end is None else min(now + spec.timeout, end)
    return Running(c, proc, cmd, run_dir, slots, now, deadline, visible, log)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; empty elsewhere). torchrun starts its workers in
    sessions of their own, so signalling torchrun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(r: Running) -> None:
    """End a run's whole tree: SIGTERM to its group (torchrun then stops its workers), then
    SIGKILL after 10 s to the group and to every process that was below it."""
    tree = _descendants(r.proc.pid)
    try:
        os.killpg(r.proc.pid, signal.SIGTERM)
        r.proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for kill in [lambda: os.killpg(r.proc.pid, signal.SIGKILL), *(lambda p=p: os.kill(p, signal.SIGKILL) for p in tree)]:
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    r.proc.wait(timeout=10)


def run_all(configs: list[SweepConfig], spec: SweepSpec, on_row) -> list[dict]:
    """Run every configuration (side by side with --concurrent); `on_row(row)` as each ends."""
    ids = visible_devices(spec)
    end = time.monotonic() + spec.budget if spec.budget else None
    # The largest GPU count first (the headline numbers, safest from --budget), then the 1-GPU
    # baselines (long: with --concurrent they pack beside 2-GPU runs), then the rest.
    top = max((c.gpus for c in configs), default=0)
    pending = sorted(configs, key=lambda c: (c.gpus != top, c.gpus))
    free, running, rows = list(range(len(ids))), [], []

    def done(row):
        rows.append(row)
        on_row(row)

    while pending or running:
        for c in list(pending):
            out_of_time = end is not None and time.monotonic() >= end
            if c.gpus > len(ids) or out_of_time:
                pending.remove(c)
                why = "sweep budget spent" if out_of_time else f"needs {c.gpus} {spec.device} slots, {len(ids)} available"
                done(report.skipped_row(c, spec, why))
            elif c.gpus <= len(free) and (spec.concurrent or not running):
                pending.remove(c)
                running.append(start(c, spec, free[: c.gpus], ids, end))
                free = free[c.gpus:]
            if not spec.concurrent and running:
                break
        time.sleep(0.2)
        for r in list(running):
            timed_out = r.proc.poll() is None and time.monotonic() > r.deadline
            if timed_out:
                stop(r)
            if r.proc.poll() is not None:
                r.log.close()
                running.remove(r)
                free = sorted(free + r.slots)
                done(report.run_row(r, spec, timed_out))
    return rows


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def run_sweep(args: argparse.Namespace) -> int:
    """The `sweep` command; 0 all ran, 1 some configuration failed, 2 bad input."""
    try:
        predict_gpus = _gpu_counts(args.predict_missing)
        if args.report_from:
            rows = report.read_rows(args.report_from)
            return _finish(rows, args.output_dir, args.append_jsonl, predict_gpus)
        spec = spec_from_args(args)
    except (SweepError, report.ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from models import get_family

    configs = enumerate_configs(spec, get_family(spec.preset).config(spec.preset).num_heads)
    if args.dry_run:
        for c in configs:
            print(f"{c.name}: {shlex.join(launch_command(c, spec, spec.output_dir / 'runs' / c.name))}")
        return 0
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    stream = spec.output_dir / "runs.jsonl"
    stream.write_text("")
    sweep_command = shlex.join(["python", "-m", "launcher", *sys.argv[1:]])
    print(f"sweep: {len(configs)} configurations -> {spec.output_dir}", file=sys.stderr)

    def on_row(row):
        row["sweep_command"] = sweep_command
        report.append_rows(stream, [row])  # streamed: a killed sweep keeps what it measured
        print(f"  {row['name']}: {report.row_summary(row)}", file=sys.stderr)

    rows = run_all(configs, spec, on_row)
    try:
        return _finish(rows, spec.output_dir, args.append_jsonl, predict_gpus)
    except report.ReportError as err:  # the rows are in runs.jsonl already
        print(f"error: {err}", file=sys.stderr)
        return 2


def _gpu_counts(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise SweepError(f"--predict-missing {text!r}: a comma list of GPU counts such as 8,16")
    return counts


def _finish(rows: list[dict], out: Path, append: Path | None, predict_gpus: tuple[int, ...] = ()) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = report.write_outputs(rows, out, predict_gpus)
    if append is not None:
        report.append_rows(append, report.measured(rows))
    print(report.format_table(rows))
    print(f"\noutputs: {', '.join(str(out / n) for n in report.OUTPUT_NAMES if (out / n).exists())}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1

