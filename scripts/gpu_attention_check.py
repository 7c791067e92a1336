"""Correctness and speed of the hybrid attention on GPUs, against yunchang, xfuser and the 1-GPU
floor, in one launch:

    python3 -m torch.distributed.run --nproc_per_node=4 scripts/gpu_attention_check.py --kind nvidia-h200-x4

1. correctness (bf16, small uneven shapes, padded text): every factorisation ulysses x ring of the
   world size against an fp32 single-process reference;
2. benchmark at HunyuanVideo 720x1280x129 (118,800 image + 256 text tokens, 24 heads x 128, bf16):
   the 1-GPU cuDNN SDPA floor, then per factorisation our attention, yunchang (its own torch_flash
   kernel, and with our cuDNN kernel plugged in) and xfuser (if importable). Error is measured on
   sampled rows against an fp32 reference; time is the median of CUDA-event-timed calls (the
   all-to-alls and ring passes included), max over ranks; memory is the peak over ranks.

Every helper that calls a collective runs on every rank. Results: a table on stdout, JSON lines in
``$OUT/attention.jsonl`` (or ``--jsonl``). ``--smoke`` runs tiny shapes on CPU/gloo to check the
script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.attention import HybridAttention  # noqa: E402
from parallel.kernels import KERNELS, math_attention, probe_kernel  # noqa: E402
from parallel.local import local_joint_attention  # noqa: E402
from parallel.mesh import build_parallel_mesh, init_distributed, teardown  # noqa: E402
from parallel.sequence import SequenceParallel, gather_tokens, shard_tokens  # noqa: E402
from parallel.topology import Topology, sp_factorisations  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="unknown", help="device kind, recorded in the JSON lines")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--backends", default="native,native-flash,yunchang,yunchang-cudnn,xfuser",
                   help="comma list of: native, native-cat (no text fusion), native-flash, yunchang, yunchang-cudnn, xfuser")
    p.add_argument("--factorisations", default=None, help="comma list of UxR (default: all valid)")
    p.add_argument("--profile", action="store_true", help="print the top device kernels of one call per config (rank 0)")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    return p.parse_args()


class Ctx:
    """Per-run state handed around (no globals)."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.info = init_distributed(timeout=120, device_type="cpu" if args.smoke else None)
        self.rank, self.world, self.dev = self.info.rank, self.info.world_size, self.info.device
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.meshes = {}
        self.rows = []
        out = os.environ.get("OUT")
        self.jsonl = args.jsonl or (os.path.join(out, "attention.jsonl") if out else None)
        self.command = f"python3 -m torch.distributed.run --nproc_per_node={self.world} scripts/gpu_attention_check.py " + " ".join(sys.argv[1:])

    def sp(self, u, r) -> SequenceParallel:
        if (u, r) not in self.meshes:
            self.meshes[(u, r)] = SequenceParallel.from_mesh(build_parallel_mesh(Topology(ring=r, ulysses=u)))
        return self.meshes[(u, r)]

    def emit(self, row):
        """Keep a result and append it to the JSON lines at once (a later crash loses nothing)."""
        from parallel.mesh import RING_MAX_CTAS

        row = {**row, "ring_max_ctas": int(os.environ.get("LAUNCHER_RING_MAX_CTAS", RING_MAX_CTAS))}
        self.rows.append(row)
        if self.rank == 0 and self.jsonl:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# measuring (every function here is called on every rank)
# ---------------------------------------------------------------------------------------------


def sync(ctx):
    if ctx.dev.type == "cuda":
        torch.cuda.synchronize()


