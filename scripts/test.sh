#!/usr/bin/env bash
# The test command (CI runs it through .ci/run): set up .venv on a fresh machine, run the suite.
# Usage: scripts/test.sh [--fast] [pytest args...]
#   --fast: the quick tier (no multi-process, Slurm or slow tests; about a minute on 2 cores),
#           for the edit-test loop; CI runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/setup_env.sh
# The one-machine Slurm cluster test needs Debian's slurm and munge packages. Installing system
# packages is opt-in (CI opts in through .ci/run): VIDEODIT_INSTALL_SLURM=1 scripts/test.sh.
if [ "${VIDEODIT_INSTALL_SLURM:-0}" = 1 ]; then
  scripts/setup_slurm.sh  # never fatal
fi
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not multiprocess and not slurm and not slow" "$@"
fi
set +e
"$VENV/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
