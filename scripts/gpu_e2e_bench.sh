#!/usr/bin/env bash
# End to end on the GPU machine (issue 17): launch to mp4 of the 13B preset (random weights), exact
# and with each step cache, one device-machine call. Per run: the wall time seen from outside (the
# process start included), the record's phases (text, DiT load, denoise, VAE load and decode,
# write), s/step, the computed and skipped steps, and the latents against the exact run.
# Usage: scripts/gpu_e2e_bench.sh KIND [NAME ...]   (NAMEs from the table below; default: all but
# the *_all ones). Env: NPROC (1; >1 runs torchrun on that many GPUs), SIZE (544x960), FRAMES (129),
# STEPS (50), PRESET (hunyuan-video-13b), EXTRA (flags for every run), RUN_TIMEOUT (seconds per run, 580).
# The *_all runs skip every step but the first and last (threshold 1e9): what a skipped step costs.
# Random weights say nothing about a cache's quality or its real skip rate (docs/BENCHMARKS.md has
# the cost in PSNR on the trained demo model); the default thresholds' skip counts here are only
# what random weights give.
# Results: $OUT/e2e.jsonl, $OUT/e2e_runs.tgz (records and logs), the table last.
set -uo pipefail
GPU_SCRIPT=gpu_e2e
source scripts/gpu_env.sh
KIND=${1:-unknown}
shift || true
RUNS="$OUT/runs"
mkdir -p "$RUNS"
NPROC=${NPROC:-1}
COMMON=(--preset "${PRESET:-hunyuan-video-13b}" --random-weights --size "${SIZE:-544x960}" --frames "${FRAMES:-129}"
        --steps "${STEPS:-50}" --seed 3 --save-latents --overwrite)
declare -A ARGS=(
  [exact]=""
  [teacache]="--cache teacache"
  [fbcache]="--cache fbcache"
  [compile]="--compile"
  [teacache_all]="--cache teacache --cache-threshold 1e9"
  [fbcache_all]="--cache fbcache --cache-threshold 1e9"
)
ORDER=(exact teacache fbcache)
[ $# -gt 0 ] && ORDER=("$@")
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" -m launcher)
else
  LAUNCH=(python3 -m launcher)
fi
for name in "${ORDER[@]}"; do
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # ARGS and EXTRA values are flag lists
  timeout "${RUN_TIMEOUT:-580}" "${LAUNCH[@]}" generate --prompt "a red fox runs through the snow" \
    --output-dir "$RUNS/$name" "${COMMON[@]}" ${ARGS[$name]} ${EXTRA:-} > "$RUNS/$name.log" 2>&1
  code=$?
  end=$(date +%s.%N)
  wall=$(python3 -c "print(round($end - $start, 3))")
  echo "{\"exit\": $code, \"wall_s\": $wall}" > "$RUNS/$name.wall.json"
  echo "$name: exit $code in $wall s"
done
python3 scripts/gpu_e2e_summary.py --runs "$RUNS" --kind "$KIND" --jsonl "$OUT/e2e.jsonl" > "$OUT/e2e_table.md"
tar czf "$OUT/e2e_runs.tgz" --exclude='*.safetensors' --exclude='*.mp4' -C "$OUT" runs && rm -rf "$RUNS"
cat "$OUT/e2e_table.md"