def reduce_max(ctx, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=ctx.dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(ctx, fn) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after ``warmup``, max over ranks."""
    for _ in range(ctx.args.warmup):
        fn()
    sync(ctx)
    dist.barrier()
    times = []
    for _ in range(ctx.args.iters):
        if ctx.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return reduce_max(ctx, statistics.median(times))


def peak_gib(ctx, fn) -> float:
    """GiB one ``fn`` call allocates at its peak on top of what was already resident (inputs
    included there), max over ranks."""
    if ctx.dev.type != "cuda":
        fn()
        return reduce_max(ctx, 0.0)
    sync(ctx)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(ctx)
    return reduce_max(ctx, (torch.cuda.max_memory_allocated() - before) / 2**30)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def all_ok(ctx, ok: bool) -> bool:
    """True only if every rank succeeded (keeps ranks in step after a caught failure)."""
    return reduce_max(ctx, 0.0 if ok else 1.0) == 0.0


# ---------------------------------------------------------------------------------------------
# 1. correctness on small uneven shapes
# ---------------------------------------------------------------------------------------------


def rand(ctx, *shape, gen):
    return torch.randn(*shape, generator=gen, device=ctx.dev, dtype=torch.float32).to(ctx.dtype)


def small_case(ctx, seed):
    heads, d = (4, 16) if ctx.smoke else (24, 128)
    n, length, lens = (37, 9, [9, 4]) if ctx.smoke else (4099, 256, [256, 77])
    gen = torch.Generator(device=ctx.dev).manual_seed(seed)
    img = [rand(ctx, 2, n, heads, d, gen=gen) for _ in range(3)]
    txt = [rand(ctx, 2, length, heads, d, gen=gen) for _ in range(3)]
    return n, img, txt, torch.tensor(lens)


def check_small(ctx):
    n, img, txt, lens = small_case(ctx, seed=1)
    ref_img, ref_txt = local_joint_attention(*(x.float() for x in img), *(t.float() for t in txt), lens)
    valid = (torch.arange(txt[0].shape[1])[None, :] < lens[:, None]).to(ctx.dev)
    heads = img[0].shape[2]
    for u, r in sp_factorisations(ctx.world, heads):
        sp = ctx.sp(u, r)
        for kernel in ("auto",) if ctx.smoke else ("auto", "flash"):
            attn = HybridAttention(sp, num_valid_tokens=n, kernel=kernel)
            out_img, out_txt = attn(*(shard_tokens(x, 1, sp) for x in img), *txt, lens)
            full = gather_tokens(out_img, 1, sp, n)
            e_img, e_txt = rel(full, ref_img), rel(out_txt, ref_txt)
            pad_zero = bool((out_txt[~valid] == 0).all())
            same = all_ok(ctx, True)
            ctx.log(f"correctness u{u}r{r} kernel={attn.resolved_kernel(img[0])}: rel err image {e_img:.2e} text {e_txt:.2e} padded-text-zero {pad_zero} ({same})")
            ctx.emit(dict(phase="correctness", gpus=ctx.world, ulysses=u, ring=r, kernel=attn.resolved_kernel(img[0]), rel_err_img=e_img, rel_err_txt=e_txt, padded_text_zero=pad_zero))


def probe_all(ctx):
    d = 16 if ctx.smoke else 128
    res = {name: (probe_kernel(name, ctx.dev, ctx.dtype, d) or "ok").splitlines()[0][:160] for name in KERNELS}
    ctx.log("kernel probes (this device, vs math):", json.dumps(res))
    return res


# ---------------------------------------------------------------------------------------------
# 2. benchmark at the HunyuanVideo 720x1280x129 shape
# ---------------------------------------------------------------------------------------------


def bench_shape(ctx):
    if ctx.smoke:
        return dict(n=3 * 5 * 8, length=16, heads=4, d=16, size="40x64", frames=9)
    return dict(n=33 * 45 * 80, length=256, heads=24, d=128, size="720x1280", frames=129)


def full_inputs(ctx, shape):
    gen = torch.Generator(device=ctx.dev).manual_seed(0)  # identical on every rank
    img = [rand(ctx, 1, shape["n"], shape["heads"], shape["d"], gen=gen) for _ in range(3)]
    txt = [rand(ctx, 1, shape["length"], shape["heads"], shape["d"], gen=gen) for _ in range(3)]
    return img, txt


def sample_rows(n, count=1024):
    """Evenly spread image rows, the last one included (it sits on the last rank)."""
    return torch.unique(torch.linspace(0, n - 1, count).round().long())


def fp32_reference(img, txt, rows):
    """fp32 attention of the sampled image rows and all text rows over every key."""
    q = torch.cat([img[0][:, rows], txt[0]], 1).float()
    k = torch.cat([img[1], txt[1]], 1).float()
    v = torch.cat([img[2], txt[2]], 1).float()
    out, _ = math_attention(q, k, v, 1 / math.sqrt(q.shape[-1]))
    return out[:, : len(rows)], out[:, len(rows):]


def floor_sdpa(ctx, img, txt, rows, ref):
    """1-GPU SDPA over the whole sequence (cuDNN on CUDA), run on every rank at once."""
    q, k, v = (torch.cat([a, b], 1).transpose(1, 2) for a, b in zip(img, txt, strict=True))
    backends = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION] if ctx.dev.type == "cuda" else [torch.nn.attention.SDPBackend.MATH]

    def run():
        with torch.nn.attention.sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v)

    out = run().transpose(1, 2)
    n = img[0].shape[1]
    errs = (rel(out[:, rows], ref[0]), rel(out[:, n:], ref[1]))
    del out
    return timed(ctx, run), peak_gib(ctx, run), errs


def make_backend(ctx, name, sp, n):
    if name == "native":
        return HybridAttention(sp, num_valid_tokens=n)
    if name == "native-flash":
        return HybridAttention(sp, num_valid_tokens=n, kernel="flash")
    if name == "native-cat":
        return HybridAttention(sp, num_valid_tokens=n, fuse_text=False)
    from parallel.baselines import XFuserAttention, YunchangAttention

    if name == "yunchang":
        return YunchangAttention(sp, attn_type="torch_flash" if ctx.dev.type == "cuda" else "lse:math")
    if name == "yunchang-cudnn":
        return YunchangAttention(sp, attn_type="lse:cudnn" if ctx.dev.type == "cuda" else "lse:math")
    if name == "xfuser":
        kind = "torch_cudnn" if sp.ring_size == 1 else "torch_flash"  # its cuDNN LSE is zero: ring needs flash
        return XFuserAttention(sp, attn_type=kind)
    raise ValueError(name)


def bench_one(ctx, name, u, r, shards, txt, lens, rows, ref, shape):
    sp = ctx.sp(u, r)
    try:
        attn = make_backend(ctx, name, sp, shape["n"])
        ok, err = True, None
    except Exception as exc:  # noqa: BLE001 - e.g. xfuser missing: same on every rank
        ok, err = False, f"{type(exc).__name__}: {exc}"
    if not all_ok(ctx, ok):
        ctx.log(f"bench {name} u{u}r{r}: unavailable: {err}")
        return
    call = lambda: attn(*shards, *txt, lens)  # noqa: E731
    try:  # a kernel that cannot run fails the same way on every rank
        out_img, out_txt = call()
        ok = True
    except Exception as exc:  # noqa: BLE001
        ok, err = False, f"{type(exc).__name__}: {str(exc)[:300]}"
    if not all_ok(ctx, ok):
        ctx.log(f"bench {name} u{u}r{r}: failed: {err}")
        return
    e_img = rel(gather_tokens(out_img, 1, sp, shape["n"])[:, rows], ref[0])
    e_txt = rel(out_txt, ref[1])
    del out_img, out_txt
    seconds = timed(ctx, call)
    peak = peak_gib(ctx, call)
    if ctx.args.profile:
        profile_call(ctx, name, u, r, call)
    kernel = attn.resolved_kernel(shards[0]) if isinstance(attn, HybridAttention) else attn.kernel_name
    record(ctx, shape, backend=name, ulysses=u, ring=r, seconds=seconds, peak_gib=peak, rel_err_img=e_img, rel_err_txt=e_txt, kernel=str(kernel))


def record(ctx, shape, **fields):
    row = dict(
        kind=ctx.args.kind, date=datetime.date.today().isoformat(), device=device_name(ctx), gpus=ctx.world,
        model="hunyuan_video", size=shape["size"], frames=shape["frames"], image_tokens=shape["n"],
        text_tokens=shape["length"], heads=shape["heads"], head_dim=shape["d"], dtype=str(ctx.dtype).replace("torch.", ""),
        **fields, command=ctx.command, versions=versions(),
    )
    ctx.emit(dict(phase="bench", **row))
    ctx.log(f"bench {fields['backend']:>15} u{fields['ulysses']}r{fields['ring']}: {fields['seconds']:.4f} s, peak {fields['peak_gib']:.1f} GiB, rel err image {fields['rel_err_img']:.2e} text {fields['rel_err_txt']:.2e}")


def device_name(ctx):
    return torch.cuda.get_device_name(ctx.dev) if ctx.dev.type == "cuda" else "cpu"


def versions():
    v = {"torch": torch.__version__}
    if torch.cuda.is_available():
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    return v


def factorisations(ctx, heads):
    valid = sp_factorisations(ctx.world, heads)
    if not ctx.args.factorisations:
        return valid
    wanted = {tuple(int(x) for x in f.split("x")) for f in ctx.args.factorisations.split(",")}
    return [f for f in valid if f in wanted]


def profile_call(ctx, name, u, r, call):
    """Top device kernels of one call (every rank runs the call; rank 0 prints)."""
    from torch.profiler import ProfilerActivity, profile

    sync(ctx)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(ctx)
    if ctx.rank == 0:
        print(f"--- profile {name} u{u}r{r}")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=70))


def run_bench(ctx):
    shape = bench_shape(ctx)
    img, txt = full_inputs(ctx, shape)
    lens = torch.tensor([shape["length"]])
    rows = sample_rows(shape["n"]).to(ctx.dev)
    ref = fp32_reference(img, txt, rows)
    t, peak, (e_img, e_txt) = floor_sdpa(ctx, img, txt, rows, ref)
    record(ctx, shape, backend="sdpa-1gpu", ulysses=1, ring=1, seconds=t, peak_gib=peak, rel_err_img=e_img, rel_err_txt=e_txt, kernel="cudnn" if ctx.dev.type == "cuda" else "math", gpus_used=1)
    for name in ctx.args.backends.split(","):  # xfuser last: if it crashes, the rest is written
        if ctx.smoke and name in ("xfuser", "native-flash"):
            continue
        for u, r in factorisations(ctx, shape["heads"]):
            shards = [shard_tokens(x, 1, ctx.sp(u, r)) for x in img]
            bench_one(ctx, name, u, r, shards, txt, lens, rows, ref, shape)
            del shards


def print_table(ctx):
    bench = [r for r in ctx.rows if r["phase"] == "bench"]
    print("\n| gpus | backend | ulysses x ring | kernel | seconds | peak GiB | rel err image | rel err text |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in bench:
        print(f"| {r.get('gpus_used', r['gpus'])} | {r['backend']} | {r['ulysses']}x{r['ring']} | {r['kernel']} | {r['seconds']:.4f} | {r['peak_gib']:.1f} | {r['rel_err_img']:.2e} | {r['rel_err_txt']:.2e} |")


def main():
    args = parse_args()
    ctx = Ctx(args)
    try:
        ctx.log(f"world {ctx.world}, device {device_name(ctx)}, {json.dumps(versions())}")
        ctx.emit(dict(phase="probe", gpus=ctx.world, **probe_all(ctx)))
        if not args.skip_correctness:
            check_small(ctx)
        if not args.skip_bench:
            run_bench(ctx)
        if ctx.rank == 0:
            print_table(ctx)
    finally:
        teardown()


if __name__ == "__main__":
    main()
