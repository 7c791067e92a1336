"""Command-line interface: `python -m launcher <command> ...` (or under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.step_cache import CACHES

from .config import NOISE_SOURCES, RunConfig, family_of, parse_size, read_prompts_file
from .memory_plan import parse_memory
from .plan import add_plan_args
from .sweep_spec import add_sweep_args


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from models import list_presets

    p.add_argument("--preset", default="hunyuan-video-13b", help=f"DiT preset: {', '.join(list_presets())}")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="release or diffusers folder with the weights (README: 'Models and their weights')")
    p.add_argument("--random-weights", action="store_true",
                   help="run a released preset on seeded random weights, without --model-dir (benchmarks; "
                        "the video is noise); presets that were never released always do")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line; each gets its own video")
    p.add_argument("--size", help="HEIGHTxWIDTH in pixels, multiples of 16 (default: the preset's)")
    p.add_argument("--frames", type=int, help="4n+1 frames (default: the preset's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    p.add_argument("--seed", type=int, help="noise seed (default: drawn by rank 0 and shared with every rank)")
    p.add_argument("--guidance", type=float, help="embedded guidance scale (default 6.0)")
    p.add_argument("--flow-shift", type=float, help="flow-matching sigma shift (default 7.0)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"),
                   help="folder for the mp4, its JSON record and the optional files (default: outputs)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--text-encoder-precision", default="auto", dest="text_dtype",
                   help="auto (fp16 on GPU, as the release; fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--noise", default="cpu", choices=NOISE_SOURCES,
                   help="cpu: a CPU generator in fp32, the same noise on every platform (default); release: "
                        "drawn as the HunyuanVideo release does (a generator on the GPU, in the text encoder's "
                        "dtype), so a seed reproduces the release's video")
    p.add_argument("--save-latents", action="store_true", help="also write the final latents (.safetensors)")
    p.add_argument("--save-grid", action="store_true", help="also write a PNG grid of frames")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip prompts whose JSON record exists (it is written last: the video is complete); "
                        "their other files without a record are a killed run's and are replaced (needs --seed)")
    p.add_argument("--fps", type=int, help="frames per second of the mp4 (default: the preset's, 24)")
    p.add_argument("--vae-tiling", default="auto", choices=("auto", "release", "small", "off"),
                   help="VAE decode tiling: the release's tiles (auto), 17x16x16-latent tiles (small), or none")
    p.add_argument("--negative-prompt", help="classic CFG: the negative prompt (with --cfg-scale != 1; default: "
                   "the model family's, as its release does)")
    p.add_argument("--cfg-scale", type=float, help="classic CFG scale (1 = off; default: the preset's release setting, "
                   "1 for HunyuanVideo, 5 for Wan2.1)")
    par = p.add_argument_group("parallelism (torchrun)")
    par.add_argument("--ulysses", type=int, help="Ulysses degree (default: the topology table's choice)")
    par.add_argument("--ring", type=int, help="ring degree (default: the topology table's choice)")
    par.add_argument("--cfg", type=int, dest="cfg_degree",
                     help="2: conditional and negative passes on separate ranks (default when CFG is on and "
                          "the GPU count allows); 1: one after the other")
    par.add_argument("--dp", type=int, default=1, help="data-parallel replicas: prompts are spread over them")
    par.add_argument("--timeout", type=float, default=600.0, dest="timeout_s",
                     help="seconds any collective may wait before the job fails")
    par.add_argument("--log-all-ranks", action="store_true", help="every rank logs, prefixed with its rank")
    mem = p.add_argument_group("memory (see `plan --max-gpu-memory`)")
    mem.add_argument("--max-gpu-memory", help="per-GPU budget, e.g. 24GiB: the planner picks the cheapest "
                     "placement that fits (layer streaming, sequential CFG, small VAE tiles, FP8 with --fp8 auto) "
                     "and caps the allocator there; default on CUDA: the GPU's memory")
    mem.add_argument("--memory-profile", help="fixed placement instead: default, light or extreme")
    mem.add_argument("--fp8", default="off", help="DiT block weights in float8: off (default), storage "
                     "(computed in bf16), matmul (FP8 tensor cores), auto (the planner may use storage)")
    mem.add_argument("--stream-blocks", type=int, help="stream the last N DiT blocks from host memory")
    mem.add_argument("--prefetch", type=int, default=1, help="streamed blocks copied ahead of the compute")
    mem.add_argument("--chunk-tokens", type=int, help="run the DiT blocks' token-wise parts (norms, projections, "
                     "MLP) over chunks of N tokens: same result, lower peak (0: off; light/extreme profiles and "
                     "the planner under a budget chunk by themselves)")
    speed = p.add_argument_group("step caching (approximate: see docs/BENCHMARKS.md for its cost in quality)")
    speed.add_argument("--cache", default="off", choices=CACHES,
                       help="skip the DiT's blocks on steps whose input barely changed, reusing the residual of the "
                            "last computed step: teacache (signal: the first block's modulated input) or fbcache "
                            "(first-block cache: the first block's residual); every rank of a replica decides alike "
                            "(default: off, every step computed)")
    speed.add_argument("--cache-threshold", type=float,
                       help="the cache's threshold: higher skips more (default: the family's, e.g. HunyuanVideo "
                            "teacache 0.1, fbcache 0.06; 0 never skips)")
    add_benchmarking_args(p)
    add_compile_args(p)


def add_compile_args(p: argparse.ArgumentParser) -> None:
    comp = p.add_argument_group("compilation")
    comp.add_argument("--compile", action="store_true",
                      help="torch.compile each DiT block (attention stays eager): on one H200 -6.4%% per step at "
                           "720x1280x129 (blocks -17%% at 29,700 tokens per rank), the first step ~15 s longer on "
                           "a cold cache; off by default (bf16 rounds differently from the eager path the release "
                           "runs; short runs do not win the compile back). The record's `compile` says what it cost")
    comp.add_argument("--compile-cache", type=Path, metavar="DIR",
                      help="keep inductor's compile caches in DIR (e.g. shared storage for Slurm jobs), so later "
                           "runs load the kernels instead of compiling them (default: $TORCHINDUCTOR_CACHE_DIR, "
                           "else /tmp/torchinductor_$USER)")


def add_benchmarking_args(p: argparse.ArgumentParser) -> None:
    from parallel.backends import BACKENDS
    from parallel.kernels import KERNELS

    bench = p.add_argument_group("benchmarking")
    bench.add_argument("--topology", type=Path, dest="topology_file",
                       help="topology YAML to resolve degrees with, instead of configs/topology/ (e.g. a sweep's "
                            "topology.yaml)")
    bench.add_argument("--attention", default="native", choices=BACKENDS,
                       help="sequence-parallel attention: native (ours), xfuser (as the HunyuanVideo release runs it: "
                            "flash-attn, else torch's flash kernel), xfuser-cudnn (xfuser with torch's cuDNN at ring 1), "
                            "yunchang (USP); see parallel/backends.py")
    bench.add_argument("--attention-kernel", default="auto", choices=("auto", *KERNELS),
                       help="the native attention's local kernel (auto: cuDNN on Hopper when a probe agrees, else "
                            "flash, else math); one that fails at run time gives way to the next on every rank "
                            "(cudnn, fa3, fa2, flash, efficient, math), with a warning and a line in the record")
    bench.add_argument("--no-video", action="store_true",
                       help="skip the VAE: write the latents (.safetensors) and the JSON record only")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Arguments + the preset's defaults -> a validated RunConfig (raises ConfigError)."""
    family = family_of(args.preset)
    defaults = family.defaults[args.preset]
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    else:
        # The release strips surrounding whitespace: it changes the tokens, so the video.
        prompts = (args.prompt.strip(),) if args.prompt is not None else ()
    height, width = parse_size(args.size) if args.size else (defaults.height, defaults.width)
    return RunConfig(
        preset=args.preset,
        # A preset whose weights ship with the code runs them unless told otherwise.
        model_dir=args.model_dir if args.model_dir or args.random_weights else defaults.model_dir,
        random_weights=args.random_weights,
        prompts=prompts,
        height=height,
        width=width,
        frames=args.frames if args.frames is not None else defaults.frames,
        steps=args.steps if args.steps is not None else defaults.steps,
        seed=args.seed,
        guidance=args.guidance if args.guidance is not None else defaults.guidance,
        flow_shift=args.flow_shift if args.flow_shift is not None else defaults.flow_shift,
        output_dir=args.output_dir,
        dtype=args.dtype,
        text_dtype=args.text_dtype,
        noise=args.noise,
        device=args.device,
        save_latents=args.save_latents,
        save_grid=args.save_grid,
        overwrite=args.overwrite,
        skip_existing=args.skip_existing,
        fps=args.fps if args.fps is not None else defaults.fps,
        vae_tiling=args.vae_tiling,
        negative_prompt=_negative_prompt(args, family),
        cfg_scale=_cfg_scale(args, defaults),
        ulysses=args.ulysses,
        ring=args.ring,
        cfg_degree=args.cfg_degree,
        dp=args.dp,
        timeout_s=args.timeout_s,
        log_all_ranks=args.log_all_ranks,
        max_gpu_memory=None if args.max_gpu_memory is None else parse_memory(args.max_gpu_memory),
        memory_profile=args.memory_profile,
        fp8=args.fp8,
        stream_blocks=args.stream_blocks,
        prefetch=args.prefetch,
        chunk_tokens=args.chunk_tokens,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        topology_file=args.topology_file,
        attention=args.attention,
        attention_kernel=args.attention_kernel,
        no_video=args.no_video,
        compile=args.compile,
        compile_cache=args.compile_cache,
    )


