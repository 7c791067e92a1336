#!/usr/bin/env bash
# Benchmark sweep over sizes, GPU counts, topologies and attention backends (launcher/sweep.py).
#   scripts/sweep.sh --sweep configs/sweeps/hunyuan_video_4gpu.yaml --output-dir outputs/sweep
#   scripts/sweep.sh --sweep configs/sweeps/tiny_cpu.yaml --output-dir outputs/sweep_cpu
# All arguments go to `python -m launcher sweep` (--help lists them). Exit: 0 all ran, 1 some
# configuration failed (outputs still written), 2 bad input.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink SHARP / multicast stay off: some shared nodes do not support them and hang at init.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec "${PYTHON:-python3}" -m launcher sweep "$@"
