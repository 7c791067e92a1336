#!/usr/bin/env bash
# The whole test suite on a GPU node (the lent machine has no network, so the project is not
# pip-installed: the tests import it from the checkout, as scripts/test.sh's editable install
# does). The Slurm tier is left out (no Slurm there). Results: $OUT/suite.log (summary last).
# Usage: scripts/gpu_suite.sh [pytest args and paths...]   (default: tests; the suite takes about
# 20 minutes on one H200 and a command there has 10, so run it in parts: name the test files)
set -uo pipefail
GPU_SCRIPT=gpu_suite source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L
# SIGINT at the limit: pytest then stops like a Ctrl-C and still prints which tests failed. The
# default 500 s (+30 s to finish) leaves the 10-minute command time to install the carried wheels.
timeout -s INT -k 30 "${SUITE_TIMEOUT:-500}" python3 -m pytest -q -rfEs -m "not slurm" -p no:cacheprovider --durations=10 "${@:-tests}" \
  > "$OUT/suite.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -30
tail -n 1 "$OUT/suite.log"
echo "pytest exit $rc"
