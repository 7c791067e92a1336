#!/usr/bin/env bash
# One device-machine call for `generate --compile` on ONE GPU, from the repo root: the 13B block
# shapes (1 double + 1 single block, random weights, bf16) eager and compiled at 29,700 and 118,800
# image tokens, cold compiles (a fresh inductor cache), then the same again on a warm cache.
# Usage: scripts/gpu_compile_bench.sh KIND     Results: $OUT/cold/ and $OUT/warm/compile_bench.json,
# the logs beside them, the tables last. A few minutes on one H200.
set -uo pipefail
GPU_SCRIPT=gpu_compile_bench
source "$(dirname "$0")/gpu_env.sh"
KIND=${1:-unknown}
CACHE="$OUT/inductor-cache"
rm -rf "$CACHE"
for pass in cold warm; do
  mkdir -p "$OUT/$pass"
  timeout 280 python3 scripts/gpu_compile_bench.py --cache-dir "$CACHE" --out "$OUT/$pass" > "$OUT/$pass/log.txt" 2>&1
  echo "gpu_compile_bench $pass ($KIND): exit $?"
done
rm -rf "$CACHE"  # kernels of this machine only: not worth carrying back
for pass in cold warm; do
  echo "== $pass"
  tail -n 12 "$OUT/$pass/log.txt"
done
