#!/usr/bin/env bash
# The demo: on a fresh machine, set up .venv and generate a short video with the demo model (a small
# HunyuanVideo trained here on procedural videos, shipped in models/demo/) on 2 CPU processes
# (torchrun over gloo, Ulysses 2). Prompts of its grammar: "a <colour> <shape> <motion>", colours
# red green blue yellow purple cyan, shapes circle square triangle, motions moves left/right/up/down,
# grows, shrinks. Ends with the path of the video. Extra arguments go to `generate` (e.g.
# --prompt "a blue square shrinks", or --preset tiny for random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/setup_env.sh
# One intra-op thread per process (what torchrun would choose, without its banner about it).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" \
  -m launcher generate --preset hunyuan-video-demo --prompt "a red circle moves right" --device cpu --ulysses 2 \
  --seed 42 --output-dir outputs/demo --save-grid --overwrite "$@"
