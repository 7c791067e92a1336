"""Summarise scripts/gpu_memory_bench.sh: per run, the median step time after the first, the
peak GPU memory of the worst rank (device-level: allocator peak plus context and NCCL), the
node's host memory (sum of the ranks' PSS), the placement used, and for FP8 the relative error of
the latents against the plain bf16 run of the same size; a table and JSON lines."""

from __future__ import annotations

from pathlib import Path

from gpu_summary_util import append_measured, cell, parse_args, print_table, record_row, runs_rel_err

REFERENCE = {"720x1280": "plain", "544x960": "plain_544"}


def memory_row(name: str, runs: Path, kind: str, reference: dict[str, str]) -> dict:
    """Run ``name``'s row: record_row's fields, its memory (allocated peak, what lived outside the
    allocator at the end: CUDA context and NCCL, the node's host PSS), the placement used and its
    estimate, and the latents' error against ``reference[size]``'s run when both saved them."""
    row, rec = record_row(runs, name, kind, "gpu_device_peak_gib")
    if rec is None:
        return row
    peaks, mem = rec["peak_memory_per_rank"], rec.get("memory", {})
    used = mem.get("used") or {}
    size = row["size"]
    row |= {
        "allocated_gib": max(p.get("gpu_allocated_gib", 0.0) for p in peaks),
        "outside_gib": max(p.get("gpu_device_peak_gib", 0.0) - p.get("gpu_reserved_gib", 0.0) for p in peaks),
        "host_pss_gib": sum(p.get("host_pss_gib", 0.0) for p in peaks),
        "placement": used.get("label"), "budget_gib": mem.get("budget_gib"),
        "estimate_gib": used.get("peak_bytes", 0) / 2**30, "chunk_tokens": used.get("chunk_tokens"),
        "runtime_overhead_bytes": used.get("runtime_overhead_bytes"),
        "fallback_after_oom": mem.get("fallback_after_oom"), "host_store": mem.get("host_store"),
    }
    ref = reference.get(size)
    if ref != name and (err := runs_rel_err(runs, name, ref)) is not None:
        row["rel_err_vs_bf16"] = err
    return row


def measured_rows(args, reference: dict[str, str]) -> tuple[list[dict], dict[str, float]]:
    """Every run's row (appended to --jsonl when it measured something) and the s/step of each
    size's reference run."""
    rows = [memory_row(d.name, args.runs, args.kind, reference) for d in sorted(args.runs.iterdir()) if d.is_dir()]
    append_measured(rows, args.jsonl)
    return rows, {r["size"]: r["seconds"] for r in rows if r.get("run") in reference.values() and "seconds" in r}


def main() -> None:
    rows, base = measured_rows(parse_args(__doc__), REFERENCE)
    header = ["run", "size", "placement", "s/step", "vs plain", "peak GiB (worst rank)", "estimate GiB",
              "host PSS GiB (node)", "rel err vs bf16", "OOM fallback"]
    print_table(header, rows, lambda r: [
        r["run"], f"{r['size']}x{r['frames']}", str(r["placement"]), f"{r['seconds']:.3f}",
        f"{r['seconds'] / base[r['size']]:.3f}" if r["size"] in base else "-", f"{r['peak_gib']:.2f}",
        f"{r['estimate_gib']:.2f}", f"{r['host_pss_gib']:.1f}", cell(r, "rel_err_vs_bf16", ".2e"),
        "yes" if r["fallback_after_oom"] else "no"])

if __name__ == "__main__":
    main()
