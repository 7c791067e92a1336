#!/usr/bin/env bash
# One device-machine call (1 GPU) for the family seam and the release conventions:
#  1. the `gpu`-marked tests;
#  2. `generate` on CUDA in bf16 through the family API: the 2-block preset (release widths) at
#     528x976x33, 4 steps, with the default CPU noise and with --noise release; the tiny preset with
#     a budget and streamed blocks; the toy family of tests/toy_family.py;
#  3. a table of what ran (exit codes, conventions, memory plan, step times).
# Usage: scripts/gpu_family_check.sh      Results: $OUT/*.log, $OUT/family.jsonl
set -uo pipefail
GPU_SCRIPT=gpu_family source "$(dirname "$0")/gpu_env.sh"
timeout 200 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
RUNS="$OUT/runs"
gen() {  # gen NAME ARGS...
  local name=$1; shift
  timeout 240 python3 -m launcher generate --prompt "  a red fox in the snow " --seed 3 --save-latents --overwrite \
    --output-dir "$RUNS/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
SMALL=(--preset hunyuan-video-2block --size 528x976 --frames 33 --steps 4)
gen cpu_noise "${SMALL[@]}"
gen release_noise "${SMALL[@]}" --noise release
gen tiny_budget --preset tiny --max-gpu-memory 12GiB --stream-blocks 2
PYTHONPATH=tests${PYTHONPATH:+:$PYTHONPATH} VIDEODIT_FAMILIES=toy_family gen toy --preset toy-dit
python3 - "$RUNS" "$OUT/family.jsonl" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, lat = [], {}
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    rec = next(d.glob("*.json"), None)
    if rec is None:
        rows.append({"run": d.name, "status": "no record"}); continue
    r = json.loads(rec.read_text())
    lat[d.name] = load_file(str(next(d.glob("*.latents.safetensors"))))["latents"]
    steps = sorted(r["step_s"])
    rows.append({"run": d.name, "status": "ok", "family": r["model"]["family"], "prompt": r["prompt"],
                 "dtype": r["dtype"], "guidance_value": r["conventions"]["embedded_guidance_value"],
                 "noise": r["conventions"]["noise"], "text_dtype": r["conventions"]["text_encoder_dtype"],
                 "memory": r["memory"]["label"], "median_step_s": steps[len(steps) // 2]})
if {"cpu_noise", "release_noise"} <= lat.keys():
    a, b = lat["cpu_noise"], lat["release_noise"]
    rows.append({"run": "cpu vs release noise", "latents_rel_diff": ((a - b).norm() / a.norm()).item()})
out.write_text("".join(json.dumps(r) + "\n" for r in rows))
for r in rows:
    print(" | ".join(f"{k}={v}" for k, v in r.items()))
PY
