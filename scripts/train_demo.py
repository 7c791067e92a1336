#!/usr/bin/env python
"""Train the demo model (preset `hunyuan-video-demo`) on the procedural videos of
`models/demo/grammar.py`, and write it in the release's folder layout:

    OUT/transformers/mp_rank_00_model_states.safetensors   the DiT (EMA weights, bf16)
    OUT/vae/diffusion_pytorch_model.safetensors, config.json the causal VAE (bf16) and its config
    OUT/train_log.jsonl, OUT/train_summary.json             losses, timings, the held-out check

Phases: (1) the VAE, reconstruction + a light KL; (2) its latents of a rendered dataset, whose
std sets `scaling_factor`; (3) the DiT, flow matching on those latents (x_s = (1-s) x0 + s noise,
target noise - x0, s drawn with the sampler's shift), conditioned by the built-in text encoder;
the pooled vector is fresh noise each step (the built-in one is a hash of the whole prompt, so a
held-out prompt's would be unseen: the model must read the words); 10% of captions are dropped to
the empty prompt (so classic CFG works). (4) a check: the held-out and seen check prompts sampled
as `generate` would, read back (colour, motion).

Seeded and resumable: `--work DIR` keeps a full checkpoint (weights, EMA, optimiser, step) every
`--save-every` steps and a rerun continues from it; `--init DIR` starts the DiT (and takes the VAE)
from written weights instead. Never imported by the launcher.

    python scripts/train_demo.py --out models/demo/hunyuan-video-demo --work /tmp/demo-work
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.demo import grammar  # noqa: E402
from models.hunyuan_video.config import get_preset  # noqa: E402
from models.hunyuan_video.dit import HunyuanVideoDiT, patchify, unpatchify  # noqa: E402
from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE, load_vae  # noqa: E402
from models.scheduler import FlowMatchEuler  # noqa: E402
from models.text_builtin import BuiltinTextEncoder  # noqa: E402

PRESET = "hunyuan-video-demo"
SHIFT = 3.0  # the preset's flow shift: training draws sigmas as the sampler spaces them
DIT_FILE = "transformers/mp_rank_00_model_states.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the weights are written (release layout)")
    p.add_argument("--work", type=Path, help="checkpoint folder for resuming (default: OUT/../<name>-work)")
    p.add_argument("--init", type=Path, help="start from weights written by an earlier run (skips the VAE phase)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--fg-weight", type=float, default=16.0, help="VAE loss weight of the shape's pixels")
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="VAE KL weight (per latent element, against the per-pixel reconstruction loss)")
    p.add_argument("--vae-minutes", type=float, default=None, help="stop the VAE phase after this long")
    p.add_argument("--dataset", type=int, default=32768, help="videos rendered and encoded for the DiT")
    p.add_argument("--dit-steps", type=int, default=12000)
    p.add_argument("--dit-batch", type=int, default=128)
    p.add_argument("--dit-lr", type=float, default=4e-4)
    p.add_argument("--dit-minutes", type=float, default=None,
                   help="the DiT phase's length in training time, over all runs that resume it")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="this run's limit: the DiT phase pauses early enough to write and check in time "
                        "(a rerun with the same --work continues it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's training step (eager if it fails)")
    p.add_argument("--throughput", action="store_true",
                   help="measure VAE and DiT training steps/s (batch sizes, eager/compiled) and exit")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--check-steps", type=int, default=20, help="sampling steps of the final check")
    p.add_argument("--check-count", type=int, default=20, help="prompts of the final check")
    return p.parse_args(argv)


def log(out: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


class Schedule:
    """Linear warm-up, then cosine decay to a tenth of the peak over `steps` steps or `minutes` of
    training, whichever ends first (so a time-limited phase still anneals). `elapsed_s` is the
    phase's time in earlier runs (a resumed phase continues its schedule, not a new one);
    `stop_minutes` ends this run's part early (a device call's budget) without shortening it."""

    def __init__(self, steps: int, minutes: float | None, peak: float, warmup: int,
                 elapsed_s: float = 0.0, stop_minutes: float | None = None):
        self.steps, self.peak, self.warmup, self.t0 = steps, peak, warmup, time.time()
        self.minutes, self.elapsed_s = minutes, elapsed_s
        self.stop_at = None if stop_minutes is None else self.t0 + 60 * stop_minutes

    def seconds(self) -> float:
        """Training time of the phase so far, earlier runs included."""
        return self.elapsed_s + time.time() - self.t0

    def progress(self, step: int) -> float:
        frac = step / self.steps
        if self.minutes is not None:
            frac = max(frac, self.seconds() / (60 * self.minutes))
        return min(1.0, frac)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0 or (self.stop_at is not None and time.time() >= self.stop_at)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.peak * (0.1 + 0.45 * (1 + math.cos(math.pi * self.progress(step))))


def pick(captions: list, n: int, gen: torch.Generator) -> list:
    return [captions[i] for i in torch.randint(len(captions), (n,), generator=gen).tolist()]


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- VAE ----------------------------------------------------------------------------------------


def foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """`[B, 1, F, H, W]`: `weight` on the shape's pixels, 1 on the background. The shape covers a
    few percent of the frame, so an unweighted loss is met by a VAE that draws backgrounds and
    blurs shapes into them (measured: the colour lost in half the videos); the corner pixel is
    always background (`grammar.render` keeps the shape inside the frame)."""
    bg = x[..., :1, :1]
    fg = (x - bg).abs().amax(dim=1, keepdim=True) > 0.05
    return 1 + (weight - 1) * fg.float()



def vae_step(vae: HunyuanVideoVAE, opt, x: torch.Tensor, args):
    """One VAE optimiser step on videos `x` `[B, 3, F, H, W]`; returns (loss, kl, rec, weights)."""
    with autocast(x.device):
        mean, logvar = vae.encode_tile(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = vae.decode_tile(z).float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    w = foreground_weight(x, args.fg_weight)
    loss = (w * ((rec - x).pow(2) + 0.5 * (rec - x).abs())).mean() / w.mean() + args.kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return loss, kl, rec, w


def vae_optimizer(vae: HunyuanVideoVAE, lr: float):
    return torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def train_vae(vae: HunyuanVideoVAE, args, dev: torch.device, out: Path) -> None:
    vae.train().requires_grad_(True)
    opt = vae_optimizer(vae, args.vae_lr)
    caps, gen = grammar.training_captions(), torch.Generator().manual_seed(args.seed)
    t0, sched = time.time(), Schedule(args.vae_steps, args.vae_minutes, args.vae_lr, warmup=200)
    step = 0
    while not sched.done(step):
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        x = grammar.render(pick(caps, args.vae_batch, gen), seed=args.seed * 1_000_003 + step, device=dev)
        loss, kl, rec, w = vae_step(vae, opt, x, args)
        step += 1
        if step % 250 == 1 or sched.done(step):
            err = (rec.detach().clamp(-1, 1) - x).pow(2)
            fg = w > 1
            psnr, fg_psnr = (-10 * math.log10(e.item() / 4 + 1e-12) for e in (err.mean(), err.mean(1, True)[fg].mean()))
            log(out, phase="vae", step=step, loss=round(loss.item(), 5), kl=round(kl.item(), 3),
                psnr=round(psnr, 2), fg_psnr=round(fg_psnr, 2), s=round(time.time() - t0, 1))
    vae.eval().requires_grad_(False)
    log(out, phase="vae_check", **reconstruction_check(vae, dev, args.check_count))


@torch.no_grad()
def reconstruction_check(vae: HunyuanVideoVAE, dev: torch.device, count: int = 20) -> dict:
    """The read-back on the VAE's reconstructions of the check prompts' videos: what the DiT can
    reach at best."""
    caps = grammar.check_prompts(count)[:count]
    x = grammar.render(caps, seed=123, device=dev)
    with autocast(dev):
        rec = vae.decode_tile(vae.encode_tile(x).float().chunk(2, dim=1)[0]).float()
    frames = ((rec.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
    reads = [grammar.read_back(f) for f in frames]
    return {"colour": sum(r.colour == c.colour for r, c in zip(reads, caps)) / len(caps),
            "motion": sum(r.motion == c.motion for r, c in zip(reads, caps)) / len(caps)}


@torch.no_grad()
def encode_dataset(vae: HunyuanVideoVAE, args, dev: torch.device, out: Path):
    """Latents (VAE space, posterior means, bf16) of `args.dataset` rendered videos and their
    caption indices; plus the scaling factor that gives them unit std."""
    caps, gen = grammar.training_captions(), torch.Generator().manual_seed(args.seed + 1)
    t0, lat, idx = time.time(), [], []
    for start in range(0, args.dataset, 64):
        ids = torch.randint(len(caps), (min(64, args.dataset - start),), generator=gen)
        x = grammar.render([caps[i] for i in ids.tolist()], seed=10_000_019 + start, device=dev)
        with autocast(dev):
            mean = vae.encode_tile(x).float().chunk(2, dim=1)[0]
        lat.append(mean.to(torch.bfloat16))
        idx.append(ids)
    latents, ids = torch.cat(lat), torch.cat(idx).to(dev)
    scaling = float(1.0 / latents[:2048].float().std())
    log(out, phase="latents", videos=len(latents), shape=list(latents.shape[1:]), scaling_factor=round(scaling, 6),
        s=round(time.time() - t0, 1))
    return latents, ids, scaling


# --- DiT ----------------------------------------------------------------------------------------


class TextTable:
    """The built-in encoder's rows for every training caption (and the empty prompt, last), at a
    short text length: padded text is masked everywhere, so it equals the launcher's 256."""

    def __init__(self, captions, cfg, dev, length: int = 8):
        enc = BuiltinTextEncoder(cfg.text_states_dim, cfg.pooled_dim, length, device=dev)
        cond = enc.encode([c.text for c in captions] + [""])
        self.txt, self.mask = cond.txt, cond.mask
        self.empty = len(captions)


