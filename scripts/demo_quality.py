#!/usr/bin/env python
"""What each approximation and each parallel layout does to the demo model's videos.

Generates the same prompts and seeds once exactly (one process, fp32) and once per variant
(bf16, FP8 storage, FP8 matmul, every Ulysses x Ring factorisation of 2 and 4 ranks), then reports
PSNR against the exact run (`launcher quality`) and the grammar check (`scripts/demo_check.py`).
Rows go to OUT/demo_quality.json; the table printed last is what docs/BENCHMARKS.md shows.

    python scripts/demo_quality.py --out outputs/demo-quality [--device cpu] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.quality import compare, json_safe, summary  # noqa: E402
from models.demo import grammar  # noqa: E402

# (name, ranks, generate arguments)
VARIANTS = [
    ("bf16", 1, ["--dtype", "bf16"]),
    ("fp8 storage", 1, ["--fp8", "storage"]),
    ("fp8 matmul", 1, ["--fp8", "matmul"]),
    ("ulysses 2", 2, ["--ulysses", "2", "--ring", "1"]),
    ("ring 2", 2, ["--ulysses", "1", "--ring", "2"]),
    ("ulysses 4", 4, ["--ulysses", "4", "--ring", "1"]),
    ("ulysses 2 x ring 2", 4, ["--ulysses", "2", "--ring", "2"]),
    ("ring 4", 4, ["--ulysses", "1", "--ring", "4"]),
    # Step caches at their defaults and more eager, and one under sequence parallel.
    ("teacache 0.1", 1, ["--cache", "teacache"]),
    ("teacache 0.2", 1, ["--cache", "teacache", "--cache-threshold", "0.2"]),
    ("fbcache 0.06", 1, ["--cache", "fbcache"]),
    ("fbcache 0.12", 1, ["--cache", "fbcache", "--cache-threshold", "0.12"]),
    ("teacache 0.1 on ulysses 2 x ring 2", 4, ["--cache", "teacache", "--ulysses", "2", "--ring", "2"]),
]


def generate(out: Path, prompts: Path, device: str, ranks: int, extra: list[str]) -> None:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    cmd = [*head, "-m", "launcher", "generate", "--preset", "hunyuan-video-demo", "--device", device,
           "--prompts-file", str(prompts), "--seed", "0", "--output-dir", str(out), "--overwrite", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def grammar_accuracy(run: Path) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_check import accuracy, check_run

    return accuracy(check_run(run))


def skipped_steps(run: Path) -> float | None:
    """The mean number of steps the step cache skipped per video, None without a cache."""
    caches = [json.loads(r.read_text()).get("step_cache") for r in sorted(run.glob("*.json"))]
    counts = [len(c["skipped_steps"]) for c in caches if c]
    return sum(counts) / len(counts) if counts else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo-quality")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=10, help="the first N check prompts (held-out first)")
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("".join(c.text + "\n" for c in grammar.check_prompts(20)[: args.prompts]))
    exact = args.out / "exact"
    exact_args = ["--dtype", "fp32"]
    generate(exact, prompts, args.device, 1, exact_args)
    rows = [{"variant": "exact (1 process, fp32)", "ranks": 1, "psnr_db_mean": None, "psnr_db_min": None,
             **{f"grammar_{k}": v for k, v in grammar_accuracy(exact).items() if k in ("colour", "motion")}}]
    wanted = None if args.only is None else set(args.only.split(","))
    for name, ranks, extra in VARIANTS:
        if wanted is not None and name not in wanted:
            continue
        run = args.out / name.replace(" ", "_")
        generate(run, prompts, args.device, ranks, extra if "--dtype" in extra else [*extra, *exact_args])
        s = summary(compare(run, exact))
        acc = grammar_accuracy(run)
        rows.append({"variant": name, "ranks": ranks, "psnr_db_mean": s["psnr_db_mean"], "psnr_db_min": s["psnr_db_min"],
                     "identical": s["identical"], "grammar_colour": acc["colour"], "grammar_motion": acc["motion"],
                     "skipped_steps_mean": skipped_steps(run)})
        print(json.dumps(rows[-1]), flush=True)
    clean = [json_safe(r) for r in rows]
    (args.out / "demo_quality.json").write_text(json.dumps({"device": args.device, "prompts": args.prompts,
                                                           "rows": clean}, indent=2) + "\n")
    fmt = lambda x: "-" if x is None else ("identical" if x == float("inf") else f"{x:.1f}")  # noqa: E731
    print(f"\n| variant | ranks | PSNR mean (dB) | PSNR min (dB) | colour ok | motion ok | steps skipped |   "
          f"({args.prompts} prompts, {args.device})\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ranks']} | {fmt(r['psnr_db_mean'])} | {fmt(r['psnr_db_min'])} | "
              f"{r['grammar_colour']:.0%} | {r['grammar_motion']:.0%} | {fmt(r.get('skipped_steps_mean'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
