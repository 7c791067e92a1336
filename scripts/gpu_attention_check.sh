#!/usr/bin/env bash
# One device-machine call: GPU kernel tests, then scripts/gpu_attention_check.py on 4 and 2 GPUs.
# Run from the repo root on the GPU machine:  scripts/gpu_attention_check.sh KIND [script options]
# Carried wheels in .whl/ (yunchang, xfuser and its imports) are installed to /tmp/site first.
# Results: $OUT/attention.jsonl (or outputs/attention.jsonl) and logs beside it.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${1:-unknown}
shift || true
OUT=${OUT:-outputs}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_parallel_kernels.py 2>&1 | tail -4
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
for n in 4 2; do
  [ "$n" -le "$NGPU" ] || continue
  timeout 270 python3 -m torch.distributed.run --nproc_per_node="$n" scripts/gpu_attention_check.py \
    --kind "$KIND" --jsonl "$OUT/attention.jsonl" "$@" > "$OUT/log_w$n.txt" 2>&1
  echo "== $n GPUs: exit $?"
  grep -E "^(world|correctness|bench|\|)" "$OUT/log_w$n.txt"
done
