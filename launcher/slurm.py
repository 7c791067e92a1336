"""`python -m launcher slurm`: a ready sbatch file for a multi-node `generate`, validated first.

    python -m launcher slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 02:00:00 \\
        --model-dir ckpts --prompt "A cat walks on the grass" --size 720x1280 --frames 129 -o job.sbatch
    python -m launcher slurm ... --submit       # writes the file and calls sbatch

It takes exactly `generate`'s flags plus the job's shape, builds the RunConfig as `generate` does
and resolves the topology for nodes x gpus-per-node ranks before anything is written, so a job
that would fail on the cluster fails here (exit 2, naming the valid choices). The Ulysses degree
must divide the GPUs per node (each all-to-all group stays inside a node, see
``launcher/sbatch.py``); the chosen degrees are written into the job as explicit flags.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from parallel.topology import Topology

from .cli import add_generate_args, run_config_from_args
from .config import ConfigError
from .resolve import ResolvedJob, resolve_job
from .sbatch import SbatchJob, render_sbatch

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:+=@%-]+$")
# Flags `slurm` handles itself instead of passing them through to the job's `generate`.
_NOT_PASSED = {"output_dir", "ulysses", "ring", "help"}


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    """`generate`'s flags plus the job's shape and where the file goes."""
    add_generate_args(p)
    job = p.add_argument_group("Slurm job")
    job.add_argument("--nodes", type=int, default=1, help="nodes (one torchrun per node)")
    job.add_argument("--gpus-per-node", type=int, default=8,
                     help="GPUs per node (with --device cpu: processes per node, no GPUs requested)")
    job.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    job.add_argument("--account", help="Slurm account to charge (default: yours)")
    job.add_argument("--time", default="01:00:00", help="time limit, e.g. 90, 02:00:00, 1-00:00:00")
    job.add_argument("--job-name", default="videodit", help="job name (logs go to logs/NAME-JOBID.out)")
    job.add_argument("--cpus-per-task", type=int,
                     help="CPU cores per node's task (default: 4 per GPU; 1 per process on CPU)")
    job.add_argument("--mem", help="memory per node (#SBATCH --mem), e.g. 200G or 0 for all of it")
    job.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args", metavar="ARG",
                     help="another #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    job.add_argument("--setup", help="shell lines the job runs first (module loads, conda activate), or @FILE "
                     "to take them from a file")
    job.add_argument("-o", "--output-file", type=Path, help="write the sbatch file here (default: print it)")
    job.add_argument("--submit", action="store_true",
                     help="write the file (-o, or ./slurm-NAME.sbatch) and submit it with sbatch")


def check_job_args(args: argparse.Namespace) -> None:
    """The Slurm flags themselves; raises ConfigError naming the flag."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: must be at least 1")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {args.gpus_per_node}: must be at least 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
    if not _TIME.match(args.time):
        raise ConfigError(f"--time {args.time!r}: valid forms: MINUTES, HH:MM:SS, DAYS-HH[:MM[:SS]]")
    for flag, value in (("--job-name", args.job_name), ("--partition", args.partition), ("--account", args.account),
                        ("--mem", args.mem)):
        if value is not None and not _SLURM_WORD.match(value):
            raise ConfigError(f"{flag} {value!r}: letters, digits and _.,:+=@%- only (no spaces or quotes)")
    for arg in args.sbatch_args:
        if not arg.startswith("-") or any(c in arg for c in "\n\r#"):
            raise ConfigError(f"--sbatch-arg {arg!r}: one sbatch option such as --qos=high (no newlines or '#')")
    if args.setup is not None:
        setup_text(args.setup)  # a missing @FILE fails here