def flow_batch(latents, ids, table, cfg, gen_dev, dev, batch: int, scaling: float):
    pick_ = torch.randint(len(latents), (batch,), device=dev, generator=gen_dev)
    x0 = latents[pick_].float() * scaling  # [B, 16, T, h, w], the DiT's latent space
    cap = ids[pick_].clone()
    cap[torch.rand(batch, device=dev, generator=gen_dev) < 0.1] = table.empty
    u = torch.rand(batch, device=dev, generator=gen_dev)
    sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
    noise = torch.randn(x0.shape, device=dev, generator=gen_dev)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    # The built-in pooled vector is a hash of the whole prompt (unit-variance uniform): noise here.
    pooled = (torch.rand(batch, cfg.pooled_dim, device=dev, generator=gen_dev) * 2 - 1) * math.sqrt(3)
    return xt, noise - x0, sigma * 1000, table.txt[cap], table.mask[cap], pooled


def dit_step(forward, dit, ema, opt, batch, rope, ema_decay: float) -> torch.Tensor:
    """One flow-matching step: `forward` is the DiT's call (compiled or not), `dit` its module
    (clipping, EMA), `batch` from `flow_batch`, `rope` the (cos, sin) of the latents' token grid."""
    xt, target, t, txt, mask, pooled = batch
    patch = dit.config.patch_size
    with autocast(xt.device):
        v = forward(patchify(xt, patch), *rope, txt, mask, t, pooled)
    loss = F.mse_loss(v.float(), patchify(target, patch))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(dit.parameters()), 1 - ema_decay)
    return loss


