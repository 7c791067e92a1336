"""An installed (non-editable) launcher works away from the checkout.

The wheel is built from this checkout and installed into a fresh virtual environment outside it;
its dependencies come from the test environment through a path entry (not a site directory, so
the checkout's editable-install hook is not run), and the commands run from another directory:
the topology tables, calibration and demo weights must come from the installed package.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_list_is_every_package_on_disk():
    """pyproject.toml lists packages explicitly (configs/ is mapped to a data package): a new
    package folder must be added there, or the wheel would lack it."""
    import tomllib

    from setuptools import find_namespace_packages, find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = sorted(find_packages(where=str(ROOT), include=["launcher*", "parallel*", "models*"]))
    configs = sorted("videodit_configs" + ("." + p if p else "") for p in
                     ["", *find_namespace_packages(where=str(ROOT / "configs"))])
    assert sorted(tool["packages"]) == sorted(code + configs)
    assert tool["package-dir"] == {"videodit_configs": "configs"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv with the built wheel installed."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, cwd=tmp, capture_output=True, timeout=300)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies (torch, ...) from this environment, as a plain path entry.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("videodit_launcher-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return py


@pytest.mark.slow
def test_installed_wheel_plans_and_generates_from_another_directory(installed, tmp_path):
    where = subprocess.run([str(installed), "-c", "import launcher, models.configs as c; "
                            "print(launcher.__file__); print(c.config_dir())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert all(str(ROOT) not in w for w in where), where  # the installed copy, not the checkout
    plan = subprocess.run([str(installed), "-m", "launcher", "plan", "--preset", "hunyuan-video-13b", "--gpus", "4",
                           "--predict", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    got = json.loads(plan.stdout)
    assert "hunyuan_video.yaml" in json.dumps(got) and got["prediction"]  # the table and calibration were found
    videodit = installed.parent / "videodit"
    gen = subprocess.run([str(videodit), "generate", "--preset", "tiny", "--prompt", "a cat", "--steps", "1",
                          "--device", "cpu", "--seed", "0", "--output-dir", "out"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert (tmp_path / record["outputs"]["video"]).is_file()  # relative to where it ran
