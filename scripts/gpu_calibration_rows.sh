#!/usr/bin/env bash
# One-GPU sweep rows for the step-time model (plan --predict): Wan2.1 14B and 1.3B at their release
# sizes (they calibrate Wan's token-wise rate) and HunyuanVideo 13B at a size the calibration has
# not seen (544x960x65: a check of the prediction, not an input). Random weights, DiT only,
# 2 steps of which 1 is warm-up. Rows land in $OUT/sweep.jsonl; a short table last.
# Usage: scripts/gpu_calibration_rows.sh [machine-kind]
set -uo pipefail
GPU_SCRIPT=gpu_calibration_rows source "$(dirname "$0")/gpu_env.sh"
MACHINE=${1:-nvidia-h200}
for spec in "wan2.1-t2v-14b 720x1280x81" "wan2.1-t2v-1.3b 480x832x81" "hunyuan-video-13b 544x960x65"; do
  set -- $spec
  python3 -m launcher sweep --preset "$1" --sizes "$2" --gpus 1 --backends native --steps 2 --warmup 1 \
    --timeout 240 --device cuda --no-video --machine "$MACHINE" --output-dir "$OUT/sweep_$1" \
    --append-jsonl "$OUT/sweep.jsonl" > "$OUT/sweep_$1.log" 2>&1
  echo "$1 $2: sweep exit $?"
done
python3 - "$OUT/sweep.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['model']:>18} {r['size']}x{r['frames']} g{r['gpus']} {r['ulysses']}x{r['ring']} cfg {r.get('cfg')} "
          f"scale {r.get('cfg_scale')} kernel {r['kernel']}: {r['status']} {r['seconds'] or 0:.3f} s/step")
PY
