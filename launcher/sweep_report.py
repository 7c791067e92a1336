"""A sweep's rows and what is made of them (`launcher/sweep.py` runs; this reports).

One row per configuration (dict, one JSON line in runs.jsonl):
    kind "sweep", date, machine, device, gpus, model, size "HxW", height, width, frames, backend,
    kernel, ulysses, ring, steps, warmup, status ("ok", "failed", "timeout", "skipped"), error,
    exit_code, seconds (median s/step after the warm-up steps), step_seconds, phases (the record's
    timings_s), peak_gib (max over ranks), peak_gib_per_rank, peak_kind ("gpu_allocated" from
    torch, or "host_rss" on the CPU), speedup, efficiency, baseline_seconds, command, log, wall_s,
    compile (the record's `compile` entry: blocks compiled, seconds compiling; None when eager).

Made from them: table.md, step_time.png and efficiency.png (matplotlib, Agg; skipped with a note
when it is not installed: rebuild them elsewhere with `sweep --report-from runs.jsonl`), and
topology.yaml (the fastest native factorisation per size, frames and GPU count, in the schema of
configs/topology/, for `generate --topology`).
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

OUTPUT_NAMES = ("runs.jsonl", "table.md", "step_time.png", "efficiency.png", "topology.yaml")
ROOT = Path(__file__).resolve().parents[1]
_BACKEND_ORDER = ("native", "xfuser", "xfuser-cudnn", "yunchang")


class ReportError(ValueError):
    """Rows that cannot be read or reported; the message names the file."""


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def base_row(c, spec) -> dict:
    return {
        "kind": "sweep", "date": date.today().isoformat(), "machine": spec.machine, "device": spec.device,
        "gpus": c.gpus, "model": spec.preset, "size": f"{c.height}x{c.width}", "height": c.height,
        "width": c.width, "frames": c.frames, "backend": c.backend, "kernel": None, "ulysses": c.ulysses,
        "ring": c.ring, "steps": spec.steps, "warmup": spec.warmup, "name": c.name, "status": None,
        "error": None, "exit_code": None, "seconds": None, "step_seconds": None, "phases": None,
        "peak_gib": None, "peak_gib_per_rank": None, "peak_kind": None, "speedup": None, "efficiency": None,
        "baseline_seconds": None, "commit": _commit(),
    }


def skipped_row(c, spec, why: str) -> dict:
    return {**base_row(c, spec), "status": "skipped", "error": why}


def _error_line(log: str, rc: int) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pick in (lambda ln: ln.startswith("error:") or "] error:" in ln, lambda ln: "Error" in ln):
        hits = [ln for ln in lines if pick(ln)]
        if hits:
            return hits[-1][:300]
    return f"exit {rc}"


def run_row(r, spec, timed_out: bool) -> dict:
    """The row of a finished (or killed) run, from its exit code, log and JSON record."""
    row = base_row(r.config, spec)
    log = (r.run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")
    row.update(exit_code=r.proc.returncode, wall_s=round(time.monotonic() - r.started, 2),
               log=str(r.run_dir / "log.txt"), command=shlex.join(["python", *r.command[1:]]), slots=r.slots,
               cuda_visible_devices=r.visible)
    records = sorted(r.run_dir.glob("*.json"))
    if timed_out:
        row.update(status="timeout", error=f"killed after {row['wall_s']:.0f} s (timeout or sweep budget)")
    elif r.proc.returncode != 0:
        row.update(status="failed", error=_error_line(log, r.proc.returncode))
    elif not records:
        row.update(status="failed", error="exit 0 but no JSON record was written")
    else:
        row.update(status="ok", **metrics(json.loads(records[0].read_text()), spec.warmup))
        if (row.pop("_ulysses"), row.pop("_ring")) != (r.config.ulysses, r.config.ring):
            row.update(status="failed", error="the run's topology differs from the configuration's")
    if row["status"] != "ok":
        row["log_tail"] = log[-4000:]
    return row


def metrics(record: dict, warmup: int) -> dict:
    """What a row takes from generate's JSON record."""
    peaks = record["peak_memory_per_rank"]
    key = "gpu_allocated_gib" if "gpu_allocated_gib" in peaks[0] else "host_rss_gib"
    steps = record["step_s"]
    attention = record.get("attention") or {}
    return {
        "seconds": statistics.median(steps[warmup:]), "step_seconds": steps, "phases": record["timings_s"],
        "peak_gib": max(p[key] for p in peaks), "peak_gib_per_rank": [p[key] for p in peaks],
        "peak_kind": key.removesuffix("_gib"), "kernel": attention.get("kernel"),
        "device": _device_name(record),
        "cfg": record["topology"]["cfg"], "cfg_scale": record.get("cfg_scale"),
        "_ulysses": record["topology"]["ulysses"], "_ring": record["topology"]["ring"],
        "compile": record.get("compile"),  # --compile in --extra-args: what compiling cost (None: eager)
    }


