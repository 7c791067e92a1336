#!/usr/bin/env bash
# One device-machine call for the distributed `generate` (run from the repo root on a 4-GPU node):
#  1. equality in bf16: the 2-block preset (release widths, 24 heads) at 528x976x33 (18,117 tokens:
#     uneven on 2 and 4 GPUs), 4 steps, on 1 GPU and under torchrun on 2 and 4 GPUs for every
#     factorisation, plus CFG-parallel on 4 GPUs against CFG on 1 GPU; latents compared;
#  2. one timed generation of the 13B preset (random weights) at 720x1280x129, 2 steps, 4 GPUs.
# Usage: scripts/gpu_generate_check.sh KIND     Results: $OUT/generate.jsonl, logs, summary table.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
KIND=${1:-unknown}
OUT=${OUT:-outputs/gpu_generate}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (PyAV for the mp4 writer)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
RUNS="$OUT/runs"
mkdir -p "$RUNS"
SMALL=(--preset hunyuan-video-2block --size 528x976 --frames 33 --steps 4 --seed 3 --save-latents --overwrite)
CFGARGS=(--negative-prompt "blurry, low quality" --cfg-scale 4)
gen() {  # gen NAME NPROC ARGS...: one launch, its log in $RUNS/NAME.log
  local name=$1 n=$2; shift 2
  if [ "$n" -eq 1 ]; then
    timeout 300 python3 -m launcher generate --prompt "a red fox in the snow" --output-dir "$RUNS/$name" "$@" \
      > "$RUNS/$name.log" 2>&1
  else
    timeout 400 python3 -m torch.distributed.run --standalone --nproc_per_node="$n" -m launcher generate \
      --prompt "a red fox in the snow" --output-dir "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  fi
  echo "$name: exit $?"
}
gen single 1 "${SMALL[@]}"
gen single_cfg 1 "${SMALL[@]}" "${CFGARGS[@]}"
gen u2r1 2 "${SMALL[@]}" --ulysses 2 --ring 1
gen u1r2 2 "${SMALL[@]}" --ulysses 1 --ring 2
gen u4r1 4 "${SMALL[@]}" --ulysses 4 --ring 1
gen u2r2 4 "${SMALL[@]}" --ulysses 2 --ring 2
gen u1r4 4 "${SMALL[@]}" --ulysses 1 --ring 4
gen cfg2_u2r1 4 "${SMALL[@]}" "${CFGARGS[@]}" --cfg 2 --ulysses 2 --ring 1
gen 13b_u4r1 4 --preset hunyuan-video-13b --random-weights --size 720x1280 --frames 129 --steps 2 --seed 3 --overwrite
python3 scripts/gpu_generate_summary.py --runs "$RUNS" --kind "$KIND" --jsonl "$OUT/generate.jsonl"