def dit_forward(dit, compile_: bool):
    """The DiT's training call: `torch.compile`d when asked (one graph: the shapes never change)."""
    if not compile_:
        return dit
    return torch.compile(dit)


def dit_optimizer(dit, lr: float):
    return torch.optim.AdamW(dit.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def train_dit(dit, ema, latents, ids, scaling, args, dev, out: Path, work: Path) -> None:
    cfg = dit.config
    table = TextTable(grammar.training_captions(), cfg, dev)
    grid = tuple(n // p for n, p in zip(latents.shape[2:], cfg.patch_size))
    rope = tuple(r.to(dev) for r in dit.rope(grid))
    opt = dit_optimizer(dit, args.dit_lr)
    gen_dev = torch.Generator(device=dev).manual_seed(args.seed + 2)
    start, elapsed = 0, 0.0
    ckpt = work / "dit.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        dit.load_state_dict(state["dit"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen_dev.set_state(state["gen"].cpu())
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        log(out, phase="dit", resumed_at=start)
    t0 = time.time()
    sched = Schedule(args.dit_steps, args.dit_minutes, args.dit_lr, warmup=500, elapsed_s=elapsed,
                     stop_minutes=args.dit_stop_minutes)
    dit.train().requires_grad_(True)
    forward = dit_forward(dit, args.compile)
    step = start
    for step in range(start, args.dit_steps):
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        batch = flow_batch(latents, ids, table, cfg, gen_dev, dev, args.dit_batch, scaling)
        decay = min(args.ema, (1 + step) / (10 + step))
        try:
            loss = dit_step(forward, dit, ema, opt, batch, rope, decay)
        except Exception as exc:  # a compiler failure must not cost the run: carry on eagerly
            if forward is dit or step > start:
                raise
            log(out, phase="dit", compile_failed=f"{type(exc).__name__}: {str(exc)[:300]}")
            forward = dit
            loss = dit_step(forward, dit, ema, opt, batch, rope, decay)
        if step % 250 == 0:
            log(out, phase="dit", step=step, loss=round(loss.item(), 5), s=round(time.time() - t0, 1))
        done = sched.done(step + 1)
        if (step + 1) % args.save_every == 0 or done:
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"dit": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen_dev.get_state(), "step": step + 1, "elapsed_s": sched.seconds()},
                       work / "dit.tmp")
            (work / "dit.tmp").replace(ckpt)
        if done:
            break
    log(out, phase="dit", stopped_at=step + 1, s=round(time.time() - t0, 1))
    dit.eval().requires_grad_(False)


