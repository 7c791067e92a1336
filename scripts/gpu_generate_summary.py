"""Summarise scripts/gpu_generate_check.sh: latents of every parallel run against the 1-GPU run
(relative error), step times and peak memory from the JSON records; a table and JSON lines."""

from __future__ import annotations

from pathlib import Path

from gpu_summary_util import append_measured, cell, parse_args, print_table, record_row, runs_rel_err

# run name -> (reference run, gpus, ulysses, ring, cfg)
RUNS = {
    "single": (None, 1, 1, 1, 1),
    "single_cfg": (None, 1, 1, 1, 1),
    "u2r1": ("single", 2, 2, 1, 1),
    "u1r2": ("single", 2, 1, 2, 1),
    "u4r1": ("single", 4, 4, 1, 1),
    "u2r2": ("single", 4, 2, 2, 1),
    "u1r4": ("single", 4, 1, 4, 1),
    "cfg2_u2r1": ("single_cfg", 4, 2, 1, 2),
    "13b_u4r1": (None, 4, 4, 1, 1),
}


def summarise(runs: Path, kind: str) -> list[dict]:
    rows = []
    for name, (ref, gpus, u, r, c) in RUNS.items():
        row, rec = record_row(runs, name, kind, "gpu_allocated_gib")
        if rec is None:
            rows.append(row)
            continue
        row |= {"gpus": gpus, "ulysses": u, "ring": r, "cfg": c}
        if (err := runs_rel_err(runs, name, ref)) is not None:
            row["rel_err_vs_1gpu"] = err
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args(__doc__)
    rows = summarise(args.runs, args.kind)
    append_measured(rows, args.jsonl)
    header = ["run", "model", "size x frames", "gpus", "u x r", "cfg", "s/step (median)", "peak GiB", "rel err vs 1 GPU"]
    print_table(header, rows, lambda r: [
        r["run"], r["model"], f"{r['size']}x{r['frames']}", str(r["gpus"]), f"{r['ulysses']}x{r['ring']}", str(r["cfg"]),
        f"{r['seconds']:.3f}", f"{r['peak_gib']:.1f}", cell(r, "rel_err_vs_1gpu", ".2e")])

if __name__ == "__main__":
    main()
