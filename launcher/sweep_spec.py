"""What a sweep runs: its input (flags over a sweep file over defaults), its configurations and
the command line of each. `launcher/sweep.py` runs them; `launcher/sweep_report.py` reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from parallel.backends import BACKENDS, anchor_kernel
from parallel.topology import TopologyError, parse_sp, sp_factorisations

from .config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPT = "A cat walks on the grass at sunset"  # 8 words: the built-in text splits over 1, 2, 4, 8 ranks
FILE_KEYS = ("preset", "sizes", "gpus", "topologies", "backends", "steps", "warmup", "timeout", "device",
             "concurrent", "slots", "no_video", "extra_args", "prompt", "seed", "machine", "budget")
BUILTIN = {"preset": "hunyuan-video-13b", "gpus": "1,2,4", "topologies": "all", "backends": "native",
           "steps": 3, "warmup": 1, "timeout": 900.0, "device": "auto", "concurrent": False, "slots": None,
           "no_video": False, "extra_args": "", "prompt": DEFAULT_PROMPT, "seed": 0, "machine": None,
           "budget": None}


class SweepError(ValueError):
    """Bad sweep input; the message names the flag or file key and what is valid."""


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A validated sweep. sizes: (height, width, frames); topologies: (ulysses, ring) or None = all."""

    preset: str
    sizes: tuple[tuple[int, int, int], ...]
    gpus: tuple[int, ...]
    topologies: tuple[tuple[int, int], ...] | None
    backends: tuple[str, ...]
    steps: int
    warmup: int
    timeout: float
    device: str  # "cpu" or "cuda" (auto resolved)
    concurrent: bool
    slots: int | None
    no_video: bool
    extra_args: tuple[str, ...]
    prompt: str
    seed: int
    machine: str | None
    budget: float | None  # seconds after which nothing new starts and running ones are stopped
    output_dir: Path


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """One configuration: one launch of `generate`."""

    height: int
    width: int
    frames: int
    gpus: int
    ulysses: int
    ring: int
    backend: str

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}_g{self.gpus}_{self.ulysses}x{self.ring}_{self.backend}"


# --------------------------------------------------------------------------------------------
# Input: flags over a sweep file over built-in defaults
# --------------------------------------------------------------------------------------------


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", type=Path, help="sweep YAML (keys: " + ", ".join(FILE_KEYS) + "); flags override it")
    p.add_argument("--preset", help="DiT preset (default hunyuan-video-13b)")
    p.add_argument("--sizes", help="HEIGHTxWIDTHxFRAMES list, e.g. 720x1280x129,544x960x129 (default: the preset's)")
    p.add_argument("--gpus", help="GPU counts, e.g. 1,2,4 (default)")
    p.add_argument("--topologies", help="'all' (every ulysses x ring with ulysses dividing the heads; default) or a "
                                        "list such as 4x1,2x2,1x4")
    p.add_argument("--backends", help=f"attention backends, comma list of {', '.join(BACKENDS)} (default native)")
    p.add_argument("--steps", type=int, help="denoising steps per run (default 3)")
    p.add_argument("--warmup", type=int, help="first steps left out of the median (default 1)")
    p.add_argument("--timeout", type=float, help="seconds per configuration before it is killed (default 900)")
    p.add_argument("--budget", type=float, help="seconds for the whole sweep: after it nothing starts and running "
                                                "configurations are stopped (the report is still written)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto (cuda when visible)")
    p.add_argument("--concurrent", action="store_true", default=None,
                   help="run configurations side by side on disjoint GPU sets (CPU: processes)")
    p.add_argument("--slots", type=int, help="GPUs (CPU: processes) the sweep may use at once (default: all visible "
                                             "GPUs / CPU cores)")
    p.add_argument("--no-video", action="store_true", default=None, help="pass --no-video: time the DiT, skip the VAE")
    p.add_argument("--extra-args", help="more `generate` arguments, one shell-quoted string")
    p.add_argument("--prompt", help="prompt of every run (default: 8 words, so yunchang's text split works)")
    p.add_argument("--seed", type=int)
    p.add_argument("--machine", help="name of the machine kind for the rows (e.g. nvidia-h200-x4)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/sweep"))
    p.add_argument("--append-jsonl", type=Path, help="also append one object per measured configuration here")
    p.add_argument("--predict-missing", metavar="GPUS",
                   help="GPU counts (e.g. 8,16) to add to topology.yaml from plan --predict's model where nothing was "
                        "measured, marked predicted: true")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and their commands; run nothing")
    p.add_argument("--report-from", type=Path, nargs="+", metavar="RUNS_JSONL",
                   help="run nothing: rebuild table, plots and topology from these runs.jsonl files (merged)")


