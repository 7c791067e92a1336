"""`python -m launcher quality RUN --reference REF`: how far a run's videos are from a reference
run's: PSNR (dB) of each video against the reference's video of the same name (same prompt and
seed), over all frames as written (the mp4s, decoded); identical videos give inf.

`scripts/demo_check.py` adds the demo model's grammar check (what each video shows against its
prompt) on top of these rows. A run is an output directory of `generate`: each video's JSON record (written last, so a record
means a complete video) names its prompt and mp4. Differences on random weights say nothing about
quality: measure an approximation (a cache, FP8, a lossy kernel) on the demo model's weights.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"videos of different shapes: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_videos(run: Path) -> dict[str, tuple[str, Path]]:
    """{stem: (prompt, mp4)} of every complete video in a `generate` output directory."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such output directory")
    found = {}
    for rec_path in sorted(run.glob("*.json")):
        rec = json.loads(rec_path.read_text())
        video = (rec.get("outputs") or {}).get("video") if isinstance(rec, dict) else None
        if "prompt" not in rec or not video:
            continue  # not a generate record, or a --no-video run
        path = Path(video)
        path = path if path.is_file() else run / path.name  # the directory may have moved
        found[rec_path.stem] = (rec["prompt"], path)
    if not found:
        raise FileNotFoundError(f"{run}: no generate records with videos (*.json)")
    return found


@dataclass
class VideoPsnr:
    stem: str
    prompt: str
    psnr_db: float


def compare(run: Path, reference: Path) -> list[VideoPsnr]:
    """PSNR of every video of `run` against `reference`'s of the same name."""
    from .video import read_video_frames

    ref = run_videos(reference)
    rows = []
    for stem, (prompt, path) in run_videos(run).items():
        if stem not in ref:
            raise FileNotFoundError(f"{reference}: no video {stem} to compare {path} with")
        rows.append(VideoPsnr(stem, prompt, psnr(read_video_frames(path), read_video_frames(ref[stem][1]))))
    return rows


def json_safe(row: dict) -> dict:
    """The row with infinite PSNRs (identical videos) as None: JSON has no inf."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}


def summary(rows: list[VideoPsnr]) -> dict:
    """Mean PSNR over the videos that differ, the lowest, and how many are identical."""
    finite = [r.psnr_db for r in rows if math.isfinite(r.psnr_db)]
    return {"videos": len(rows), "identical": len(rows) - len(finite),
            "psnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
            "psnr_db_min": min((r.psnr_db for r in rows), default=math.inf)}


def add_quality_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a generate output directory")
    p.add_argument("--reference", type=Path, required=True,
                   help="a run of the same prompts and seeds (e.g. the exact one): PSNR against it")
    p.add_argument("--json", action="store_true", help="rows and summary as JSON")


def run_quality(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        rows = compare(args.run, args.reference)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    total = summary(rows)
    if args.json:  # identical videos are null
        print(json.dumps({"rows": [json_safe(asdict(r)) for r in rows], "summary": json_safe(total)}, indent=2))
        return 0
    for r in rows:
        print(f"{r.psnr_db:7.2f} dB  {r.prompt!r}")
    print(f"{total['videos']} videos, {total['identical']} identical; PSNR mean {total['psnr_db_mean']:.2f} dB "
          f"(over those that differ), min {total['psnr_db_min']:.2f} dB")
    return 0