def _negative_prompt(args: argparse.Namespace, family) -> str | None:
    """--negative-prompt (stripped, as the release does), else the preset's or the family's default
    when classic CFG is on (--cfg-scale != 1), else None."""
    if args.negative_prompt is not None:
        return args.negative_prompt.strip()
    defaults = family.defaults[args.preset]
    if _cfg_scale(args, defaults) == 1.0:
        return None
    return defaults.negative_prompt if defaults.negative_prompt is not None else family.default_negative_prompt


def _cfg_scale(args, defaults) -> float:
    return args.cfg_scale if args.cfg_scale is not None else defaults.cfg_scale


class Parser(argparse.ArgumentParser):
    """One rule for every command: flags are spelled out (no abbreviations: `--over` must not
    silently mean `--overwrite`), and a mistyped flag gets the nearest real ones."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:"):
            flags = sorted(_flags(self))
            hints = []
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], flags, n=2)
                if arg.startswith("--") and close:
                    hints.append(f"{arg}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of ``parser`` and of its subcommands (unknown flags are reported at the top)."""
    out = set()
    for action in parser._actions:
        out.update(f for f in action.option_strings if f.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out |= _flags(child)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m launcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate_args(sub.add_parser("generate", help="text-to-video generation (one process or torchrun)"))
    add_plan_args(sub.add_parser("plan", help="topologies, tokens per rank and memory per rank, without GPUs"))
    from .slurm import add_slurm_args  # here: launcher.slurm imports this module

    add_slurm_args(sub.add_parser("slurm", help="a validated sbatch file for a multi-node generate (--submit: sbatch it)"))
    add_sweep_args(sub.add_parser("sweep", help="time generate over sizes, GPU counts, topologies and attention backends"))
    from .predict import add_calibrate_args

    add_calibrate_args(sub.add_parser("calibrate", help="fit plan --predict's step-time model to measured sweep rows"))
    from .quality import add_quality_args

    add_quality_args(sub.add_parser("quality", help="PSNR of a run's videos against another run's"))
    return parser
