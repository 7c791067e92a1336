"""Summarise scripts/gpu_memory_bench.sh: per run, the median step time after the first, the
peak GPU memory of the worst rank (device-level: allocator peak plus context and NCCL), the
node's host memory (sum of the ranks' PSS), the placement used, and for FP8 the relative error of
the latents against the plain bf16 run of the same size; a table and JSON lines."""

from __future__ import annotations

from pathlib import Path

from gpu_summary_util import append_measured, cell, parse_args, print_table, record_row, runs_rel_err

REFERENCE = {"720x1280": "plain", "544x960": "plain_544"}


def _row(name: str, runs: Path, kind: str) -> dict:
    row, rec = record_row(runs, name, kind, "gpu_device_peak_gib")
    if rec is None:
        return row
    peaks, mem = rec["peak_memory_per_rank"], rec.get("memory", {})
    size = row["size"]
    row |= {
        "allocated_gib": max(p.get("gpu_allocated_gib", 0.0) for p in peaks),
        "host_pss_gib": sum(p.get("host_pss_gib", 0.0) for p in peaks),
        "placement": (mem.get("used") or {}).get("label"), "budget_gib": mem.get("budget_gib"),
        "estimate_gib": (mem.get("used") or {}).get("peak_bytes", 0) / 2**30,
        "fallback_after_oom": mem.get("fallback_after_oom"), "host_store": mem.get("host_store"),
    }
    ref = REFERENCE.get(size)
    if ref != name and (err := runs_rel_err(runs, name, ref)) is not None:
        row["rel_err_vs_bf16"] = err
    return row


def main() -> None:
    args = parse_args(__doc__)
    rows = [_row(d.name, args.runs, args.kind) for d in sorted(args.runs.iterdir()) if d.is_dir()]
    append_measured(rows, args.jsonl)
    base = {r["size"]: r["seconds"] for r in rows if r.get("run") in REFERENCE.values() and "seconds" in r}
    header = ["run", "size", "placement", "s/step", "vs plain", "peak GiB (worst rank)", "estimate GiB",
              "host PSS GiB (node)", "rel err vs bf16", "OOM fallback"]
    print_table(header, rows, lambda r: [
        r["run"], f"{r['size']}x{r['frames']}", str(r["placement"]), f"{r['seconds']:.3f}",
        f"{r['seconds'] / base[r['size']]:.3f}" if r["size"] in base else "-", f"{r['peak_gib']:.2f}",
        f"{r['estimate_gib']:.2f}", f"{r['host_pss_gib']:.1f}", cell(r, "rel_err_vs_bf16", ".2e"),
        "yes" if r["fallback_after_oom"] else "no"])

if __name__ == "__main__":
    main()
