"""Entry point: `python -m launcher generate ...`, also under `torchrun ... -m launcher`."""

from __future__ import annotations

import sys

from models import ModelInputError

from .cli import build_parser, run_config_from_args

from .config import ConfigError
from .pipeline import NonFiniteLatents
from .slurm_env import apply_slurm_env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            from .plan import run_plan

            return run_plan(args)
        if args.command == "slurm":
            from .slurm import run_slurm

            return run_slurm(args)
        if args.command == "sweep":
            from .sweep import run_sweep

            return run_sweep(args)
        if args.command == "generate":
            from .job import run_generate

            apply_slurm_env()  # `srun python -m launcher generate` without torchrun

            cfg = run_config_from_args(args)
            for out in run_generate(cfg):
                print(out)
            return 0
    except (ConfigError, ModelInputError) as err:  # bad input (arguments, weight folders): nothing ran
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLatents as err:  # the run diverged: say where, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
