"""Entry point: `python -m launcher generate ...`, also under `torchrun ... -m launcher`."""

from __future__ import annotations

import os
import signal
import sys
import time

from models import ModelInputError

from .cli import build_parser, run_config_from_args

from .config import ConfigError
from .pipeline import NonFiniteLatents, RankFailure
from .slurm_env import apply_slurm_env


class Terminated(BaseException):
    """SIGTERM, what Slurm (preemption, time limit, scancel) and torchrun send to stop a job: raised
    in the main thread so the job unwinds like Ctrl-C (temporary files removed, communicators
    aborted) instead of dying mid-write. A BaseException, so that no `except Exception` stops it."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            from .plan import run_plan

            return run_plan(args)
        if args.command == "slurm":
            from .slurm import run_slurm

            return run_slurm(args)
        if args.command == "calibrate":
            from .predict import run_calibrate

            return run_calibrate(args)
        if args.command == "quality":
            from .quality import run_quality

            return run_quality(args)
        if args.command == "sweep":
            from .sweep import run_sweep

            return run_sweep(args)
        if args.command == "generate":
            from .job import run_generate

            apply_slurm_env()  # `srun python -m launcher generate` without torchrun
            signal.signal(signal.SIGTERM, _terminated)

            cfg = run_config_from_args(args)
            for out in run_generate(cfg):
                print(out)
            return 0
    except (ConfigError, ModelInputError) as err:  # bad input (arguments, weight folders): nothing ran
        report_bad_input(err)
        return 2
    except NonFiniteLatents as err:  # the run diverged: say where, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RankFailure as err:  # one rank's own failure: its line, with its rank
        print(f"error: [rank {os.environ.get('RANK', '0')}] {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal: one line, not N tracebacks
        if int(os.environ.get("RANK", "0")) == 0:
            print("interrupted (files are written whole or not at all)", file=sys.stderr)
        return 130
    except Terminated:  # torchrun forwards SIGTERM to every rank: one line, 128 + 15 as a shell reports it
        if int(os.environ.get("RANK", "0")) == 0:
            print("terminated by SIGTERM (files are written whole or not at all)", file=sys.stderr)
        return 143
    raise AssertionError(f"unhandled command {args.command}")


# How long a rank other than 0 waits before reporting bad input itself (see report_bad_input).
BAD_INPUT_GRACE_S = 3.0


def report_bad_input(err: Exception) -> None:
    """One message per job. Every rank validates the same arguments before any collective and
    fails alike, so rank 0 prints at once and exits 2; torchrun then stops the other ranks while
    they wait here, quietly. A rank whose error rank 0 did not share (a fault of its own node)
    is still running after the grace period and prints its message, with its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {err}", file=sys.stderr)
        return
    time.sleep(BAD_INPUT_GRACE_S)
    print(f"[rank {rank}] error: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
