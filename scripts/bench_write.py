#!/usr/bin/env python3
"""Time writing one video as `generate` writes it: the mp4 (`launcher.video.write_video`) and the
frame grid, from a synthetic float video `[3, F, H, W]` in [-1, 1] (a moving pattern with a little
grain, so that the encoder works about as hard as on a real clip; pure noise would be far slower).

    python scripts/bench_write.py --out bench_write.json                 # 544x960x129, fp16, CPU
    python scripts/bench_write.py --device cuda --size 720x1280 --out w.json

``--device`` is where the video sits when the writer gets it (the VAE's output device), ``--dtype``
its dtype (fp16: the HunyuanVideo VAE's on a GPU). Prints a table; ``--out`` gets the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_video(frames: int, height: int, width: int, dtype, device):
    """`[3, F, H, W]` in [-1, 1]: diagonal colour bands drifting 4 px a frame, a bright square
    crossing the frame, and grain of amplitude 0.02 (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(height).view(1, height, 1)
    x = torch.arange(width).view(1, 1, width)
    t = torch.arange(frames).view(frames, 1, 1)
    phase = (x + y + 4 * t).float() / 64
    bands = torch.stack([phase.sin(), (phase * 1.3 + 1).sin(), (phase * 0.7 + 2).cos()]) * 0.6
    side = max(8, height // 6)
    for f in range(frames):
        left = (f * 7) % max(1, width - side)
        bands[:, f, height // 3 : height // 3 + side, left : left + side] = 0.95
    grain = torch.rand(bands.shape, generator=gen) * 0.04 - 0.02
    return (bands + grain).clamp_(-1, 1).to(device=device, dtype=dtype)


def time_write(video, folder: Path, fps: int) -> dict:
    """Seconds of the mp4 and of the grid, each into a fresh file."""
    from launcher.video import probe_video, write_frame_grid, write_video

    start = time.perf_counter()
    mp4 = write_video(video, folder / "bench.mp4", fps=fps, overwrite=True)
    mp4_s = time.perf_counter() - start
    start = time.perf_counter()
    write_frame_grid(video, folder / "bench.png", overwrite=True)
    grid_s = time.perf_counter() - start
    info = probe_video(mp4)
    return {"mp4_s": mp4_s, "grid_s": grid_s, "mp4_bytes": mp4.stat().st_size, "frames_read_back": info["frames"]}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="544x960", help="HxW in pixels")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="where the video sits when it is written")
    p.add_argument("--repeat", type=int, default=2, help="timed writes (the best is reported)")
    p.add_argument("--label", default="", help="a name for this run in the table and JSON (e.g. before/after)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    height, width = (int(n) for n in args.size.split("x"))
    video = synthetic_video(args.frames, height, width, getattr(torch, args.dtype), torch.device(args.device))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_write_") as tmp:
        for _ in range(args.repeat):
            runs.append(time_write(video, Path(tmp), args.fps))
    best = min(runs, key=lambda r: r["mp4_s"])
    row = {"label": args.label, "size": f"{height}x{width}", "frames": args.frames, "dtype": args.dtype,
           "device": args.device, "mp4_s": best["mp4_s"], "grid_s": min(r["grid_s"] for r in runs),
           "mp4_s_all": [r["mp4_s"] for r in runs], "mp4_mib": best["mp4_bytes"] / 2**20,
           "frames_read_back": best["frames_read_back"], "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "host": platform.node()}
    print(f"{'label':<10} {'video':<16} {'dtype':<9} {'device':<7} {'mp4 s':>7} {'grid s':>7} {'MiB':>6}")
    print(f"{row['label']:<10} {row['size'] + 'x' + str(row['frames']):<16} {row['dtype']:<9} {row['device']:<7} "
          f"{row['mp4_s']:7.2f} {row['grid_s']:7.2f} {row['mp4_mib']:6.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "rows": [row]}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
