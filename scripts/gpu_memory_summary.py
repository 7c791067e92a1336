"""Summarise scripts/gpu_memory_bench.sh: per run, the median step time after the first, the
peak GPU memory of the worst rank (device-level: allocator peak plus context and NCCL), the
node's host memory (sum of the ranks' PSS), the placement used, and for FP8 the relative error of
the latents against the plain bf16 run of the same size; a table and JSON lines."""

from __future__ import annotations

import json
import statistics
from datetime import date
from pathlib import Path

from gpu_summary_util import append_measured, latents_rel_err, one, parse_args

REFERENCE = {"720x1280": "plain", "544x960": "plain_544"}


def _row(name: str, runs: Path, kind: str) -> dict:
    record_path = one(runs / name, "*.json")
    if record_path is None:
        return {"run": name, "status": "failed (see its log)"}
    rec = json.loads(record_path.read_text())
    peaks = rec["peak_memory_per_rank"]
    mem, topo = rec.get("memory", {}), rec["topology"]
    size = "x".join(map(str, rec["size"]))
    row = {
        "kind": kind, "date": date.today().isoformat(), "device": rec["versions"].get("gpu", "?"),
        "gpus": topo["world_size"], "model": rec["model"]["preset"], "size": size, "frames": rec["frames"],
        "backend": "native", "ulysses": topo["ulysses"], "ring": topo["ring"], "run": name,
        # The first step builds kernel plans (cuDNN, NCCL): the median is over the later ones.
        "seconds": statistics.median(rec["step_s"][1:] or rec["step_s"]), "step_s": rec["step_s"],
        "peak_gib": max(p.get("gpu_device_peak_gib", 0.0) for p in peaks),
        "allocated_gib": max(p.get("gpu_allocated_gib", 0.0) for p in peaks),
        "host_pss_gib": sum(p.get("host_pss_gib", 0.0) for p in peaks),
        "placement": (mem.get("used") or {}).get("label"), "budget_gib": mem.get("budget_gib"),
        "estimate_gib": (mem.get("used") or {}).get("peak_bytes", 0) / 2**30,
        "fallback_after_oom": mem.get("fallback_after_oom"), "host_store": mem.get("host_store"),
        "timings_s": rec["timings_s"], "command": rec["command"],
    }
    ref = REFERENCE.get(size)
    lat, ref_lat = one(runs / name, "*.latents.safetensors"), one(runs / ref, "*.latents.safetensors") if ref else None
    if lat is not None and ref_lat is not None and ref != name:
        row["rel_err_vs_bf16"] = latents_rel_err(lat, ref_lat)
    return row


def main() -> None:
    args = parse_args(__doc__)
    rows = [_row(d.name, args.runs, args.kind) for d in sorted(args.runs.iterdir()) if d.is_dir()]
    append_measured(rows, args.jsonl)
    base = {r["size"]: r["seconds"] for r in rows if r.get("run") in REFERENCE.values() and "seconds" in r}
    print("| run | size | placement | s/step | vs plain | peak GiB (worst rank) | estimate GiB | host PSS GiB (node) | rel err vs bf16 | OOM fallback |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "seconds" not in r:
            print(f"| {r['run']} | {r['status']} |")
            continue
        ratio = f"{r['seconds'] / base[r['size']]:.3f}" if r["size"] in base else "-"
        err = f"{r['rel_err_vs_bf16']:.2e}" if "rel_err_vs_bf16" in r else "-"
        print(f"| {r['run']} | {r['size']}x{r['frames']} | {r['placement']} | {r['seconds']:.3f} | {ratio} | "
              f"{r['peak_gib']:.2f} | {r['estimate_gib']:.2f} | {r['host_pss_gib']:.1f} | {err} | "
              f"{'yes' if r['fallback_after_oom'] else 'no'} |")


if __name__ == "__main__":
    main()
