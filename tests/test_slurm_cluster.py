"""Real Slurm: a one-machine cluster (scripts/slurm/local_cluster.sh: munged, slurmctld, slurmd on
loopback) runs the job `python -m launcher slurm --submit` renders, and `srun python -m launcher
generate` without torchrun; both videos equal the single-process run.

Skipped, with the reason, where Debian's slurm packages are not installed (scripts/setup_slurm.sh
installs them) or not as root (slurmd starts jobs as their owner). Where they are installed, a
cluster that does not start is a failure, not a skip.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.__main__ import main
from test_distributed_generate import BASE, assert_same_videos
from test_slurm_multinode import VIDEO

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
JOB_TIMEOUT = 180
pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]


def _missing() -> str | None:
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} not on PATH); to run this test, install it: "
                f"VIDEODIT_INSTALL_SLURM=1 scripts/test.sh (apt-get, as root)")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts jobs as their owner)"
    return None


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """A running one-node cluster for this module; its SLURM_CONF path."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PYTHON": sys.executable}
    start = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, env=env, timeout=90)
    if start.returncode != 0:
        pytest.fail(f"Slurm is installed but the local cluster did not start:\n{start.stdout}\n{start.stderr}")
    try:
        yield str(state / "slurm.conf")
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture
def job_env(slurm_conf, tmp_path, monkeypatch):
    """Submit from tmp_path; sbatch hands this environment to the job (its --export=ALL)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def wait_for(job_id: str, log: Path) -> None:
    """Until the job leaves the queue; then it must have COMPLETED (the log is in the message)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30)
        if not queue.stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], timeout=30)
        pytest.fail(f"job {job_id} still queued or running after {JOB_TIMEOUT} s:\n{_tail(log)}")
    state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "JobState=COMPLETED" in state, f"{state}\n{_tail(log)}"


def _tail(log: Path) -> str:
    return log.read_text()[-6000:] if log.exists() else f"(no log at {log})"


def test_rendered_job_runs_under_slurm(job_env, capsys, slurm_single):
    argv = ["slurm", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "5",
            "--job-name", "videodit-test", *BASE, *VIDEO, "--submit", "-o", "job.sbatch"]
    assert main(argv) == 0
    out = capsys.readouterr()
    job_id = re.search(r"Submitted batch job (\d+)", out.out).group(1)
    log = job_env / "logs" / f"videodit-test-{job_id}.out"
    wait_for(job_id, log)
    text = log.read_text()
    assert f"job {job_id}: 1 node(s) x 2, rendezvous" in text
    assert "topology 2x1 (explicit): dp 1, cfg 1, ring 1, ulysses 2 on 2 rank(s)" in text
    assert_same_videos(slurm_single, job_env / "outputs" / job_id)


def test_srun_without_torchrun(job_env, slurm_single):
    generate = [os.environ["PYTHON"], "-m", "launcher", "generate", "--output-dir", "out", *BASE, *VIDEO]
    sbatch = ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=5", "--output=srun-%j.out",
              "--wrap", "srun " + " ".join(f"'{a}'" for a in generate)]
    proc = subprocess.run(sbatch, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = job_env / f"srun-{job_id}.out"
    wait_for(job_id, log)
    assert "on 2 rank(s)" in log.read_text()
    assert_same_videos(slurm_single, job_env / "out")
