"""Smoke test: scripts/bench_vae_memory.py runs on the CPU and writes its JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vae_memory.py"


@pytest.mark.slow
def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--sizes",
        "3x4x4",
        "--tilings",
        "none,2/1,1/1",
        "--compare",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["tiling"], r["status"]) for r in rows] == [("none", "ok"), ("2/1,1/1", "ok")]
    assert all(r["peak_bytes"] >= 0 and r["time_s"] > 0 for r in rows)
    assert rows[1]["max_abs_diff"] >= 0 and "max_abs_diff" not in rows[0]
    assert "3x4x4 -> 9x32x32" in proc.stdout
