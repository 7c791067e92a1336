#!/usr/bin/env python
"""Each injected fault (`LAUNCHER_FAULT`, launcher/faults.py) on one rank of a torchrun job: how
long the job takes to end, its exit code, what it left on disk and whether any process stayed.

    python scripts/fault_matrix.py --out outputs/faults                       # CPU, gloo, tiny preset
    python scripts/fault_matrix.py --out $OUT --device cuda --nproc 2 \\
        --preset hunyuan-video-2block --size 720x1280 --frames 129 --steps 4   # NCCL on 2 GPUs

Rows go to OUT/fault_matrix.jsonl; the table printed last is what docs/RELIABILITY.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("exit", "raise", "oom", "hang")


def strays(marker: str) -> int:
    """Processes still alive whose command line holds ``marker``."""
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                count += marker.encode() in (proc / "cmdline").read_bytes()
            except OSError:
                continue
    return count


def run_one(args, fault: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "launcher", "generate", "--preset", args.preset, "--prompt", "a red fox", "--seed", "1",
           "--steps", str(args.steps), "--device", args.device, "--timeout", str(args.timeout),
           "--output-dir", str(out), *(["--random-weights"] if args.random_weights else []),
           *(["--size", args.size] if args.size else []), *(["--frames", str(args.frames)] if args.frames else [])]
    env = {**os.environ, "LAUNCHER_FAULT": fault, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.timeout + 300)
    took = time.monotonic() - start
    fired = next((line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if f"LAUNCHER_FAULT {fault}" in line), "")
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    return {"fault": fault, "ranks": args.nproc, "device": args.device, "preset": args.preset, "exit_code": proc.returncode,
            "seconds_to_exit": round(took, 1), "fired": bool(fired), "error": errors[0] if errors else None,
            "files_left": left, "stray_processes": strays(str(out)), "timeout_s": args.timeout,
            "stderr_tail": proc.stderr[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "faults")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size")
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--step", type=int, default=2, help="the step at which the fault fires")
    p.add_argument("--rank", type=int, default=1, help="the rank it fires on")
    p.add_argument("--timeout", type=float, default=30.0, help="the job's collective timeout (what a hang waits)")
    p.add_argument("--random-weights", action="store_true", help="for a released preset")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in KINDS:
        fault = f"{args.rank}:{args.step}:{kind}"
        row = run_one(args, fault, args.out / f"run-{kind}")
        rows.append(row)
        with open(args.out / "fault_matrix.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"| fault | ranks | device | exit code | time to exit | left on disk | stray processes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        left = ", ".join(r["files_left"]) or "nothing"
        print(f"| `{r['fault']}` | {r['ranks']} | {r['device']} | {r['exit_code']} | {r['seconds_to_exit']:.1f} s | "
              f"{left} | {r['stray_processes']} |")
    return 0 if all(r["exit_code"] != 0 and r["fired"] and not r["files_left"] and not r["stray_processes"]
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