def _device_name(record: dict) -> str:
    """The GPU's name for a CUDA run, else the device type ("cpu": a node with GPUs may run a
    sweep on its CPU, and the GPU it has is then not what was measured)."""
    kind = record["device"].split(":")[0]
    return (record.get("versions", {}).get("gpu") or kind) if kind == "cuda" else kind


def with_efficiency(rows: list[dict]) -> list[dict]:
    """speedup = t1 / tN and efficiency = t1 / (N tN) against the 1-GPU native run of the same
    model, size and frames (the first one, if several were merged)."""
    base = {}
    for r in rows:
        if r["status"] == "ok" and r["gpus"] == 1 and r["backend"] == "native":
            base.setdefault((r["model"], r["size"], r["frames"]), r["seconds"])
    out = []
    for r in rows:
        t1 = base.get((r["model"], r["size"], r["frames"])) if r["status"] == "ok" else None
        speed = None if t1 is None else {"baseline_seconds": t1, "speedup": t1 / r["seconds"],
                                         "efficiency": t1 / (r["gpus"] * r["seconds"])}
        out.append({**r, **(speed or {"baseline_seconds": None, "speedup": None, "efficiency": None})})
    return out


def measured(rows: list[dict]) -> list[dict]:
    """The rows worth publishing (docs/benchmarks/*.jsonl): measured ones, without log tails."""
    return [{k: v for k, v in r.items() if k not in ("log_tail", "log", "slots")} for r in rows if r["status"] == "ok"]


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            rows += [json.loads(ln) for ln in lines if ln.strip()]
        except (OSError, json.JSONDecodeError) as err:
            raise ReportError(f"--report-from {path}: cannot read its rows ({err})") from None
    if not rows:
        raise ReportError(f"--report-from {', '.join(map(str, paths))}: no rows")
    return rows


def row_summary(r: dict) -> str:
    if r["status"] == "ok":
        return f"ok, {r['seconds']:.3f} s/step, kernel {r['kernel']}, peak {r['peak_gib']:.1f} GiB"
    return f"{r['status']}: {r['error']}"


# --------------------------------------------------------------------------------------------
# Table, plots, topology
# --------------------------------------------------------------------------------------------


