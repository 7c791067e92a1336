#!/usr/bin/env bash
# Each injected fault (exit, raise, oom, hang) on rank 1 of a 2-rank NCCL job on the lent machine
# (2 GPUs), the 2-block preset at 720p on random weights, 4 steps, the fault at step 2, a 60 s
# collective timeout: time to exit, exit code, files left, stray processes (docs/RELIABILITY.md).
# Results: $OUT/fault_matrix.jsonl; the table printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_SCRIPT=faults source scripts/gpu_env.sh
nvidia-smi -L
python3 scripts/fault_matrix.py --out "$OUT" --device cuda --nproc "${NPROC:-2}" --preset hunyuan-video-2block \
  --random-weights --size 720x1280 --frames 129 --steps 4 --step 2 --rank 1 --timeout "${TIMEOUT:-60}" "$@"
