#!/usr/bin/env bash
# One device-machine call of the benchmark sweep (run from the repo root on the 4-GPU node):
# the 13B preset (random weights) on 1, 2 and 4 GPUs, every ulysses x ring, backends native,
# xfuser (as the release runs it: flash-attn if installed, else torch's flash kernel) and
# xfuser-cudnn (xfuser with torch's cuDNN at ring 1); 2 steps of which 1 is warm-up, no VAE,
# configurations packed side by side on disjoint GPUs (configs/sweeps/hunyuan_video_4gpu.yaml).
#
# Usage: scripts/gpu_sweep.sh [SIZES] [more `launcher sweep` flags]
#   scripts/gpu_sweep.sh 720x1280x129              # one size per device call
#   scripts/gpu_sweep.sh 544x960x129
#   scripts/gpu_sweep.sh 720x1280x129 --gpus 1,2   # or split one size in two calls ...
#   scripts/gpu_sweep.sh 720x1280x129 --gpus 4     # ... and merge: sweep --report-from A/runs.jsonl B/runs.jsonl
# SIZES defaults to both sizes (too long for one 10-minute call). Env: KIND (machine name for the
# rows, default nvidia-h200-x4), LIMIT (seconds this script may take, default 560: the sweep
# stops starting and kills runs before it, then still writes its report).
# Results: $OUT/sweep_<sizes>/ (runs.jsonl, table.md, step_time.png, efficiency.png when
# matplotlib is installed, topology.yaml, runs/*/log.txt) and $OUT/sweep.jsonl (measured rows).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${KIND:-nvidia-h200-x4}
LIMIT=${LIMIT:-560}
OUT=${OUT:-outputs}
SIZES=720x1280x129,544x960x129
mkdir -p "$OUT"
if [[ ${1:-} =~ ^[0-9]+x[0-9]+x[0-9]+(,[0-9]+x[0-9]+x[0-9]+)*$ ]]; then SIZES=$1; shift; fi
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: xfuser 0.4.5, yunchang 0.6.4, diffusers and its imports
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
BACKENDS=native,xfuser,xfuser-cudnn
if ! WHY=$(python3 -c 'import xfuser.core.long_ctx_attention' 2>&1); then
  echo "xfuser does not import here, so the anchor is yunchang: $(echo "$WHY" | tail -1)"
  BACKENDS=native,yunchang
fi
python3 -c 'import flash_attn' 2>/dev/null && echo "flash-attn: installed (release kernel: fa)" \
  || echo "flash-attn: not installed (release kernel: torch_flash)"
DIR="$OUT/sweep_${SIZES//,/_}"
python3 -m launcher sweep --sweep configs/sweeps/hunyuan_video_4gpu.yaml --sizes "$SIZES" --backends "$BACKENDS" \
  --machine "$KIND" --budget $((LIMIT - SECONDS)) --output-dir "$DIR" --append-jsonl "$OUT/sweep.jsonl" "$@" \
  > "$DIR.log" 2>&1
echo "sweep exit $? (0: all ran, 1: some configuration failed, 2: bad input); log $DIR.log"
grep -E "^  [0-9]+x|^note:|^error:" "$DIR.log"
cat "$DIR/table.md" 2>/dev/null
