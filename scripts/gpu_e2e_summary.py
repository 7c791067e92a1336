"""Summarise scripts/gpu_e2e_bench.sh: per run, the wall time from outside (launch to exit), its
parts (process start = the outside wall less the record's, then text, DiT load, denoise, VAE load
and decode, write), everything but the denoising loop, s/step, the step cache's computed and
skipped steps, the median skipped step against the exact run's median step, and the latents'
error against the exact run; JSON lines, then the table."""

from __future__ import annotations

import json
import statistics

from gpu_summary_util import append_measured, cell, parse_args, print_table, record_row, runs_rel_err

PHASES = ("text_encode", "load_dit", "denoise", "load_vae", "vae_decode", "write")


def _row(runs, name: str, kind: str) -> dict:
    row, rec = record_row(runs, name, kind, "gpu_device_peak_gib")
    wall_file = runs / f"{name}.wall.json"
    outside = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
    if rec is None:
        return row | {"status": f"failed (exit {outside.get('exit', '?')}; see its log)"}
    phases = {p: rec["timings_s"].get(p, 0.0) for p in PHASES}
    wall = outside.get("wall_s", rec["wall_s"])
    cache = rec.get("step_cache") or {}
    skipped = cache.get("skipped_steps", [])
    computed = cache.get("computed_steps", list(range(rec["steps"])))
    return row | {
        "wall_s": wall, "start_s": wall - rec["wall_s"], **{f"{p}_s": v for p, v in phases.items()},
        "not_denoise_s": wall - phases["denoise"], "cache": cache.get("kind", "off"),
        "threshold": cache.get("threshold"), "skipped": len(skipped), "computed": len(computed),
        "skipped_step_s": statistics.median(rec["step_s"][i] for i in skipped) if skipped else None,
        "vae_decode": rec.get("vae_decode"), "compile": rec.get("compile"),
        "rel_err_vs_exact": runs_rel_err(runs, name, "exact") if name != "exact" else None,
    }


def main() -> None:
    args = parse_args(__doc__)
    names = sorted(p.name for p in args.runs.iterdir() if p.is_dir())
    rows = [_row(args.runs, n, args.kind) for n in names]
    exact = next((r for r in rows if r["run"] == "exact" and "seconds" in r), None)
    for r in rows:  # a skipped step's cost, against the exact run's median step of this call
        if exact is not None and r.get("skipped_step_s") is not None:
            r["skipped_vs_computed"] = r["skipped_step_s"] / exact["seconds"]
    append_measured(rows, args.jsonl)
    header = ["run", "GPUs", "size", "steps", "wall s", "start s", "text s", "load s", "denoise s", "s/step",
              "decode s", "write s", "not denoise s", "cache", "computed/skipped", "skipped step / step",
              "rel err vs exact"]
    print_table(header, rows, lambda r: [
        r["run"], str(r["gpus"]), f"{r['size']}x{r['frames']}", str(r["steps"]), f"{r['wall_s']:.1f}",
        f"{r['start_s']:.1f}", f"{r['text_encode_s']:.1f}", f"{r['load_dit_s']:.1f}", f"{r['denoise_s']:.1f}",
        f"{r['seconds']:.3f}", f"{r['vae_decode_s']:.1f}", f"{r['write_s']:.1f}", f"{r['not_denoise_s']:.1f}",
        f"{r['cache']} {cell(r, 'threshold', 'g')}", f"{r['computed']}/{r['skipped']}",
        cell(r, "skipped_vs_computed", ".4f"), cell(r, "rel_err_vs_exact", ".2e")])


if __name__ == "__main__":
    main()
