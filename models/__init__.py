"""Model code. Knows nothing about distribution: parallel/ hands a model its attention.

Public API (stable):
    build_model(preset, device=None, dtype=None, *, seed=0) -> the DiT (meta device when asked)
    load_weights(model, path) -> loads any supported checkpoint into it, strictly
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import fp8, fp8_checkpoint
from .hunyuan_video import PRESETS, HunyuanVideoConfig, HunyuanVideoDiT, get_preset
from .hunyuan_video.checkpoint import diffusers_to_official, is_diffusers_layout
from .weights import (
    CheckpointError,
    assign_state_dict,
    check_state_dict,
    init_random_,
    read_files,
    resolve_checkpoint,
)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def build_model(
    preset: str | HunyuanVideoConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
) -> HunyuanVideoDiT:
    """The DiT of `preset` in eval mode. On device "meta" it has shapes only (no memory); on any
    other device (default CPU) it holds seeded random weights, to be replaced by `load_weights`."""
    cfg = preset if isinstance(preset, HunyuanVideoConfig) else get_preset(preset)
    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    if dtype is not None:
        model.to(dtype)
    device = torch.device(device if device is not None else "cpu")
    if device.type != "meta":
        model.to_empty(device=device)
        init_random_(model, seed)
    return model.eval().requires_grad_(False)


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    prefer_fp8: bool | None = None,
    quantize_device: str | torch.device | None = None,
) -> nn.Module:
    """Load the release's pickle (`module`/`ema`), safetensors, or the diffusers layout into
    `model`, strictly: missing, unexpected or mis-shaped keys raise CheckpointError naming them.

    FP8 (models/fp8.py, models/fp8_checkpoint.py): a model with Float8Linear modules (from
    `fp8.quantize_model`) takes the release's fp8 file with its scale map (preferred in a model
    directory unless `prefer_fp8` is False) or quantises a bf16 checkpoint while reading it, one
    tensor at a time on `quantize_device` (default: the CPU); a plain model given an fp8 file gets
    the weights dequantised to its dtype."""
    if prefer_fp8 is None:
        prefer_fp8 = bool(fp8.float8_modules(model))
    files = resolve_checkpoint(path, prefer_fp8=prefer_fp8)
    sd = read_files(files)
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    source = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
    sd = fp8_checkpoint.prepare_state_dict(model, sd, files, device=quantize_device)
    check_state_dict(model, sd, source, target=f"the {model.config.name} DiT")
    assign_state_dict(model, sd)
    return model


__all__ = ["CheckpointError", "HunyuanVideoConfig", "build_model", "list_presets", "load_weights"]
