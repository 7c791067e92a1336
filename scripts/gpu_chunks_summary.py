"""Summarise scripts/gpu_ulysses_chunks.sh: per run, the median step time after the first, the
speedup of each chunk count against one chunk, the parallel efficiency against the 1-GPU run of
the same size, and the latents' relative error against the one-chunk run; a table and JSON lines."""

from __future__ import annotations

from pathlib import Path

from gpu_summary_util import append_measured, latents_rel_err, one, parse_args, record_row


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
            lat, ref_lat = one(args.runs / r["run"], "*.latents.safetensors"), one(args.runs / ref["run"], "*.latents.safetensors")
            if lat is not None and ref_lat is not None:
                r["rel_err_vs_one_chunk"] = latents_rel_err(lat, ref_lat)
    append_measured(rows, args.jsonl)
    print("| run | size | GPUs | head chunks | s/step | vs 1 chunk | efficiency | peak GiB | latents rel err vs 1 chunk |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "seconds" not in r:
            print(f"| {r['run']} | {r['status']} |")
            continue
        fmt = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        print(f"| {r['run']} | {r['size']}x{r['frames']} | {r['gpus']} | {r['head_chunks'] or '-'} | {r['seconds']:.3f} | "
              f"{fmt('vs_one_chunk', '.3f')} | {fmt('efficiency', '.1%')} | {r['peak_gib']:.1f} | {fmt('rel_err_vs_one_chunk', '.2e')} |")


if __name__ == "__main__":
    main()
