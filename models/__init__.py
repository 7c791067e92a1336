"""Model code. Knows nothing about distribution: parallel/ hands a model its attention.

Public API (stable), for every registered family (``models/family.py``):
    get_family(preset) -> the ModelFamily owning the preset; list_presets()
    build_model(preset, device=None, dtype=None, *, seed=0) -> the DiT (meta device when asked)
    load_weights(model, path) -> loads any checkpoint layout its family reads, strictly
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import fp8, fp8_checkpoint
from .family import (
    ModelFamily,
    ModelInputError,
    PresetDefaults,
    TextSpec,
    VaeSpec,
    families,
    get_family,
    list_presets,
    register_family,
)
from .step_cache import CacheSpec
from .weights import CheckpointError, init_random_
from .hunyuan_video.family import FAMILY as HUNYUAN_VIDEO
from .wan.family import FAMILY as WAN

register_family(HUNYUAN_VIDEO)
register_family(WAN)


def build_model(
    preset: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
) -> nn.Module:
    """The DiT of `preset` in eval mode. On device "meta" it has shapes only (no memory); on any
    other device (default CPU) it holds seeded random weights, to be replaced by `load_weights`.
    `preset` may also be a DiT config object (its `name` picks the family)."""
    name = preset if isinstance(preset, str) else preset.name
    family = get_family(name)
    cfg = family.config(name) if isinstance(preset, str) else preset
    return family.build(cfg, device=device if device is not None else "cpu", dtype=dtype, seed=seed)


def load_weights(model: nn.Module, path: str | Path, **kwargs) -> nn.Module:
    """Load a checkpoint into `model` with its family's loader, strictly: missing, unexpected or
    mis-shaped keys raise CheckpointError naming them (HunyuanVideo: the release's pickle,
    safetensors, the diffusers layout, FP8 files; see `models/hunyuan_video/checkpoint.py`)."""
    return get_family(model.config.name).load(model, Path(path), **kwargs)


__all__ = [
    "CheckpointError", "ModelFamily", "ModelInputError", "PresetDefaults", "TextSpec", "VaeSpec", "build_model",
    "families", "get_family", "init_random_", "list_presets", "load_weights", "register_family",
]
