#!/usr/bin/env python3
"""Peak memory and time of the HunyuanVideo VAE decode, tiled vs untiled, at a few latent sizes.

Each case runs in its own subprocess so that peaks do not leak between cases: on CUDA the peak is
`torch.cuda.max_memory_allocated` above what was allocated before the decode; on the CPU it is the
process's resident high-water mark (VmHWM, reset just before the decode through
/proc/self/clear_refs where the kernel allows) above the RSS at that moment.
Weights are random (the structure, not the trained values, sets memory and time), so the
"max|d|" column (tiled vs untiled, with --compare) measures seams of a random network, not quality.

    python scripts/bench_vae_memory.py --preset tiny --device cpu --out bench_cpu.json
    python scripts/bench_vae_memory.py --preset hunyuan-video --device cuda \\
        --sizes 9x32x32,33x68x120,33x90x160 --tilings none,release,small --out bench_gpu.json

Sizes are latent T x h x w (video frames 4T-3, pixels 8h x 8w). Tilings: none, release, small, or
"S/s,T/t" = spatial tile/stride, temporal tile/stride in latents (e.g. "8/6,4/3").
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SIZES = {"cpu": "5x8x8,9x12x12", "cuda": "9x32x32,33x68x120,33x90x160"}
DEFAULT_TILINGS = {"cpu": "none,8/6,4/3,4/3,2/1", "cuda": "none,release,small"}


def parse_tiling(name: str):
    from models.hunyuan_video.vae_tiling import TILING_PRESETS, TilingConfig

    if name == "none":
        return None
    if name in TILING_PRESETS:
        return TILING_PRESETS[name]
    try:
        (st, ss), (tt, ts) = (map(int, part.split("/")) for part in name.split(","))
    except ValueError:
        raise SystemExit(
            f"tiling {name!r}: expected none, {', '.join(TILING_PRESETS)} or 'S/s,T/t'"
        ) from None
    return TilingConfig(spatial_tile=st, spatial_stride=ss, temporal_tile=tt, temporal_stride=ts)


def split_tilings(spec: str) -> list[str]:
    """'none,8/6,4/3,release' -> ['none', '8/6,4/3', 'release'] (custom specs hold one comma)."""
    parts, out = spec.split(","), []
    while parts:
        head = parts.pop(0)
        out.append(f"{head},{parts.pop(0)}" if "/" in head and parts else head)
    return out


def proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; both come from one set of counters."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_bytes() -> int:
    """The process's peak RSS so far. The kernel folds per-thread RSS counts into VmHWM lazily, so VmHWM
    can read below the current VmRSS for a while; the peak is at least what is resident now."""
    return max(proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS"))


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0), so the peak covers the decode alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(case: dict):
    import torch

    from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE

    torch.manual_seed(0)
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    with device:
        vae = HunyuanVideoVAE(VAE_PRESETS[case["preset"]]).to(dtype).eval().requires_grad_(False)
    t, h, w = case["size"]
    z = torch.randn(1, vae.config.latent_channels, t, h, w, device=device, dtype=dtype)
    return vae, z


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: dict) -> dict:
    """Child process body: decode once to warm up kernels on a small input, then time and measure."""
    import torch

    vae, z = build(case)
    tiling, device = parse_tiling(case["tiling"]), case["device"]
    vae.decode(z[:, :, :2, :8, :8], tiling=tiling)  # warm-up: kernels, cuDNN plans, allocator
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_reset = reset_peak_rss()
        base = proc_status_bytes("VmRSS")
    times, peak = [], base
    for _ in range(case["repeat"]):
        start = time.perf_counter()
        video = vae.decode(z, tiling=tiling, clamp=False)
        sync(device)
        times.append(time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated() if device == "cuda" else cpu_peak_bytes())
        del video
    result = {"status": "ok", "time_s": min(times), "times_s": times, "peak_bytes": peak - base}
    if device == "cuda":
        result["peak_total_bytes"] = peak
    else:
        result["rss_peak_reset"] = peak_reset  # False: the peak may predate the decode (model build)
    if case.get("compare") and tiling is not None:
        tiled = vae.decode(z, tiling=tiling, clamp=False).float()
        diff = tiled - vae.decode(z, clamp=False).float()
        result |= {"max_abs_diff": diff.abs().max().item(), "rel_err": (diff.norm() / tiled.norm()).item()}
    return result


def child_main(spec: str) -> None:
    import torch

    case = json.loads(spec)
    try:
        result = run_case(case)
    except torch.OutOfMemoryError:
        result = {"status": "oom"}
    except RuntimeError as err:  # e.g. a kernel refusing a tensor this large
        result = {"status": f"error: {str(err).splitlines()[0][:160]}"}
    print("RESULT " + json.dumps(result), flush=True)


def spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"status": f"crashed: {tail[0][:160]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def fmt_row(case: dict, res: dict) -> str:
    t, h, w = case["size"]
    size = f"{t}x{h}x{w} -> {4 * t - 3}x{8 * h}x{8 * w}"
    mib = f"{res['peak_bytes'] / 2**20:10.0f}" if "peak_bytes" in res else f"{'-':>10}"
    secs = f"{res['time_s']:8.2f}" if "time_s" in res else f"{'-':>8}"
    diff = f"{res['max_abs_diff']:9.3g}" if "max_abs_diff" in res else f"{'-':>9}"
    return f"{size:<28} {case['tiling']:<10} {secs} {mib} {diff}  {res['status']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="VAE preset: tiny or hunyuan-video")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", default=None, help="float32 / float16 / bfloat16 (default: cpu float32, cuda float16)"
    )
    p.add_argument("--sizes", default=None, help="latent sizes TxHxW, comma-separated")
    p.add_argument("--tilings", default=None, help="none, release, small or 'S/s,T/t', comma-separated")
    p.add_argument("--repeat", type=int, default=1, help="timed decodes per case (the minimum is reported)")
    p.add_argument(
        "--compare", action="store_true", help="also report max|tiled - untiled| (decodes untiled too)"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per case")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args.child)

    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    sizes = [
        tuple(int(n) for n in s.split("x")) for s in (args.sizes or DEFAULT_SIZES[args.device]).split(",")
    ]
    tilings = split_tilings(args.tilings or DEFAULT_TILINGS[args.device])
    for name in tilings:
        parse_tiling(name)  # fail before any child starts
    unit = "GPU peak above base" if args.device == "cuda" else "RSS peak above base"
    print(f"VAE decode, preset {args.preset}, {args.device} {dtype}, random weights; memory = {unit} (MiB)")
    print(f"{'latent -> video':<28} {'tiling':<10} {'time s':>8} {'peak MiB':>10} {'max|d|':>9}  status")
    rows = []
    for size in sizes:
        for tiling in tilings:
            case = {
                "preset": args.preset,
                "device": args.device,
                "dtype": dtype,
                "size": size,
                "tiling": tiling,
                "repeat": args.repeat,
                "compare": args.compare,
            }
            res = spawn(case, args.timeout)
            print(fmt_row(case, res), flush=True)
            rows.append({**case, **res})
    if args.out:
        meta = {"argv": sys.argv, "python": platform.python_version(), "host": platform.node()}
        meta |= device_info(args.device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {args.out}")


def device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


if __name__ == "__main__":
    main()
