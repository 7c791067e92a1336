#!/usr/bin/env bash
# Train the demo model on one GPU of the lent machine and write it under $OUT in the release's
# layout (transformers/, vae/) with train_log.jsonl and train_summary.json (the held-out check).
# One call of at most 10 minutes trains the VAE and starts the DiT (BUDGET_MINUTES); a second call
# with RESUME=1 on the still-warm machine continues the DiT's schedule (DIT_MINUTES of training in
# all) from the checkpoint in /tmp/demo-work, and refuses at once if that checkpoint is gone.
# THROUGHPUT=1 measures training steps/s instead (batch sizes, eager and compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_SCRIPT=train_demo source scripts/gpu_env.sh
WORK=/tmp/demo-work
if [ "${THROUGHPUT:-0}" = 1 ]; then
  exec python3 scripts/train_demo.py --throughput --out "$OUT" "$@"
fi
if [ "${RESUME:-0}" = 1 ] && [ ! -f "$WORK/dit.pt" ]; then
  echo "gpu_train_demo: RESUME=1 but $WORK/dit.pt is gone (a fresh machine): nothing to continue" >&2
  exit 3
fi
python3 scripts/train_demo.py --out "$OUT" --work "$WORK" --vae-steps 100000 --dit-steps 1000000 \
  --vae-minutes "${VAE_MINUTES:-5}" --dit-minutes "${DIT_MINUTES:-11.2}" --budget-minutes "${BUDGET_MINUTES:-9.3}" \
  ${INIT:+--init "$INIT"} "$@" 2>&1 | tee "$OUT/train_stdout.log"
