#!/usr/bin/env bash
# Train the demo model on one GPU of the lent machine and write it under $OUT in the release's
# layout (transformers/, vae/) with train_log.jsonl and train_summary.json (the held-out check).
# Time-bounded phases (VAE_MINUTES, DIT_MINUTES, and BUDGET_MINUTES for the whole run) so that one
# call of at most 10 minutes does it;
# INIT=DIR continues the DiT from weights an earlier call wrote (docs/DEMO_MODEL.md).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_SCRIPT=train_demo source scripts/gpu_env.sh
python3 scripts/train_demo.py --out "$OUT" --work /tmp/demo-work --vae-steps 100000 --dit-steps 1000000 \
  --vae-minutes "${VAE_MINUTES:-3}" --dit-minutes "${DIT_MINUTES:-7}" --budget-minutes "${BUDGET_MINUTES:-9.2}" ${INIT:+--init "$INIT"} "$@" 2>&1 | tee "$OUT/train_stdout.log"
