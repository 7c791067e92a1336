#!/usr/bin/env bash
# One device-machine call (4-GPU node, repo root): the pipelined Ulysses all-to-alls. The 13B
# preset (random weights) at 4x1 with the fused text path in 1 (no overlap), 2 and 3 head chunks
# (LAUNCHER_ULYSSES_CHUNKS), at 544x960x129 and 720x1280x129, and the 1-GPU runs of both sizes
# (side by side on GPUs 0 and 1) for the parallel efficiency in the same call. DiT only.
# Usage: scripts/gpu_ulysses_chunks.sh KIND [CHUNKS...]   Env: STEPS (3), RUN_TIMEOUT (120 s per run).
# Results: $OUT/chunks.jsonl, $OUT/chunks_runs.tgz (records and logs), the table on stdout.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${1:-unknown}
shift || true
CHUNKS=("$@")
[ ${#CHUNKS[@]} -eq 0 ] && CHUNKS=(1 2 3)
OUT=${OUT:-outputs/gpu_chunks}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
COMMON=(--preset hunyuan-video-13b --random-weights --frames 129 --seed 3 --no-video --overwrite --prompt "a red fox in the snow")
gen() {  # NAME GPUS SIZE STEPS: one run, its log beside its folder
  local name=$1 gpus=$2 size=$3 steps=$4
  timeout "${RUN_TIMEOUT:-120}" python3 -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m launcher generate \
    --output-dir "$RUNS/$name" --size "$size" --steps "$steps" "${COMMON[@]}" > "$RUNS/$name.log" 2>&1
  echo "$name: exit $?"
}
# The 1-GPU baselines, one per GPU, at the same time (each is its own process on its own GPU).
CUDA_VISIBLE_DEVICES=0 gen g1_544x960 1 544x960 2 &
CUDA_VISIBLE_DEVICES=1 gen g1_720x1280 1 720x1280 2 &
wait
for size in 544x960 720x1280; do
  for c in "${CHUNKS[@]}"; do
    LAUNCHER_ULYSSES_CHUNKS=$c gen "g4_${size}_chunks$c" 4 "$size" "${STEPS:-3}"
  done
done
python3 scripts/gpu_chunks_summary.py --runs "$RUNS" --kind "$KIND" --jsonl "$OUT/chunks.jsonl"
tar czf "$OUT/chunks_runs.tgz" --exclude='*.safetensors' -C "$OUT" runs && rm -rf "$RUNS"
