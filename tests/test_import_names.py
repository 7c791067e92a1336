"""The launcher's generic package names (models, parallel) never resolve to a user's own folders.

`python -m launcher` puts the current folder first on sys.path; a project with its own `models/`
must still get ours (single process and under torchrun). CPU only, small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _decoy_project(tmp_path: Path) -> Path:
    """A folder holding `models/` and `parallel/` packages that fail loudly when imported."""
    for name in ("models", "parallel"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text(f"raise SystemExit('the decoy {name} package was imported')\n")
    return tmp_path


def _env() -> dict:
    # PYTHONPATH entries come after the current folder, so the decoy still shadows by path order.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_plan_from_a_folder_with_its_own_models_package(tmp_path):
    here = _decoy_project(tmp_path)
    run = subprocess.run([sys.executable, "-m", "launcher", "plan", "--preset", "tiny", "--gpus", "2", "--json"],
                         cwd=here, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "decoy" not in run.stdout + run.stderr
    assert json.loads(run.stdout)["model"] == "tiny"


@pytest.mark.slow
def test_generate_under_torchrun_from_a_folder_with_its_own_models_package(tmp_path):
    here = _decoy_project(tmp_path / "project")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "launcher",
           "generate", "--preset", "tiny", "--device", "cpu", "--prompt", "a red fox", "--steps", "1",
           "--no-video", "--output-dir", str(out)]
    run = subprocess.run(cmd, cwd=here, env=_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "decoy" not in run.stdout + run.stderr
    assert list(out.glob("*.json")), "no record written"


def test_a_different_models_package_already_imported_is_named(tmp_path):
    _decoy_project(tmp_path)
    (tmp_path / "models" / "__init__.py").write_text("NAME = 'theirs'\n")
    code = "import models, launcher"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "a different 'models' package is already imported" in run.stderr
    assert str(tmp_path / "models") in run.stderr


@pytest.mark.parametrize("module", ["models", "parallel"])
def test_the_bound_packages_are_the_repository_ones(module):
    import launcher  # noqa: F401  (binds the names)

    assert Path(sys.modules[module].__file__).resolve().parent == ROOT / module
