"""Summarise scripts/gpu_ulysses_chunks.sh: per run, the median step time after the first, the
speedup of each chunk count against one chunk, the parallel efficiency against the 1-GPU run of
the same size, and the latents' relative error against the one-chunk run; a table and JSON lines."""

from __future__ import annotations

from pathlib import Path

from gpu_summary_util import append_measured, cell, parse_args, print_table, record_row, runs_rel_err


def _row(name: str, runs: Path, kind: str) -> dict:
    row, _ = record_row(runs, name, kind, "gpu_device_peak_gib")
    row["head_chunks"] = int(name.split("chunks")[1]) if "chunks" in name and "seconds" in row else None
    return row


def main() -> None:
    args = parse_args(__doc__)
    rows = [_row(d.name, args.runs, args.kind) for d in sorted(args.runs.iterdir()) if d.is_dir()]
    ok = [r for r in rows if "seconds" in r]
    one_gpu = {r["size"]: r["seconds"] for r in ok if r["gpus"] == 1}
    one_chunk = {r["size"]: r for r in ok if r["head_chunks"] == 1}
    for r in ok:
        if r["size"] in one_gpu:
            r["efficiency"] = one_gpu[r["size"]] / (r["gpus"] * r["seconds"])
        ref = one_chunk.get(r["size"])
        if r["head_chunks"] and ref is not None and ref is not r:
            r["vs_one_chunk"] = r["seconds"] / ref["seconds"]
            if (err := runs_rel_err(args.runs, r["run"], ref["run"])) is not None:
                r["rel_err_vs_one_chunk"] = err
    append_measured(rows, args.jsonl)
    header = ["run", "size", "GPUs", "head chunks", "s/step", "vs 1 chunk", "efficiency", "peak GiB", "latents rel err vs 1 chunk"]
    print_table(header, rows, lambda r: [
        r["run"], f"{r['size']}x{r['frames']}", str(r["gpus"]), str(r["head_chunks"] or "-"), f"{r['seconds']:.3f}",
        cell(r, "vs_one_chunk", ".3f"), cell(r, "efficiency", ".1%"), f"{r['peak_gib']:.1f}",
        cell(r, "rel_err_vs_one_chunk", ".2e")])

if __name__ == "__main__":
    main()
