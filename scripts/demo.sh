#!/usr/bin/env bash
# The demo: on a fresh machine, set up .venv and generate a short video with the tiny preset on
# the CPU (random weights, built-in text encoder: a noise video, but every phase runs for real).
# Ends with the path of the video it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/setup_env.sh
"$VENV/bin/python" -m launcher generate --preset tiny --prompt "A cat walks on the grass" \
  --seed 42 --output-dir outputs/demo --save-grid --overwrite "$@"
