#!/usr/bin/env python3
"""Eager against compiled DiT blocks (`generate --compile`) on one GPU: the 13B HunyuanVideo
block shapes (hunyuan-video-2block: the release's width and heads, 1 double- + 1 single-stream
block; random weights, bf16), at 29,700 image tokens (720x1280x129 on 4 GPUs) and 118,800 (on 1).

    python3 scripts/gpu_compile_bench.py --out $OUT          # or: bash scripts/gpu_compile_bench.sh KIND
    python3 scripts/gpu_compile_bench.py --smoke --out /tmp  # tiny preset on the CPU: checks the script

Each block is called as the DiT calls it: the image-token shard, 256 text tokens, the RoPE rows of
the first S tokens of the 720x1280x129 grid, and the attention a one-GPU `generate` runs
(``parallel.parallelize``: the native attention, cuDNN on Hopper). Per token count and block: the
median seconds of --iters calls after --warmup (CUDA synchronised around each), eager first, then
compiled by ``models.compile.compile_dit`` (inductor, a fresh cache folder unless --cache-dir: the
first call is a cold compile), with the first compiled call's seconds, the relative difference of
the outputs and the peak memory. A 13B step is estimated as 20 double + 40 single block calls.

Results: ``compile_bench.json`` in --out (rows and the table), the table printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import models  # noqa: E402
from models.compile import compile_dit, use_cache_dir  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402

GRID_720P = (33, 45, 80)  # 720x1280x129: 118,800 image tokens
DEPTH_13B = {"double": 20, "single": 40}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="29700,118800", help="image tokens per call, comma-separated")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, help="inductor's cache folder (default: a fresh one: cold compiles)")
    p.add_argument("--out", type=Path, required=True, help="folder for compile_bench.json")
    p.add_argument("--smoke", action="store_true", help="tiny preset, few tokens, fp32, on the CPU")
    return p.parse_args()


class Bench:
    """The device, the 2-block DiT with its attention, and the timing helpers (no globals)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if not args.smoke and not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible (use --smoke to check the script on the CPU)")
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.preset = "tiny" if args.smoke else "hunyuan-video-2block"
        self.model = models.build_model(self.preset, device=self.device, dtype=self.dtype, seed=0)
        self.blocks = {"double": self.model.double_blocks[0], "single": self.model.single_blocks[0]}
        # The attention a one-GPU generate runs (native; on the CPU the model's own SDPA).
        self.shard = parallelize(self.model, None, num_tokens=1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inputs(self, tokens: int) -> tuple:
        """A block's arguments but the attention: img `[1, S, C]`, txt `[1, L, C]`, vec `[1, C]`,
        RoPE cos/sin `[S, D]` (the first S rows of the 720p grid), txt_lens `[1]` (on the host)."""
        cfg, g = self.model.config, torch.Generator().manual_seed(tokens)
        if self.shard.native is not None:
            self.shard.native.set_valid_tokens(tokens)
        grid = GRID_720P if not self.args.smoke else (3, 8, 12)
        cos, sin = (t[:tokens].to(self.device) for t in self.model.rope(grid))
        text = self.args.text_tokens if not self.args.smoke else 16

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(self.device, self.dtype)

        return rand(1, tokens, cfg.hidden_size), rand(1, text, cfg.hidden_size), rand(1, cfg.hidden_size), cos, sin, \
            torch.tensor([text * 3 // 4])

    def call(self, block, args):
        return block(*args[:6], self.model.attention, chunk=None)

    def timed(self, fn) -> tuple[float, float, object]:
        """(seconds of the first call, median seconds of --iters calls after --warmup, last result)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(self.args.warmup):
            fn()
        times = []
        for _ in range(self.args.iters):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return first, statistics.median(times), out

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def measure(bench: Bench, counts: list[int], mode: str) -> dict:
    """{(tokens, block): {first_s, seconds, peak_gib, out}} for every token count and block."""
    out = {}
    with torch.inference_mode():
        for tokens in counts:
            args = bench.inputs(tokens)
            for name, block in bench.blocks.items():
                bench.reset_peak()
                first, secs, result = bench.timed(lambda: bench.call(block, args))
                out[tokens, name] = {"first_s": first, "seconds": secs, "peak_gib": bench.peak_gib(),
                                     "out": tuple(t.cpu() for t in result)}
                print(f"{mode:8s} {tokens:>7,} tokens  {name:6s}  {secs * 1e3:9.2f} ms  (first call {first:.2f} s)",
                      flush=True)
    return out


def rows_of(eager: dict, compiled: dict, counts: list[int]) -> list[dict]:
    rows = []
    for tokens in counts:
        for name in ("double", "single"):
            e, c = eager[tokens, name], compiled[tokens, name]
            rows.append({"tokens": tokens, "block": name, "eager_s": e["seconds"], "compiled_s": c["seconds"],
                         "speedup": e["seconds"] / c["seconds"], "first_compiled_call_s": c["first_s"],
                         "rel_err": max(rel(a, b) for a, b in zip(c["out"], e["out"])),
                         "eager_peak_gib": e["peak_gib"], "compiled_peak_gib": c["peak_gib"]})
    return rows


def step_rows(rows: list[dict]) -> list[dict]:
    """The 13B step's block time (20 double + 40 single calls), eager and compiled, per token count."""
    out = []
    for tokens in sorted({r["tokens"] for r in rows}):
        mine = {r["block"]: r for r in rows if r["tokens"] == tokens}
        eager = sum(DEPTH_13B[b] * mine[b]["eager_s"] for b in DEPTH_13B)
        compiled = sum(DEPTH_13B[b] * mine[b]["compiled_s"] for b in DEPTH_13B)
        out.append({"tokens": tokens, "eager_step_s": eager, "compiled_step_s": compiled,
                    "change": compiled / eager - 1, "compile_s": sum(mine[b]["first_compiled_call_s"] for b in mine)})
    return out


def table(rows: list[dict], steps: list[dict]) -> str:
    lines = ["| tokens | block | eager ms | compiled ms | speedup | first compiled call s | rel err |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['block']} | {r['eager_s'] * 1e3:.2f} | {r['compiled_s'] * 1e3:.2f} | "
                     f"{r['speedup']:.3f} | {r['first_compiled_call_s']:.1f} | {r['rel_err']:.1e} |")
    lines += ["", "| tokens | 13B step, blocks eager s | compiled s | change | compiling s |", "|---:|---:|---:|---:|---:|"]
    for s in steps:
        lines.append(f"| {s['tokens']:,} | {s['eager_step_s']:.3f} | {s['compiled_step_s']:.3f} | "
                     f"{s['change'] * 100:+.1f}% | {s['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    counts = [72] if args.smoke else [int(t) for t in args.tokens.split(",")]
    use_cache_dir(args.cache_dir or Path(tempfile.mkdtemp(prefix="inductor-cache-")))
    bench = Bench(args)
    device = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"
    print(f"device: {device}; torch {torch.__version__}; preset {bench.preset}, {bench.dtype}", flush=True)
    eager = measure(bench, counts, "eager")
    report = compile_dit(bench.model, list(bench.blocks.items()))
    compiled = measure(bench, counts, "compiled")
    rows = rows_of(eager, compiled, counts)
    steps = step_rows(rows)
    text = table(rows, steps)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "torch": torch.__version__, "preset": bench.preset, "dtype": str(bench.dtype),
              "command": "python3 scripts/gpu_compile_bench.py " + " ".join(sys.argv[1:]),
              "compile": report.finish([0.0]), "rows": rows, "step": steps, "table": text}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