def setup_text(value: str) -> str:
    """--setup: the lines themselves, or @FILE's contents."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--setup {value}: cannot read it ({err.strerror})") from None


def resolve_cluster_job(args: argparse.Namespace) -> ResolvedJob:
    """`generate`'s resolution of this job on nodes x GPUs-per-node ranks, with every Ulysses
    group inside one node (its all-to-alls run every layer). The GPUs are on the cluster: no
    device memory to plan for here, and output paths are checked there."""
    cfg = run_config_from_args(args)
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    if cfg.model_dir is not None:  # the folder must exist here too (it is validated, then passed on)
        from models import get_family

        family = get_family(cfg.preset)
        family.check_model_dir(cfg.model_dir, family.config(cfg.preset))
    return resolve_job(cfg, world=args.nodes * args.gpus_per_node, device=device,
                       gpus_per_node=args.gpus_per_node, check_files=False)


def passthrough_args(args: argparse.Namespace) -> list[str]:
    """`generate`'s flags that differ from their defaults, as argv (unquoted). Paths that were
    validated here (model dir, prompts file, compile cache) are made absolute, so the job reads the
    same files."""
    probe = argparse.ArgumentParser(add_help=False)
    add_generate_args(probe)
    out: list[str] = []
    for action in probe._actions:
        value = getattr(args, action.dest)
        if action.dest in _NOT_PASSED or value is None or value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
            continue
        if isinstance(value, Path) and action.dest in ("model_dir", "prompts_file", "compile_cache"):
            value = value.resolve()
        out += [flag, str(value)]
    return out


def render_command(args: argparse.Namespace) -> str:
    """The `python -m launcher slurm ...` line that renders this job again (without -o/--submit)."""
    argv = ["--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node)]
    for flag, value in (("--partition", args.partition), ("--account", args.account), ("--time", args.time),
                        ("--job-name", args.job_name), ("--cpus-per-task", args.cpus_per_task), ("--mem", args.mem),
                        ("--setup", args.setup)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [f"--sbatch-arg={a}" for a in args.sbatch_args]
    argv += passthrough_args(args)
    if args.output_dir != Path("outputs"):
        argv += ["--output-dir", str(args.output_dir)]
    for flag, value in (("--ulysses", args.ulysses), ("--ring", args.ring)):
        if value is not None:
            argv += [flag, str(value)]
    return "python -m launcher slurm " + shlex.join(argv)


def build_job(args: argparse.Namespace) -> SbatchJob:
    """Validate everything (raises ConfigError) and describe the batch job."""
    check_job_args(args)
    job = resolve_cluster_job(args)
    topo: Topology = job.topology.topology
    reason = job.reason
    gpus = args.device != "cpu"
    cpus = args.cpus_per_task or (4 * args.gpus_per_node if gpus else args.gpus_per_node)
    return SbatchJob(
        job_name=args.job_name, nodes=args.nodes, procs_per_node=args.gpus_per_node, gpus=gpus,
        cpus_per_task=cpus, time=args.time, partition=args.partition, account=args.account,
        output_dir=str(args.output_dir),
        generate_args=(*passthrough_args(args), "--ulysses", str(topo.ulysses), "--ring", str(topo.ring)),
        topology=(f"dp {topo.dp}, cfg {topo.cfg}, ring {topo.ring}, ulysses {topo.ulysses} "
                  f"({topo.sp_label}) on {args.nodes * args.gpus_per_node} ranks"),
        reason=f"Chosen by {reason}.",
        ulysses=topo.ulysses,
        command=render_command(args),
        file=str(_target(args) or "FILE.sbatch"),
        model=job.cfg.preset,
        mem=args.mem,
        sbatch_args=tuple(args.sbatch_args),
        setup=None if args.setup is None else setup_text(args.setup),
    )


def _target(args: argparse.Namespace) -> Path | None:
    if args.output_file is not None:
        return args.output_file
    return Path(f"slurm-{args.job_name}.sbatch") if args.submit else None


def submit(path: Path) -> int:
    """`sbatch PATH` (logs/ made first: Slurm cannot create the log's folder); prints its answer."""
    if shutil.which("sbatch") is None:
        print(f"error: --submit: sbatch is not on PATH (not a Slurm login node?); "
              f"{path} is written, submit it where Slurm is: sbatch {path}", file=sys.stderr)
        return 1
    Path("logs").mkdir(exist_ok=True)
    proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def run_slurm(args: argparse.Namespace) -> int:
    """Render (print or write) and optionally submit; ConfigError propagates (exit 2)."""
    text = render_sbatch(build_job(args))
    target = _target(args)
    if target is None:
        sys.stdout.write(text)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    target.chmod(0o755)
    if not args.submit:
        print(f"wrote {target}; submit it with: mkdir -p logs && sbatch {target}", file=sys.stderr)
        return 0
    return submit(target)
