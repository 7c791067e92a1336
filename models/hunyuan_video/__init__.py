"""HunyuanVideo (Tencent, 2024): the DiT, its presets and checkpoint layouts."""

from .config import PRESETS, HunyuanVideoConfig, get_preset
from .dit import HunyuanVideoDiT, patchify, unpatchify
from .rope import apply_rope, rope_table

__all__ = [
    "PRESETS",
    "HunyuanVideoConfig",
    "HunyuanVideoDiT",
    "apply_rope",
    "get_preset",
    "patchify",
    "rope_table",
    "unpatchify",
]
