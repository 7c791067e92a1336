"""The JSON record written beside every video: what ran, how long each phase took, memory."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata

import torch


class PhaseTimer:
    """Wall time per named phase (seconds); device work is synchronised at phase ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated by torch (GiB) on CUDA, and this process's peak host RSS (GiB)."""
    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
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
    return out


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
