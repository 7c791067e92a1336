#!/usr/bin/env bash
# The whole test suite on a GPU node (the lent machine has no network, so the project is not
# pip-installed: the tests import it from the checkout, as scripts/test.sh's editable install
# does). The Slurm tier is left out (no Slurm there). Results: $OUT/suite.log (summary last).
# Usage: scripts/gpu_suite.sh [pytest args...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_suite}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (PyAV, yunchang, diffusers)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
timeout "${SUITE_TIMEOUT:-560}" python3 -m pytest -q -rfEs -m "not slurm" -p no:cacheprovider --durations=10 "$@" tests \
  > "$OUT/suite.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -30
tail -n 1 "$OUT/suite.log"
echo "pytest exit $rc"
