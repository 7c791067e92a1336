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


def host_pss_bytes() -> int | None:
    """This process's proportional set size: shared pages (a node-shared weight store) count
    1/N in each of the N processes mapping them, so the ranks' PSS add up to the node's use."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
