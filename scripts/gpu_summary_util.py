"""Helpers shared by the GPU summary scripts (scripts/gpu_*_summary.py): finding a run's files,
comparing latents, their command line and the JSON lines they append."""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from safetensors.torch import load_file


def one(folder: Path, pattern: str) -> Path | None:
    """The first file of ``folder`` matching ``pattern`` (sorted), or None."""
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def record_row(runs: Path, name: str, kind: str, peak_key: str) -> tuple[dict, dict | None]:
    """The fields every benchmark row has, from run ``name``'s JSON record: ``(row, record)``, or
    ``({"run", "status"}, None)`` when the run left no record. ``peak_key``: which per-rank peak
    (``gpu_allocated_gib`` or ``gpu_device_peak_gib``) becomes ``peak_gib``, the worst rank's."""
    record_path = one(runs / name, "*.json")
    if record_path is None:
        return {"run": name, "status": "failed (see its log)"}, None
    rec = json.loads(record_path.read_text())
    topo = rec["topology"]
    row = {
        "kind": kind, "date": date.today().isoformat(), "device": rec["versions"].get("gpu", "?"),
        "gpus": topo["world_size"], "model": rec["model"]["preset"], "size": "x".join(map(str, rec["size"])),
        "frames": rec["frames"], "backend": "native", "ulysses": topo["ulysses"], "ring": topo["ring"], "run": name,
        # The first step builds kernel plans (cuDNN, NCCL): the median is over the later ones.
        "steps": rec["steps"], "seconds": statistics.median(rec["step_s"][1:] or rec["step_s"]), "step_s": rec["step_s"],
        "peak_gib": max(p.get(peak_key, 0.0) for p in rec["peak_memory_per_rank"]),
        "timings_s": rec["timings_s"], "command": rec["command"],
    }
    return row, rec


def latents_rel_err(path: Path, ref: Path) -> float:
    """‖a − ref‖ / ‖ref‖ of two `--save-latents` files, in float64."""
    a, b = load_file(str(path))["latents"].double(), load_file(str(ref))["latents"].double()
    return ((a - b).norm() / b.norm()).item()


def runs_rel_err(runs: Path, name: str, ref: str | None) -> float | None:
    """Run ``name``'s latents against run ``ref``'s, or None when either left none."""
    lat = one(runs / name, "*.latents.safetensors")
    ref_lat = one(runs / ref, "*.latents.safetensors") if ref else None
    return None if lat is None or ref_lat is None else latents_rel_err(lat, ref_lat)


def cell(row: dict, key: str, spec: str) -> str:
    """``row[key]`` formatted, or "-" when the row has no such value."""
    return format(row[key], spec) if row.get(key) is not None else "-"


def print_table(header: list[str], rows: list[dict], cells) -> None:
    """A Markdown table: ``cells(row)`` for each measured row, the status for a failed one."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print(f"| {row['run']} | {row['status']} |" if "seconds" not in row else "| " + " | ".join(cells(row)) + " |")


def parse_args(doc: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--kind", default="unknown")
    p.add_argument("--jsonl", type=Path, required=True)
    return p.parse_args()


def append_measured(rows: list[dict], path: Path) -> None:
    """Append the rows that measured something (a "seconds" key) as JSON lines."""
    with path.open("a") as f:
        for row in rows:
            if "seconds" in row:
                f.write(json.dumps(row) + "\n")