# --- throughput ---------------------------------------------------------------------------------


def _steps_per_s(step, warmup: int, count: int, dev: torch.device) -> float:
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(count):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return count / (time.perf_counter() - t)


def throughput(args, dev: torch.device, out: Path) -> list[dict]:
    """Training steps/s of the VAE (batch sizes) and the DiT (batch sizes, eager and compiled),
    on random weights: what sets the phases' batch and `--compile` for a time budget."""
    rows = []
    caps, gen = grammar.training_captions(), torch.Generator().manual_seed(0)
    for batch in sorted({args.vae_batch, 2 * args.vae_batch}):
        vae = HunyuanVideoVAE(VAE_PRESETS["demo"]).to(dev).train()
        opt = vae_optimizer(vae, args.vae_lr)
        x = grammar.render(pick(caps, batch, gen), seed=0, device=dev)
        rate = _steps_per_s(lambda: vae_step(vae, opt, x, args), 3, 15, dev)
        rows.append({"phase": "vae", "batch": batch, "steps_per_s": round(rate, 2), "videos_per_s": round(rate * batch, 1)})
        print(rows[-1], flush=True)
    cfg = get_preset(PRESET)
    latents = torch.randn(512, cfg.in_channels, *cfg.latent_grid(grammar.SIZE, grammar.SIZE, grammar.FRAMES),
                          device=dev).to(torch.bfloat16)
    ids = torch.randint(len(caps), (512,), device=dev)
    table = TextTable(caps, cfg, dev)
    gen_dev = torch.Generator(device=dev).manual_seed(0)
    for compile_ in (False, True):
        for batch in sorted({args.dit_batch, 2 * args.dit_batch}):
            dit, ema = HunyuanVideoDiT(cfg).to(dev).train(), HunyuanVideoDiT(cfg).to(dev).requires_grad_(False)
            rope = tuple(r.to(dev) for r in dit.rope(tuple(n // p for n, p in zip(latents.shape[2:], cfg.patch_size))))
            opt, forward = dit_optimizer(dit, args.dit_lr), dit_forward(dit, compile_)
            data = flow_batch(latents, ids, table, cfg, gen_dev, dev, batch, 1.0)
            t = time.perf_counter()
            dit_step(forward, dit, ema, opt, data, rope, args.ema)  # the compile, if any
            first = time.perf_counter() - t
            rate = _steps_per_s(lambda: dit_step(forward, dit, ema, opt, data, rope, args.ema), 3, 40, dev)
            rows.append({"phase": "dit", "batch": batch, "compile": compile_, "first_step_s": round(first, 1),
                         "steps_per_s": round(rate, 2), "samples_per_s": round(rate * batch)})
            print(rows[-1], flush=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


# --- writing and checking ------------------------------------------------------------------------


def save_vae(vae: HunyuanVideoVAE, scaling: float, folder: Path, dtype: torch.dtype) -> None:
    """The VAE's weights in `dtype` and a config.json the loader reads (the release's key names)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(folder / Path(VAE_FILE).name), metadata={"format": "pt", "preset": PRESET})
    vc = vae.config
    config = {
        "_class_name": "AutoencoderKLCausal3D", "in_channels": vc.in_channels, "out_channels": vc.out_channels,
        "latent_channels": vc.latent_channels, "block_out_channels": list(vc.block_out_channels),
        "layers_per_block": vc.layers_per_block, "norm_num_groups": vc.norm_num_groups, "act_fn": "silu",
        "scaling_factor": round(scaling, 6), "time_compression_ratio": vc.time_compression_ratio,
        "spatial_compression_ratio": vc.spatial_compression_ratio,
        "mid_block_add_attention": vc.mid_block_add_attention,
        "down_block_types": ["DownEncoderBlockCausal3D"] * len(vc.block_out_channels),
        "up_block_types": ["UpDecoderBlockCausal3D"] * len(vc.block_out_channels),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_weights(ema, vae: HunyuanVideoVAE, scaling: float, out: Path) -> None:
    """The shipped files: the EMA DiT and the VAE in bf16 (the launcher casts to its dtype)."""
    from safetensors.torch import save_file

    (out / DIT_FILE).parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in ema.state_dict().items()}
    save_file(sd, str(out / DIT_FILE), metadata={"format": "pt", "preset": PRESET})
    save_vae(vae, scaling, out / "vae", torch.bfloat16)


@torch.no_grad()
def check(out: Path, dev: torch.device, steps: int, count: int) -> dict:
    """Sample the check prompts from the written weights as `generate` does (256 text tokens, the
    hashed pooled vector, seed i), decode, read back."""
    from models.sampling import denoise_tokens, initial_noise
    from safetensors.torch import load_file

    cfg = get_preset(PRESET)
    dit = HunyuanVideoDiT(cfg).to(dev)
    dit.load_state_dict({k: v.float() for k, v in load_file(str(out / DIT_FILE)).items()})
    dit.eval()
    vae = load_vae(out, device=dev, dtype=torch.float32)
    enc = BuiltinTextEncoder(cfg.text_states_dim, cfg.pooled_dim, 256, device=dev)
    latent = cfg.latent_grid(grammar.SIZE, grammar.SIZE, grammar.FRAMES)
    grid = cfg.token_grid(grammar.SIZE, grammar.SIZE, grammar.FRAMES)
    rope = dit.rope(grid)
    results = []
    for i, cap in enumerate(grammar.check_prompts(count)):
        noise = patchify(initial_noise((1, cfg.in_channels, *latent), seed=i), cfg.patch_size).to(dev)
        tokens = denoise_tokens(dit, noise, rope, enc.encode([cap.text]), FlowMatchEuler(steps=steps, shift=SHIFT),
                                embedded_guidance=None)
        z = unpatchify(tokens, grid, cfg.patch_size) / vae.config.scaling_factor
        video = vae.decode(z)[0]
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
        r = grammar.read_back(frames)
        held = (cap.colour, cap.shape, cap.motion) in set(grammar.HELD_OUT)
        results.append({"prompt": cap.text, "held_out": held, "colour": r.colour, "motion": r.motion,
                        "colour_ok": r.colour == cap.colour, "motion_ok": r.motion == cap.motion})
    n = len(results)
    return {"prompts": n, "colour": sum(r["colour_ok"] for r in results) / n,
            "motion": sum(r["motion_ok"] for r in results) / n, "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        throughput(args, dev, out)
        return 0
    work = args.work or out.parent / f"{out.name}-work"
    t_start = time.time()
    if args.init is not None:
        vae = load_vae(args.init, device=dev, dtype=torch.float32)
        latents, ids, scaling = encode_dataset(vae, args, dev, out)
    elif (work / "vae").is_dir():
        vae = load_vae(work / "vae", device=dev, dtype=torch.float32)
        latents, ids, scaling = encode_dataset(vae, args, dev, out)
    else:
        vae = HunyuanVideoVAE(VAE_PRESETS["demo"]).to(dev)
        train_vae(vae, args, dev, out)
        latents, ids, scaling = encode_dataset(vae, args, dev, out)
        save_vae(vae, scaling, work / "vae", torch.float32)  # a resumed run skips the VAE
    t_vae = time.time() - t_start
    args.dit_stop_minutes = None
    if args.budget_minutes is not None:  # keep half a minute to write the weights and check them
        args.dit_stop_minutes = max(0.5, args.budget_minutes - t_vae / 60 - 0.5)
    cfg = get_preset(PRESET)
    dit = HunyuanVideoDiT(cfg).to(dev)
    if args.init is not None:
        from safetensors.torch import load_file

        dit.load_state_dict({k: v.float() for k, v in load_file(str(args.init / DIT_FILE)).items()})
    ema = HunyuanVideoDiT(cfg).to(dev)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    train_dit(dit, ema, latents, ids, scaling, args, dev, out, work)
    t_dit = time.time() - t_start - t_vae
    write_weights(ema, vae, scaling, out)
    summary = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "vae_and_latents_s": round(t_vae, 1), "dit_s": round(t_dit, 1), "args": vars(args)}
    summary["check"] = check(out, dev, args.check_steps, args.check_count)
    summary["total_s"] = round(time.time() - t_start, 1)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    c = summary["check"]
    print(f"check: colour {c['colour']:.0%}, motion {c['motion']:.0%} of {c['prompts']} prompts; "
          f"VAE {t_vae:.0f} s, DiT {t_dit:.0f} s, total {summary['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
