#!/usr/bin/env bash
# One device-machine call for the shared VAE decode and the mp4 writer (issue 17), from the repo
# root on a node of 2+ GPUs: the HunyuanVideo VAE (release config, random weights, fp16, release
# tiles) decoding 720x1280x129 and 544x960x129 on 1 GPU and over all visible GPUs, frames
# compared; then writing a 544x960x129 video (scripts/bench_write.py).
# Usage: scripts/gpu_vae_decode.sh KIND      Results: $OUT/vae_decode.jsonl, $OUT/bench_write.json, tables.
set -uo pipefail
GPU_SCRIPT=gpu_vae_decode
source "$(dirname "$0")/gpu_env.sh"
KIND=${1:-unknown}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 scripts/bench_write.py --size 544x960 --frames 129 --label "$KIND" --out "$OUT/bench_write.json" \
  > "$OUT/bench_write.log" 2>&1
echo "bench_write: exit $?"
timeout 560 python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" scripts/gpu_vae_decode.py \
  --sizes 720x1280x129,544x960x129 --kind "$KIND" --jsonl "$OUT/vae_decode.jsonl" > "$OUT/vae_decode.log" 2>&1
echo "gpu_vae_decode ($NGPU GPUs): exit $?"
tail -n 4 "$OUT/bench_write.log"
tail -n 6 "$OUT/vae_decode.log"