def _order(r: dict):
    b = _BACKEND_ORDER.index(r["backend"]) if r["backend"] in _BACKEND_ORDER else len(_BACKEND_ORDER)
    return (-r["height"] * r["width"], r["frames"], r["gpus"], -r["ulysses"], b)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    """The Markdown table (also table.md's body)."""
    head = ("| size | frames | GPUs | ulysses x ring | backend | kernel | s/step | speedup | efficiency | peak GiB | status |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in sorted(rows, key=_order):
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['error'] or '')[:120]}"
        lines.append(
            f"| {r['size']} | {r['frames']} | {r['gpus']} | {r['ulysses']}x{r['ring']} | {r['backend']} | "
            f"{r['kernel'] or '-'} | {_num(r['seconds'], '.3f')} | {_num(r['speedup'], '.2f')} | "
            f"{_num(r['efficiency'], '.1%')} | {_num(r['peak_gib'], '.1f')} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def table_md(rows: list[dict]) -> str:
    devices = ", ".join(sorted({str(r["device"]) for r in rows}))
    ok = [r for r in rows if r["status"] == "ok"]
    warm = sorted({r["warmup"] for r in ok}) or ["-"]
    return (
        f"# Sweep: {', '.join(sorted({r['model'] for r in rows}))} on {devices}\n\n"
        f"s/step: median seconds per denoising step after the first {'/'.join(map(str, warm))} (warm-up). "
        "Speedup t1/tN and efficiency t1/(N tN) against the 1-GPU native run of the same size. "
        "Peak GiB: the maximum over ranks of torch's peak allocated GPU memory (host RSS on the CPU).\n\n"
        f"{format_table(rows)}\n"
    )


def _family(r: dict) -> str:
    if r["ring"] == 1:
        return "ulysses (Nx1)"
    return "ring (1xN)" if r["ulysses"] == 1 else f"hybrid (N/{r['ring']}x{r['ring']})"


def write_plots(rows: list[dict], out: Path) -> str | None:
    """step_time.png and efficiency.png: one panel per size, GPUs on x, one line per backend and
    topology family (Nx1 Ulysses, 1xN ring, N/2x2 ... hybrid with that ring), each starting at the
    shared 1-GPU baseline. Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots (install the plot extra, then `sweep --report-from`)"
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = sorted({(r["height"], r["width"], r["frames"]) for r in ok}, key=lambda s: (-s[0] * s[1], s[2]))
    for metric, name, label in (("seconds", "step_time.png", "seconds per step"),
                                ("efficiency", "efficiency.png", "parallel efficiency t1 / (N tN)")):
        fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(5.5 * max(1, len(sizes)), 4.2), squeeze=False)
        for ax, (h, w, f) in zip(axes[0], sizes):
            _panel(ax, [r for r in ok if (r["height"], r["width"], r["frames"]) == (h, w, f)], metric)
            ax.set_title(f"{rows[0]['model']} {h}x{w}x{f}")
            ax.set_xlabel("GPUs")
            ax.set_ylabel(label)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return None


def _panel(ax, rows: list[dict], metric: str) -> None:
    base = next((r for r in rows if r["gpus"] == 1), None)
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r["gpus"] > 1 and r[metric] is not None:
            lines.setdefault((r["backend"], _family(r)), []).append((r["gpus"], r[metric]))
    start = [(1, base[metric])] if base is not None and base[metric] is not None else []
    for (backend, family), pts in sorted(lines.items(), key=lambda kv: (_BACKEND_ORDER.index(kv[0][0]), kv[0][1])):
        xs, ys = zip(*sorted(start + pts))
        ax.plot(xs, ys, marker="o", linestyle="-" if backend == "native" else "--", label=f"{backend} {family}")
    if start:
        ax.plot(*zip(*start), marker="s", color="black", linestyle="none", label="1 GPU (native)")
    gpus = sorted({r["gpus"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(gpus, [str(g) for g in gpus])
    if metric == "efficiency":
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def topology_yaml(rows: list[dict], predict_gpus: tuple[int, ...] = ()) -> str:
    """The fastest successful native ulysses x ring per (size, frames, GPUs > 1), as a topology
    table `generate --topology` accepts (validated before it is returned). ``predict_gpus``: GPU
    counts to fill from `plan --predict`'s model where a size has no measured row for them, marked
    ``predicted: true``."""
    import yaml

    from models import get_family
    from parallel.topology import parse_topology_table

    models = sorted({r["model"] for r in rows})
    if len(models) != 1:
        raise ReportError(f"rows of several presets ({', '.join(models)}): one topology table needs one preset")
    best: dict[tuple[int, int, int], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["backend"] == "native" and r["gpus"] > 1:
            by_label = best.setdefault((r["height"], r["width"], r["frames"]), {}).setdefault(r["gpus"], {})
            label = f"{r['ulysses']}x{r['ring']}"
            by_label[label] = min(r["seconds"], by_label.get(label, float("inf")))
    devices = ", ".join(sorted({str(r["device"]) for r in rows if r["status"] == "ok"})) or "-"
    predicted = _predicted_rows(rows, models[0], best, predict_gpus) if predict_gpus else {}
    lines = [
        f"# Written by `python -m launcher sweep` ({date.today().isoformat()}, {devices}). For each size, frames and",
        "# sequence-parallel GPU count: default = the fastest native ulysses x ring measured (median s/step",
        "# after warm-up), published = every one measured, fastest first. Use: generate --topology THIS_FILE",
        f"model: {get_family(models[0]).name}",
        f"heads: {get_family(models[0]).config(models[0]).num_heads}",
        "entries:" if best else "entries: []",
    ]
    if predicted:
        lines.insert(3, "# Rows marked predicted: true were not measured: plan --predict's model ranks them, fastest first.")
    for key in sorted(set(best) | set(predicted), key=lambda k: (-k[0] * k[1], k[2])):
        h, w, f = key
        lines += [f"  - size: {h}x{w}", f"    frames: {f}", "    gpus:"]
        per_gpus = {g: (labels, False) for g, labels in best.get(key, {}).items()}
        per_gpus |= {g: (labels, True) for g, labels in predicted.get(key, {}).items()}
        for g, (labels, guess) in sorted(per_gpus.items(), reverse=True):
            ranked = sorted(labels, key=labels.get)
            times = ", ".join(f"{labels[x]:.4g}" for x in ranked)
            mark, what = (", predicted: true", "predicted") if guess else ("", "")
            lines.append(f"      {g}: {{default: {ranked[0]}, published: [{', '.join(ranked)}]{mark}}}  "
                         f"# {what + ' ' if what else ''}s/step {times}")
    text = "\n".join(lines) + "\n"
    parse_topology_table(yaml.safe_load(text), "topology.yaml")  # what generate will check
    return text


def _predicted_rows(rows: list[dict], preset: str, best: dict, gpus: tuple[int, ...]) -> dict:
    """{(h, w, f): {GPUs: {label: predicted s/step}}} for the GPU counts nothing was measured at,
    on the GPU kind the rows ran on (one node, its calibration)."""
    from models import get_family
    from parallel.topology import factorisations

    from .config import ConfigError
    from .predict import load_calibration, predict_all

    kinds = sorted({str(r["device"]) for r in rows if r["status"] == "ok" and r["device"] not in (None, "cpu")})
    if len(kinds) != 1:
        raise ReportError(f"--predict-missing needs the rows of one GPU kind; they have: {', '.join(kinds) or 'none'}")
    try:
        cal = load_calibration(kinds[0])
    except ConfigError as err:
        raise ReportError(str(err)) from None
    heads = get_family(preset).config(preset).num_heads
    out: dict = {}
    for h, w, f in sorted({(r["height"], r["width"], r["frames"]) for r in rows}):
        for g in gpus:
            if g > 1 and g not in best.get((h, w, f), {}):
                predicted = predict_all(preset, h, w, f, factorisations(g, heads), cal, None)
                out.setdefault((h, w, f), {})[g] = {p.topology.sp_label: p.step.seconds for p in predicted}
    return out


def _write_atomic(path: Path, text: str) -> None:
    """A sweep's report files are rewritten on every run (the one atomic writer, overwriting)."""
    from .video import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def write_outputs(rows: list[dict], out: Path, predict_gpus: tuple[int, ...] = ()) -> list[dict]:
    """runs.jsonl (rewritten with speedup/efficiency), table.md, the plots and topology.yaml."""
    rows = with_efficiency(rows)
    _write_atomic(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_atomic(out / "table.md", table_md(rows))
    note = write_plots(rows, out)
    if note:
        print(f"note: {note}")
    _write_atomic(out / "topology.yaml", topology_yaml(rows, predict_gpus))
    return rows
