"""The 13B preset is exactly the release's state dict; presets and shapes behave."""

from pathlib import Path

import pytest
import torch

import models
from models.hunyuan_video import get_preset

KEYS_FILE = Path(__file__).parent / "data" / "hunyuanvideo_dit_keys.txt"


def _reference_listing():
    """Keys of block 0 of each kind with shapes, expanded to every block (the listing's rule)."""
    ref, totals = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("num keys"):
            parts = line.split()
            totals = (int(parts[2]), int(parts[5]))
            continue
        key, shape = line.split(" ", 1)
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        for kind, depth in (("double_blocks.0.", 20), ("single_blocks.0.", 40)):
            if key.startswith(kind):
                for i in range(depth):
                    ref[key.replace(kind, kind.replace(".0.", f".{i}."))] = shape
                break
        else:
            ref[key] = shape
    return ref, totals


def test_13b_preset_matches_release_listing():
    ref, (n_keys, n_params) = _reference_listing()
    model = models.build_model("hunyuan-video-13b", device="meta")
    sd = model.state_dict()
    assert len(ref) == n_keys == 856
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    assert sum(v.numel() for v in sd.values()) == n_params == 12_821_012_544
    assert all(p.is_meta for p in model.parameters())


def test_build_model_dtype_device_and_seed():
    a = models.build_model("tiny", dtype=torch.bfloat16, seed=1)
    b = models.build_model("tiny", dtype=torch.bfloat16, seed=1)
    c = models.build_model("tiny", dtype=torch.bfloat16, seed=2)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in a.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert not any(p.requires_grad for p in a.parameters())


def test_tiny_preset_heads_allow_ulysses_1_2_4():
    cfg = get_preset("tiny")
    assert all(cfg.num_heads % u == 0 for u in (1, 2, 4))


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*hunyuan-video-13b.*tiny"):
        models.build_model("nope")


def test_token_counts_of_release_resolutions():
    cfg = get_preset("hunyuan-video-13b")
    assert cfg.token_grid(720, 1280, 129) == (33, 45, 80)
    assert cfg.token_grid(544, 960, 129) == (33, 34, 60)
