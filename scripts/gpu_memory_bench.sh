#!/usr/bin/env bash
# One device-machine call for the memory placements (issue 6), run from the repo root on a 4-GPU
# node: the 13B preset (random weights) at 720x1280x129 on 4 GPUs, 3 steps each, as plain bf16,
# every block streamed, FP8 storage, FP8 matmul and under a 24 GiB budget; then 544x960x129 plain
# and under a 12 GiB budget. The DiT only (--no-video): the VAE's memory is benchmarked apart.
# Usage: scripts/gpu_memory_bench.sh KIND [NAME ...]   Env: STEPS (3), RUN_TIMEOUT (200 s per run).
# Results: $OUT/memory.jsonl, $OUT/memory_runs.tgz (records and logs), the table on stdout.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${1:-unknown}
shift || true
OUT=${OUT:-outputs/gpu_memory}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
df -h /dev/shm | tail -1
COMMON=(--preset hunyuan-video-13b --random-weights --frames 129 --steps "${STEPS:-3}" --seed 3 --no-video --overwrite)
declare -A ARGS=(
  [plain]="--size 720x1280"
  [stream_all]="--size 720x1280 --stream-blocks 60"
  [fp8_storage]="--size 720x1280 --fp8 storage"
  [fp8_matmul]="--size 720x1280 --fp8 matmul"
  [budget_24gib]="--size 720x1280 --max-gpu-memory 24GiB"
  [plain_544]="--size 544x960"
  [budget_12gib_544]="--size 544x960 --max-gpu-memory 12GiB"
)
ORDER=(plain stream_all fp8_storage fp8_matmul budget_24gib plain_544 budget_12gib_544)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  start=$(date +%s)
  # shellcheck disable=SC2086  # ARGS values are flag lists
  timeout "${RUN_TIMEOUT:-200}" python3 -m torch.distributed.run --standalone --nproc_per_node=4 -m launcher generate \
    --prompt "a red fox in the snow" --output-dir "$RUNS/$name" "${COMMON[@]}" ${ARGS[$name]} \
    > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - start )) s"
done
python3 scripts/gpu_memory_summary.py --runs "$RUNS" --kind "$KIND" --jsonl "$OUT/memory.jsonl"
# The device tool returns at most 8 files: the records and logs travel as one archive.
tar czf "$OUT/memory_runs.tgz" --exclude='*.safetensors' -C "$OUT" runs && rm -rf "$RUNS"
