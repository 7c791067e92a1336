"""Helpers shared by the GPU summary scripts (scripts/gpu_*_summary.py): finding a run's files,
comparing latents, their command line and the JSON lines they append."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file


def one(folder: Path, pattern: str) -> Path | None:
    """The first file of ``folder`` matching ``pattern`` (sorted), or None."""
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def latents_rel_err(path: Path, ref: Path) -> float:
    """‖a − ref‖ / ‖ref‖ of two `--save-latents` files, in float64."""
    a, b = load_file(str(path))["latents"].double(), load_file(str(ref))["latents"].double()
    return ((a - b).norm() / b.norm()).item()


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
