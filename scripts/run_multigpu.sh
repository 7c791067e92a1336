#!/usr/bin/env bash
# The usual entry on a GPU node: one torchrun over this node's GPUs.
#   scripts/run_multigpu.sh [NGPUS] -- generate arguments...
# e.g. scripts/run_multigpu.sh 8 -- --model-dir ckpts --prompt "A cat walks on the grass" \
#        --size 720x1280 --frames 129 --seed 42
# NGPUS defaults to every visible GPU. The topology comes from configs/topology/ unless
# --ulysses/--ring/--cfg/--dp are given; `python -m launcher plan --gpus N ...` shows it first.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ $# -gt 0 ] && [ "$1" != "--" ]; then NGPUS=$1; shift; fi
[ "${1:-}" = "--" ] && shift
# NVLink SHARP / multicast stay off: some shared nodes do not support them and hang at init.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PY=${PYTHON:-python3}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m launcher generate "$@"
