#!/usr/bin/env bash
# Wan2.1 on one GPU: the Wan tests on a GPU node (they pin CPU/fp32), then the 14B preset (random
# weights) at its release size 1280x720x81 for a few steps: seconds per step (both CFG passes)
# and the device peak. Results under $OUT; a short table last.
# Usage: scripts/gpu_wan_check.sh [steps]
set -uo pipefail
GPU_SCRIPT=gpu_wan_check source "$(dirname "$0")/gpu_env.sh"
STEPS=${1:-3}
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider -m "not slurm" tests/test_wan_dit.py tests/test_wan_parallel.py > "$OUT/tests.log" 2>&1
echo "wan tests: $(tail -n 1 "$OUT/tests.log")"
python3 -m launcher generate --preset wan2.1-t2v-14b --random-weights --prompt "a cat walks on the grass" \
  --steps "$STEPS" --seed 1 --no-video --output-dir "$OUT/wan14b" > "$OUT/wan14b.log" 2>&1
echo "generate exit $?"; tail -n 3 "$OUT/wan14b.log"
python3 - "$OUT/wan14b" <<'PY'
import json, pathlib, statistics, sys
for rec in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(rec.read_text())
    steps = r["step_s"]
    print(f"{r['model']['preset']} {r['size'][0]}x{r['size'][1]}x{r['frames']} cfg {r['cfg_scale']} "
          f"kernel {(r.get('attention') or {}).get('kernel')}: steps {['%.2f' % s for s in steps]} "
          f"median from step 2 {statistics.median(steps[1:] or steps):.2f} s/step, "
          f"peak allocated {r['peak_memory'].get('gpu_allocated_gib', 0):.1f} GiB")
PY
