"""The JSON record written beside every video: what ran, how long each phase took, memory."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch


class PhaseTimer:
    """Wall time per named phase (seconds); device work is synchronised at phase ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.started = now_iso()
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the timer was made (the job makes it when its text encoding starts)."""
        return time.perf_counter() - self._t0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file, in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_pss_bytes() -> int | None:
    """This process's proportional set size: shared pages (a node-shared weight store) count
    1/N in each of the N processes mapping them, so the ranks' PSS add up to the node's use."""
    return proc_bytes("/proc/self/smaps_rollup", "Pss")


def device_used_bytes(device: torch.device) -> int:
    """Bytes in use on the whole GPU (this process's context, NCCL buffers and allocator pool)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (GiB) on CUDA: allocated and reserved by torch, and on the device as a
    whole (reserved peak + what lives outside the allocator now: context, NCCL); this process's
    peak host RSS and current PSS (GiB)."""
    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    pss = host_pss_bytes()
    if pss is not None:
        out["host_pss_gib"] = pss / 2**30
    if device.type == "cuda":
        reserved_peak = torch.cuda.max_memory_reserved(device)
        outside = device_used_bytes(device) - torch.cuda.memory_reserved(device)
        out["gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gib"] = reserved_peak / 2**30
        out["gpu_device_peak_gib"] = (reserved_peak + outside) / 2**30
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("videodit-launcher", "transformers", "av", "yunchang", "xfuser", "flash-attn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
        out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            pass
    return out


# Environment variables that change how a run behaves, recorded as they were.
RECORDED_ENV_PREFIXES = ("LAUNCHER_", "NCCL_", "TORCH_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                         "VIDEODIT_")


def run_context(hosts: list[str]) -> dict:
    """Where and from what a run came: the checkout's commit, the hosts of its ranks, the Slurm
    job, the argv as given and the settings in force."""
    return {
        "git": git_commit(),
        "hosts": sorted(set(hosts)),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)},
    }


def hostname() -> str:
    return socket.gethostname()


def git_commit() -> dict | None:
    """The commit of the checkout the code runs from (and whether tracked files differ from it),
    or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command as a user would retype it (`python -m launcher ...` rather than a file path)."""
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("__main__.py", "-c")) else sys.argv
    head = ["python", "-m"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker: name the launch
        head = ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', '1')}",
                f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m"]
    return shlex.join([*head, "launcher", *argv])
