#!/usr/bin/env bash
# Device-machine experiment for the ring (issue 4): native attention at 720x1280x129 on 4 GPUs,
# 4x1 and 1x4, with the ring groups' NCCL CTAs capped (LAUNCHER_RING_MAX_CTAS) or not, one run
# profiled. Usage: scripts/gpu_ring_ctas.sh KIND     Results: $OUT/attention.jsonl, logs.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${1:-unknown}
OUT=${OUT:-outputs}
mkdir -p "$OUT"
run() {  # run TAG ARGS...
  local tag=$1; shift
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=4 scripts/gpu_attention_check.py \
    --kind "$KIND" --skip-correctness --backends native --iters 10 "$@" > "$OUT/ring_$tag.txt" 2>&1
  echo "== $tag (LAUNCHER_RING_MAX_CTAS=${LAUNCHER_RING_MAX_CTAS:-16}; 0 = NCCL default): exit $?"
  grep -E "^(bench|\|)" "$OUT/ring_$tag.txt"
}
run profile --factorisations 1x4 --profile
for ctas in 0 16 8 4; do
  export LAUNCHER_RING_MAX_CTAS=$ctas
  run "ctas_$ctas" --factorisations 4x1,2x2,1x4 --jsonl "$OUT/attention.jsonl"
done
