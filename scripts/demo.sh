#!/usr/bin/env bash
# The demo: on a fresh machine, set up .venv and generate a short video with the tiny preset on
# 2 CPU processes (torchrun over gloo, Ulysses 2): random weights and the built-in text encoder,
# so the picture is noise, but every phase runs for real. Ends with the path of the video.
# Extra arguments go to `generate` (e.g. --size 128x192 --frames 17).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/setup_env.sh
# One intra-op thread per process (what torchrun would choose, without its banner about it).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" \
  -m launcher generate --preset tiny --prompt "A cat walks on the grass" \
  --seed 42 --output-dir outputs/demo --save-grid --overwrite "$@"
