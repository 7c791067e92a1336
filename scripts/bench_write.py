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


def synthetic_video(frames: int, height: int, width: int, content: str, dtype, device):
    """`[3, F, H, W]` in [-1, 1], seeded. "pattern": colour bands drifting 4 px a frame, a bright
    square crossing the frame and a little grain (an easy clip); "noise": noise smoothed over 4 px
    in space and time, about what a VAE with random weights decodes (what the GPU benchmarks
    write; the encoder's hardest case)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    if content == "noise":
        coarse = torch.rand(1, 3, frames // 4 + 2, height // 4, width // 4, generator=gen) * 2 - 1
        video = F.interpolate(coarse, size=(frames, height, width), mode="trilinear")[0]
        return video.to(device=device, dtype=dtype)
    y, x = torch.arange(height).view(1, height, 1), torch.arange(width).view(1, 1, width)
    phase = (x + y + 4 * torch.arange(frames).view(frames, 1, 1)).float() / 64
    video = torch.stack([phase.sin(), (phase * 1.3 + 1).sin(), (phase * 0.7 + 2).cos()]) * 0.6
    side = max(8, height // 6)
    for f in range(frames):
        left = (f * 7) % max(1, width - side)
        video[:, f, height // 3 : height // 3 + side, left : left + side] = 0.95
    video += torch.rand(video.shape, generator=gen) * 0.04 - 0.02
    return video.clamp_(-1, 1).to(device=device, dtype=dtype)


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="544x960", help="HxW in pixels")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="where the video sits when it is written")
    p.add_argument("--repeat", type=int, default=2, help="timed writes (the best is reported)")
    p.add_argument("--content", default="noise,pattern", help="noise, pattern or both (comma-separated)")
    p.add_argument("--label", default="", help="a name for this run in the table and JSON (e.g. before/after)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    height, width = (int(n) for n in args.size.split("x"))
    rows = [bench(args, content, height, width) for content in args.content.split(",")]
    print(f"{'label':<10} {'content':<8} {'video':<14} {'dtype':<9} {'device':<7} {'mp4 s':>7} {'grid s':>7} {'MiB':>6}")
    for row in rows:
        print(f"{row['label']:<10} {row['content']:<8} {row['size'] + 'x' + str(row['frames']):<14} {row['dtype']:<9} "
              f"{row['device']:<7} {row['mp4_s']:7.2f} {row['grid_s']:7.2f} {row['mp4_mib']:6.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


def bench(args, content: str, height: int, width: int) -> dict:
    """One content's best of ``--repeat`` writes, as a row."""
    import torch

    video = synthetic_video(args.frames, height, width, content, getattr(torch, args.dtype), torch.device(args.device))
    with tempfile.TemporaryDirectory(prefix="bench_write_") as tmp:
        runs = [time_write(video, Path(tmp), args.fps) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["mp4_s"])
    return {"label": args.label, "content": content, "size": f"{height}x{width}", "frames": args.frames,
            "dtype": args.dtype, "device": args.device, "mp4_s": best["mp4_s"],
            "grid_s": min(r["grid_s"] for r in runs), "mp4_s_all": [r["mp4_s"] for r in runs],
            "mp4_mib": best["mp4_bytes"] / 2**20, "frames_read_back": best["frames_read_back"],
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "host": platform.node()}


if __name__ == "__main__":
    main()
