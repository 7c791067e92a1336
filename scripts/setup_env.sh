#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs the project into it.
# Usage: scripts/setup_env.sh [extras]   (default extras: test,video,text,plot,yunchang)
# Prints nothing unless pip fails (then its whole output); the venv path is $VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-test,video,text,plot,yunchang}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # run pip; show what it said only when it fails (the build backend's notes are noise)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; exit 1; fi
}
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build served on CI machines, so that the project's looser range
# resolves to it instead of pulling the CUDA wheels. A GPU user installs their own torch first.
"$VENV/bin/python" -c "import torch" 2>/dev/null || quiet "$VENV/bin/python" -m pip install -q "torch==2.13.0"
quiet "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
