#!/usr/bin/env python3
"""Time the HunyuanVideo VAE decode (release config, random weights, fp16, the release's tiles) on
one GPU and shared over every GPU of the job, and check that both give the same frames.

    torchrun --standalone --nproc_per_node=N scripts/gpu_vae_decode.py --sizes 720x1280x129,544x960x129 \\
        --jsonl $OUT/vae_decode.jsonl --kind nvidia-h200-x2

For each size: the one-GPU tiled decode on rank 0 (the others wait), then the shared decode
(``parallel.vae_decode.run_tiled``) on all ranks; both end with the video on the host, as
`generate` has it. Each is preceded by a decode of a small latent (kernels, cuDNN plans). Rows
go to --jsonl (the fields of docs/benchmarks/vae.jsonl), the table to stdout on rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import models  # noqa: E402
from launcher.video import frame_uint8  # noqa: E402
from parallel.mesh import build_parallel_mesh, init_distributed, teardown  # noqa: E402
from parallel.topology import Topology  # noqa: E402
from parallel.vae_decode import run_tiled  # noqa: E402

PRESET = "hunyuan-video-13b"  # its VAE: the release's config


def timed(fn) -> tuple[object, float, float]:
    """(result, seconds, peak GiB above the start; 0 on the CPU) of ``fn()`` on this device."""
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0


def max_frame_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference of the uint8 frames `generate` writes, frame by frame."""
    return max(int((torch.from_numpy(frame_uint8(a, i)).int() - torch.from_numpy(frame_uint8(b, i)).int())
                   .abs().max()) for i in range(a.shape[1]))


def one_size(size: str, family, vae, mesh, tiling: str) -> list[dict]:
    height, width, frames = (int(n) for n in size.split("x"))
    dit = family.presets[PRESET]
    latents = torch.randn(1, dit.in_channels, *dit.latent_grid(height, width, frames),
                          generator=torch.Generator().manual_seed(0))
    split = lambda z: family.vae.split_decode(vae, z, tiling)  # noqa: E731
    rows = []
    if mesh.rank == 0:
        split(latents[:, :, :2, :16, :16])()  # warm-up
        single, seconds, peak = timed(split(latents))
        rows.append({"gpus": 1, "seconds": seconds, "peak_gib": peak, "tiles_per_rank": [len(split(latents))]})
    mesh.barrier()
    run_tiled(split(latents[:, :, :2, :48, :48]), mesh)  # warm-up, shared
    run, seconds, peak = timed(lambda: run_tiled(split(latents), mesh))
    peaks = mesh.gather_objects(peak)
    if mesh.rank == 0:
        rows.append({"gpus": mesh.topology.world_size, "seconds": seconds, "peak_gib": max(peaks),
                     "tiles_per_rank": run.tiles_per_rank, "seconds_per_rank": run.seconds_per_rank,
                     "max_uint8_diff": max_frame_diff(run.result, single)})
        rows[0]["max_uint8_diff"] = 0
    return [{"size": f"{height}x{width}", "frames": frames, **row} for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="720x1280x129,544x960x129", help="HxWxF, comma-separated")
    p.add_argument("--tiling", default="release")
    p.add_argument("--kind", default="unknown", help="the machine kind, for the rows")
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of this script (fp32)")
    args = p.parse_args()
    info = init_distributed(device_type=args.device, timeout=600)
    mesh = build_parallel_mesh(Topology(ulysses=info.world_size), device=info.device, timeout=600)
    try:
        family = models.get_family(PRESET)
        dtype = torch.float16 if args.device == "cuda" else torch.float32
        vae = family.vae.load(None, family.presets[PRESET], device=info.device, dtype=dtype)
        rows = [row for size in args.sizes.split(",") for row in one_size(size, family, vae, mesh, args.tiling)]
        if mesh.rank == 0:
            report(rows, args)
    finally:
        teardown()


def report(rows: list[dict], args) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"kind": args.kind, "date": datetime.date.today().isoformat(), "device": device,
            "model": "hunyuan-video-vae (release config, random weights)", "backend": f"vae-decode-{args.tiling}",
            "command": " ".join(["torchrun", f"--nproc_per_node={int(os.environ.get('WORLD_SIZE', 1))}", *sys.argv])}
    if args.jsonl:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with args.jsonl.open("a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row, "status": "ok"}) + "\n")
    print(f"HunyuanVideo VAE decode, {args.tiling} tiles, random weights, {meta['device']}")
    print(f"{'video':<16} {'GPUs':>4} {'seconds':>8} {'peak GiB':>9} {'max|d| u8':>9}  tiles per rank")
    for r in rows:
        print(f"{r['size'] + 'x' + str(r['frames']):<16} {r['gpus']:>4} {r['seconds']:8.2f} {r['peak_gib']:9.2f} "
              f"{r['max_uint8_diff']:>9}  {r['tiles_per_rank']}")


if __name__ == "__main__":
    main()
