#!/usr/bin/env bash
# One device-machine call for low memory on ONE GPU (issue 19), run from the repo root on one H200:
# the 13B preset (random weights) at 384x512x129 and 720x1280x129, plain and under the planner's
# --max-gpu-memory 6GiB and 12GiB (layer streaming + token chunks), STEPS steps each, one process
# (no torchrun: no NCCL). The DiT only (--no-video; the VAE's decode memory is benchmarked apart):
# the latents are saved, so the summary compares each budgeted run with its plain run.
# Usage: scripts/gpu_lowmem_bench.sh KIND [NAME ...]   Env: STEPS (2), RUN_TIMEOUT (90 s at 384x512,
# 60 s more at 720x1280: 8 minutes at worst). About 5 minutes on one H200 (a 720p step is ~23 s).
# Results: $OUT/lowmem.jsonl, $OUT/lowmem_runs.tgz (records, plans and logs), the table last.
set -uo pipefail
GPU_SCRIPT=gpu_lowmem
source scripts/gpu_env.sh
KIND=${1:-unknown}
shift || true
RUNS="$OUT/runs"
mkdir -p "$RUNS"
COMMON=(--preset hunyuan-video-13b --random-weights --frames 129 --steps "${STEPS:-2}" --seed 3 --no-video --overwrite)
declare -A ARGS=(
  [plain_384]="--size 384x512"
  [budget_6gib_384]="--size 384x512 --max-gpu-memory 6GiB"
  [plain_720]="--size 720x1280"
  [budget_12gib_720]="--size 720x1280 --max-gpu-memory 12GiB"
)
ORDER=(plain_384 budget_6gib_384 plain_720 budget_12gib_720)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  limit=${RUN_TIMEOUT:-90}
  [[ ${ARGS[$name]} == *720x1280* ]] && limit=$((limit + 60))
  # shellcheck disable=SC2086  # ARGS values are flag lists
  python3 -m launcher plan --gpus 1 --frames 129 ${ARGS[$name]} > "$RUNS/$name.plan.txt" 2>&1
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m launcher generate --prompt "a red fox in the snow" --output-dir "$RUNS/$name" \
    "${COMMON[@]}" ${ARGS[$name]} > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s"
done
# The device tool returns at most 8 files: the records, plans and logs travel as one archive.
python3 scripts/gpu_lowmem_summary.py --runs "$RUNS" --kind "$KIND" --jsonl "$OUT/lowmem.jsonl" > "$OUT/lowmem_table.md"
tar czf "$OUT/lowmem_runs.tgz" --exclude='*.safetensors' -C "$OUT" runs && rm -rf "$RUNS"
cat "$OUT/lowmem_table.md"
