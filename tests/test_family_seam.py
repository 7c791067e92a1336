"""The model-family seam: launcher/ and parallel/ know no family module, a family registered from
outside (tests/toy_family.py) runs `generate` and `plan` unchanged, and `plan` prints the memory
plan `generate` records. CPU, fp32, gloo."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models

ROOT = Path(__file__).resolve().parents[1]
FAMILY_PACKAGES = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "__init__.py").exists())


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_launcher_and_parallel_import_no_family_module():
    assert "hunyuan_video" in FAMILY_PACKAGES  # the rule below must have something to forbid
    bad = []
    for room in ("launcher", "parallel"):
        for path in sorted((ROOT / room).rglob("*.py")):
            for name in _imports(path):
                if any(name == f"models.{pkg}" or name.startswith(f"models.{pkg}.") for pkg in FAMILY_PACKAGES):
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
            if "hunyuan_video" in path.read_text():
                bad.append(f"{path.relative_to(ROOT)}: names hunyuan_video")
    assert not bad, "launcher/ and parallel/ must reach models only through models.family:\n" + "\n".join(bad)


def test_families_and_presets_are_found_by_preset():
    fam = models.get_family("hunyuan-video-13b")
    assert fam.name == "hunyuan_video" and fam.topology_path().endswith("configs/topology/hunyuan_video.yaml")
    assert {"hunyuan-video-13b", "tiny"} <= set(models.list_presets())
    with pytest.raises(ValueError, match="unknown preset 'nope'; valid: "):
        models.get_family("nope")
    with pytest.raises(ValueError, match="already belong to hunyuan_video"):
        models.register_family(models.ModelFamily(**{**fam.__dict__, "name": "copy"}))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
            models.family.FAMILIES_ENV: "toy_family"}


def _generate(out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "launcher", "generate", "--preset", "toy-dit", "--prompt", "a red ball", "--seed", "5",
                "--device", "cpu", "--save-latents", "--output-dir", str(out), *args]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *launcher]
    return subprocess.run([sys.executable, *launcher], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=240)


def _latents(out: Path) -> torch.Tensor:
    return load_file(str(next(out.glob("*.latents.safetensors"))))["latents"]


@pytest.mark.multiprocess
def test_a_toy_family_runs_generate_on_one_and_two_processes(tmp_path):
    single, par = tmp_path / "single", tmp_path / "par"
    proc = _generate(single, 1)
    assert proc.returncode == 0, proc.stderr
    proc = _generate(par, 2, "--ulysses", "2")
    assert proc.returncode == 0, proc.stderr
    a, b = _latents(single), _latents(par)
    assert a.shape == (1, 3, 3, 8, 8) and torch.isfinite(a).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 1e-5, rel
    record = json.loads(next(par.glob("*.json")).read_text())
    assert record["model"]["family"] == "toy" and record["topology"]["ulysses"] == 2
    assert record["topology"]["source"] == "explicit" and record["conventions"]["embedded_guidance_value"] is None
    assert next(par.glob("*.mp4")).stat().st_size > 0


@pytest.mark.slow
def test_a_toy_family_plans_and_refuses_bad_input():
    env = _env()
    run = [sys.executable, "-m", "launcher", "plan", "--preset", "toy-dit", "--gpus", "4", "--json"]
    proc = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["chosen"]["label"] == "4x1" and plan["tokens"]["image"] == 3 * 8 * 8 and plan["tokens"]["text"] == 16
    bad = subprocess.run([*run[:-1], "--ulysses", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ulysses 3 does not divide the 4 sequence-parallel GPUs" in bad.stderr


@pytest.mark.parametrize("knobs", [(), ("--max-gpu-memory", "9GiB", "--stream-blocks", "2"), ("--vae-tiling", "small"),
                                   ("--chunk-tokens", "16")],
                         ids=["no-budget", "budget-and-streaming", "small-tiles", "token-chunks"])
def test_plan_prints_the_memory_plan_generate_records(tmp_path, capsys, knobs):
    from launcher.__main__ import main

    shared = ["--preset", "tiny", "--dtype", "fp32", *knobs]
    out = tmp_path / "gen"
    assert main(["generate", *shared, "--prompt", "a cat", "--seed", "1", "--steps", "1", "--no-video",
                 "--device", "cpu", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    recorded = json.loads(next(out.glob("*.json")).read_text())["memory"]
    assert main(["plan", *shared, "--gpus", "1", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["memory_plan"]
    assert planned["chosen"] == {k: recorded[k] for k in planned["chosen"]}
    assert planned["reason"] == recorded["reason"]
