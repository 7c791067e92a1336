"""FP8 weights on one GPU: error and speed of plain bf16, fp8 storage and fp8 matmul.

    python3 scripts/gpu_fp8_check.py                      # hunyuan-video-2block, 528x976x33
    python3 scripts/gpu_fp8_check.py --smoke              # tiny preset on CPU: checks the script

1. One DiT forward of the preset (random bf16 weights, seed 0; 528x976x33 -> 18,117 image tokens
   + 256 text tokens): an fp32 reference, then the same weights in bf16 (plain), quantised in
   place to fp8 "storage", then "matmul" (torch._scaled_mm, activations quantised per token by
   the compiled quantiser, and once more with the eager one). Relative error of the output against
   plain bf16 and against fp32; median seconds per forward after warm-up; peak memory.
2. The 13B block linears alone at --linear-tokens rows (default 29,700 = 720x1280x129 on 4 GPUs):
   bf16 F.linear, fp8 storage, fp8 matmul (compiled / eager activation quantiser) and the bare fp8
   GEMM (pre-quantised input), to show where the time goes.

Results: a table on stdout, JSON lines in ``$OUT/fp8.jsonl`` (or ``--jsonl``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from models import fp8  # noqa: E402

# (in, out) of the 13B blocks' linears: qkv, proj, fc1, fc2 (double); linear1, linear2 (single).
BLOCK_LINEARS = ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="hunyuan-video-2block")
    p.add_argument("--size", default="528x976", help="HxW in pixels")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--linear-tokens", type=int, default=29_700)
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny preset, tiny video, on CPU")
    return p.parse_args()


class Run:
    """Per-run state: device, output rows, common JSON fields (no globals)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        if self.device.type != "cuda" and not args.smoke:
            sys.exit("no CUDA GPU visible (use --smoke to check the script on CPU)")
        out = os.environ.get("OUT")
        self.jsonl = args.jsonl or (os.path.join(out, "fp8.jsonl") if out else None)
        self.base = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "gpus": 1, "ulysses": 1, "ring": 1,
            "command": "python3 scripts/gpu_fp8_check.py " + " ".join(sys.argv[1:]),
        }

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0

    def timed(self, fn, warmup: int, iters: int) -> tuple[float, object]:
        """Median seconds of `iters` calls after `warmup` calls, and the last result."""
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def emit(self, row: dict) -> None:
        row = {**self.base, **row}
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("date", "command", "device")), flush=True)
        if self.jsonl:
            os.makedirs(os.path.dirname(self.jsonl) or ".", exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def dit_inputs(model, run: Run):
    """Seeded inputs for one forward: tokens, RoPE rows, text (3/4 valid), timestep, guidance."""
    cfg, a = model.config, run.args
    h, w = (int(x) for x in a.size.split("x"))
    grid = cfg.token_grid(h, w, a.frames)
    g = torch.Generator().manual_seed(0)
    tokens = grid[0] * grid[1] * grid[2]
    cos, sin = model.rope(grid)
    valid = max(1, a.text_tokens * 3 // 4)
    mask = torch.zeros(1, a.text_tokens, dtype=torch.long)
    mask[:, :valid] = 1
    inp = dict(
        img=torch.randn(1, tokens, cfg.patch_dim_in, generator=g), rope_cos=cos, rope_sin=sin,
        txt=torch.randn(1, a.text_tokens, cfg.text_states_dim, generator=g), txt_mask=mask,
        timestep=torch.tensor([500.0]), pooled=torch.randn(1, cfg.pooled_dim, generator=g),
        guidance=torch.tensor([6000.0]),
    )
    return {k: v.to(run.device) for k, v in inp.items()}, tokens


def forward_rows(run: Run) -> None:
    a = run.args
    preset = "tiny" if a.smoke else a.preset
    model = models.build_model(preset, device=run.device, dtype=torch.float32, seed=0)
    inp, tokens = dit_inputs(model, run)
    common = {"kind": "fp8_forward", "model": preset, "size": a.size, "frames": a.frames, "tokens": tokens}
    with torch.inference_mode():
        ref = model(**inp).float()
        model.to(torch.bfloat16)
        plain = None
        for backend in ("bf16", "fp8-storage", "fp8-matmul", "fp8-matmul-eager-quant"):
            _prepare(model, backend)
            run.reset_peak()
            secs, out = run.timed(lambda: model(**inp), a.warmup, a.iters)
            plain = out if backend == "bf16" else plain
            run.emit({**common, "backend": backend, "seconds": secs, "peak_gib": run.peak_gib(),
                      "weight_gib": fp8.weight_bytes(model) / 2**30,
                      "rel_err": rel(out, plain), "rel_err_vs_fp32": rel(out, ref)})
    fp8.row_quantizer.enabled = True


def _prepare(model, backend: str) -> None:
    if backend == "fp8-storage":
        fp8.quantize_model(model, mode="storage")  # in place, module by module
    elif backend.startswith("fp8-matmul"):
        fp8.set_fp8_mode(model, "matmul")
        fp8.row_quantizer.enabled = backend == "fp8-matmul"


def linear_rows(run: Run) -> None:
    """The 13B block linears at M rows: where an fp8 GEMM gains, and what quantising costs."""
    a = run.args
    m = 64 if a.smoke else a.linear_tokens
    shapes = ((32, 48), (64, 32)) if a.smoke else BLOCK_LINEARS
    supported = fp8.scaled_mm_supported(run.device)
    for k, n in shapes:
        g = torch.Generator(device=run.device).manual_seed(k * n)
        lin = torch.nn.Linear(k, n, device=run.device, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=run.device, dtype=torch.bfloat16, generator=g)
        q = fp8.Float8Linear.from_linear(lin)
        variants = {"bf16": lambda: F.linear(x, lin.weight, lin.bias), "fp8-storage": lambda: q(x)}
        if supported:
            x8, sa = fp8.quantize_rows(x)
            sb = q.scale.reshape(1, -1)
            variants["fp8-matmul"] = lambda: q(x)
            variants["fp8-gemm-only"] = lambda: torch._scaled_mm(
                x8, q.weight.t(), scale_a=sa, scale_b=sb, bias=q.bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        with torch.inference_mode():
            ref = F.linear(x, lin.weight, lin.bias)
            for backend, fn in variants.items():
                q.mode = "matmul" if backend == "fp8-matmul" else "storage"
                secs, out = run.timed(fn, 3, 10)
                run.emit({"kind": "fp8_linear", "model": "hunyuan-video-13b block linear", "in": k, "out": n,
                          "tokens": m, "backend": backend, "seconds": secs,
                          "tflops": 2 * m * k * n / secs / 1e12, "rel_err": rel(out, ref)})


def main():
    args = parse_args()
    run = Run(args)
    print(f"device: {run.base['device']}; fp8 _scaled_mm supported: {fp8.scaled_mm_supported(run.device)}", flush=True)
    forward_rows(run)
    if not args.skip_linears:
        linear_rows(run)


if __name__ == "__main__":
    main()
