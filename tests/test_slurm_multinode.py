"""Two "nodes" on one machine equal the single-process run: the multi-node paths without Slurm.

- two torchrun launches (one per "node", --nnodes=2) meeting through c10d rendezvous on loopback,
  as scripts/slurm/generate.sbatch starts them;
- two plain `python -m launcher generate` processes with only srun's SLURM_* variables (no
  torchrun), as `srun python -m launcher generate` starts them.

Gloo on CPU, one process per node, the tiny preset; latents and decoded frames are compared with
a single-process run exactly as tests/test_distributed_generate.py does.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from test_distributed_generate import BASE, ODD_9, assert_same_videos

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess
VIDEO = ("--prompt", "a red fox", *ODD_9, "--device", "cpu", "--seed", "7")
TIMEOUT = 240


def free_port(candidates=None) -> int:
    """A port nobody listens on now (bound and released; never torchrun's --master_port=0)."""
    for port in candidates or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port among the candidates")


def clean_env(**extra) -> dict[str, str]:
    """This environment without any launcher's rank variables, plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


def run_together(commands: list[tuple[list[str], dict]], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own process group), wait for all; on a timeout or
    an error kill every group so nothing is left hanging."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd, env in commands]
    results = []
    try:
        for p, (cmd, _) in zip(procs, commands):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    return results


def assert_ok(results) -> str:
    for r in results:
        assert r.returncode == 0, f"{r.args}\n{r.stderr[-4000:]}"
    return "".join(r.stderr for r in results)


def planned_for_two_nodes() -> str:
    """The topology `plan --predict` says a 2-node x 1-GPU job of this video runs (and predicts fastest)."""
    size = ODD_9[ODD_9.index("--size") + 1]
    frames = ODD_9[ODD_9.index("--frames") + 1]
    out = subprocess.run([sys.executable, "-m", "launcher", "plan", "--preset", "tiny", "--size", size, "--frames",
                          frames, "--nodes", "2", "--gpus-per-node", "1", "--predict", "--json"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prediction = json.loads(out.stdout)["prediction"]
    assert prediction["chosen"] == prediction["fastest"], prediction
    return prediction["chosen"]


def test_two_torchrun_nodes_with_c10d_rendezvous(tmp_path, slurm_single):
    planned = planned_for_two_nodes()
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex
    commands = []
    for node in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                    "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={rdzv_id}", "--max-restarts=0"]
        launcher = ["-m", "launcher", "generate", "--output-dir", str(tmp_path), *BASE, *VIDEO]
        commands.append(([*torchrun, *launcher], clean_env()))
    log = assert_ok(run_together(commands))
    assert planned == "1x2" and f"topology {planned}" in log  # the ring crosses the "nodes", Ulysses would not
    assert_same_videos(slurm_single, tmp_path)


def test_srun_style_tasks_without_torchrun(tmp_path, slurm_single):
    # MASTER_PORT comes from the job id (20000 + id % 20000): pick an id whose port is free.
    job_id = free_port(random.sample(range(20000, 40000), 200)) - 20000 + 40000
    commands = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_STEP_ID="0",
                        SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id))
        launcher = [sys.executable, "-m", "launcher", "generate", "--output-dir", str(tmp_path), *BASE, *VIDEO,
                    "--timeout", "120"]
        commands.append((launcher, env))
    log = assert_ok(run_together(commands))
    assert "topology 2x1" in log and "on 2 rank(s)" in log
    assert_same_videos(slurm_single, tmp_path)