def load_sweep_file(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"--sweep {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise SweepError(f"--sweep {path}: expected a mapping of {', '.join(FILE_KEYS)}")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise SweepError(f"--sweep {path}: unknown key(s) {unknown}; valid: {', '.join(FILE_KEYS)}")
    return data


def _as_list(value, name: str) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise SweepError(f"--{name}: empty list")
    return out


def _parse_size(text: str, preset: str, device: str) -> tuple[int, int, int]:
    """``HxWxF``, checked as `generate` checks it (the resolver, on one rank)."""
    import torch

    from .plan import plan_config
    from .resolve import resolve_job

    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise SweepError(f"--sizes {text!r}: expected HEIGHTxWIDTHxFRAMES such as 720x1280x129")
    h, w, f = (int(p) for p in parts)
    try:
        run = plan_config(preset=preset, height=h, width=w, frames=f, dtype="bf16", cfg=1, dp=1, ulysses=None,
                          ring=None, vae_tiling="auto", knobs=None, topology_file=None)
        resolve_job(run, world=1, device=torch.device("cuda" if device == "cuda" else "cpu"), check_files=False)
    except ConfigError as err:
        raise SweepError(f"--sizes {text}: {err}") from None
    return h, w, f


def _parse_topologies(value, heads: int) -> tuple[tuple[int, int], ...] | None:
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    out = []
    for label in _as_list(value, "topologies"):
        try:
            u, r = parse_sp(label)
        except TopologyError as err:
            raise SweepError(f"--topologies: {err}") from None
        if heads % u:
            raise SweepError(f"--topologies {label}: ulysses {u} does not divide the preset's {heads} heads")
        out.append((u, r))
    return tuple(out)


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Flags over the sweep file over the built-in defaults, validated (raises SweepError)."""
    from models import get_family, list_presets

    file = load_sweep_file(args.sweep) if args.sweep else {}

    def get(key):
        flag = getattr(args, key, None)
        return flag if flag is not None else file.get(key, BUILTIN.get(key))

    preset = get("preset")
    if preset not in list_presets():
        raise SweepError(f"--preset {preset!r} is unknown; valid: {', '.join(list_presets())}")
    family = get_family(preset)
    heads, d = family.config(preset).num_heads, family.defaults[preset]
    device = _resolve_device(get("device"))
    sizes = tuple(_parse_size(s, preset, device) for s in _as_list(get("sizes") or f"{d.height}x{d.width}x{d.frames}", "sizes"))
    try:
        gpus = tuple(sorted({int(g) for g in _as_list(get("gpus"), "gpus")}))
    except ValueError:
        raise SweepError(f"--gpus {get('gpus')!r}: expected positive integers such as 1,2,4") from None
    backends = tuple(_as_list(get("backends"), "backends"))
    bad = [b for b in backends if b not in BACKENDS]
    steps, warmup, timeout = int(get("steps")), int(get("warmup")), float(get("timeout"))
    for cond, msg in (
        (min(gpus) >= 1, f"--gpus {gpus}: must be positive"),
        (not bad, f"--backends {','.join(bad)}: unknown; valid: {', '.join(BACKENDS)}"),
        (0 <= warmup < steps, f"--steps {steps} / --warmup {warmup}: need 0 <= warmup < steps (one measured step at least)"),
        (timeout > 0, f"--timeout {timeout}: must be > 0"),
        (get("slots") is None or int(get("slots")) >= 1, f"--slots {get('slots')}: must be >= 1"),
    ):
        if not cond:
            raise SweepError(msg)
    extra = get("extra_args")
    return SweepSpec(
        preset=preset, sizes=sizes, gpus=gpus, topologies=_parse_topologies(get("topologies"), heads),
        backends=backends, steps=steps, warmup=warmup, timeout=timeout, device=device,
        concurrent=bool(get("concurrent")), slots=None if get("slots") is None else int(get("slots")),
        no_video=bool(get("no_video")), extra_args=tuple(extra if isinstance(extra, list) else shlex.split(extra)),
        prompt=str(get("prompt")), seed=int(get("seed")), machine=get("machine"),
        budget=None if get("budget") is None else float(get("budget")), output_dir=args.output_dir,
    )


# --------------------------------------------------------------------------------------------
# Configurations and their command lines
# --------------------------------------------------------------------------------------------


def enumerate_configs(spec: SweepSpec, heads: int) -> list[SweepConfig]:
    """Every configuration, in size then GPU order. 1 GPU: one native run per size (the baseline
    of every backend). G > 1: each (ulysses, ring) with ulysses * ring = G and ulysses dividing
    the heads (or the listed ones), times each backend; xfuser-cudnn is left out where it would
    run the same kernel as xfuser (ring > 1: see parallel/backends.py)."""
    out = []
    for h, w, f in spec.sizes:
        for g in spec.gpus:
            if g == 1:
                out.append(SweepConfig(height=h, width=w, frames=f, gpus=1, ulysses=1, ring=1, backend="native"))
                continue
            for u, r in sp_factorisations(g, heads):
                if spec.topologies is not None and (u, r) not in spec.topologies:
                    continue
                for b in spec.backends:
                    if b == "xfuser-cudnn" and "xfuser" in spec.backends and _same_kernel_as_xfuser(r, spec.device):
                        continue
                    out.append(SweepConfig(height=h, width=w, frames=f, gpus=g, ulysses=u, ring=r, backend=b))
    return out


def _same_kernel_as_xfuser(ring: int, device: str) -> bool:
    return anchor_kernel("xfuser-cudnn", ring, device)[0] == anchor_kernel("xfuser", ring, device)[0]


def launch_command(c: SweepConfig, spec: SweepSpec, run_dir: Path) -> list[str]:
    """The exact command of one configuration (1 GPU: plain python; G > 1: torchrun)."""
    gen = ["-m", "launcher", "generate", "--preset", spec.preset, "--size", f"{c.height}x{c.width}",
           "--frames", str(c.frames), "--steps", str(spec.steps), "--seed", str(spec.seed), "--prompt", spec.prompt,
           "--device", spec.device, "--attention", c.backend, "--output-dir", str(run_dir), "--overwrite"]
    if c.gpus > 1:
        gen += ["--ulysses", str(c.ulysses), "--ring", str(c.ring)]
    if spec.no_video:
        gen.append("--no-video")
    gen += list(spec.extra_args)
    if "--model-dir" not in spec.extra_args:  # a timing run: released presets on random weights, said so
        gen.append("--random-weights")
    if c.gpus == 1:
        return [sys.executable, *gen]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={c.gpus}", *gen]
