"""Wan2.1 DiT checkpoint layouts: the release's keys <-> diffusers' WanTransformer3DModel keys.

The model's own names are the release's (`blocks.N.self_attn.q.weight`, ...), read from its
`diffusion_pytorch_model*.safetensors` (the 14B sharded, with an index json). The diffusers layout
(`transformer/` of a diffusers model folder) renames every key but stores the same tensors in
the same shapes and order: the modulation tables keep their (shift, scale, gate, ...) order, and
the release's `norm3` (the affine cross-attention norm) is diffusers' `norm2`. Both directions
are pure renames, hence lossless.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..weights import CheckpointError, assign_state_dict, check_state_dict, read_files, resolve_checkpoint

StateDict = dict[str, torch.Tensor]

# Whole-key prefixes outside the blocks, release -> diffusers.
_TOP = {
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
    "patch_embedding.": "patch_embedding.",
}
# Stems after `blocks.N.`, release -> diffusers.
_BLOCK = {
    "self_attn.q.": "attn1.to_q.",
    "self_attn.k.": "attn1.to_k.",
    "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.",
    "self_attn.norm_q.": "attn1.norm_q.",
    "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.",
    "cross_attn.k.": "attn2.to_k.",
    "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.",
    "cross_attn.norm_q.": "attn2.norm_q.",
    "cross_attn.norm_k.": "attn2.norm_k.",
    "norm3.": "norm2.",
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_diffusers_layout(keys) -> bool:
    """True when the keys look like diffusers' WanTransformer3DModel."""
    heads = ("condition_embedder.", "proj_out.", "scale_shift_table")
    return any(k.startswith(heads) or ".attn1." in k for k in keys)


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Replace the first matching prefix of `key` (an exact key or a `stem.` prefix)."""
    for src, dst in table.items():
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def _convert(sd: StateDict, top: dict[str, str], block: dict[str, str]) -> StateDict:
    """Rename every key by the tables; unknown keys pass through (a strict load names them)."""
    out: StateDict = {}
    for key, w in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            idx, stem = m.groups()
            new = _rename(stem, block)
            out[f"blocks.{idx}.{new if new is not None else stem}"] = w
        else:
            new = _rename(key, top)
            out[new if new is not None else key] = w
    return out


def release_to_diffusers(sd: StateDict) -> StateDict:
    """Release keys -> diffusers keys (same tensors, renamed)."""
    return _convert(sd, _TOP, _BLOCK)


def diffusers_to_release(sd: StateDict) -> StateDict:
    """Diffusers keys -> release keys (the exact inverse of `release_to_diffusers`)."""
    return _convert(sd, {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()})


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def dit_files(path: str | Path) -> list[Path]:
    """The DiT weight files behind `path`: a file; a release folder
    (`diffusion_pytorch_model*.safetensors`, sharded with an index json); a diffusers
    `transformer/` folder, or a diffusers model folder holding one."""
    path = Path(path)
    if path.is_dir() and not _has_weights(path):
        if not (path / "transformer").is_dir():
            raise CheckpointError(
                f"no Wan DiT weights found in {path}: expected diffusion_pytorch_model*.safetensors "
                "(with its .safetensors.index.json when sharded) or a diffusers transformer/ folder"
            )
        path = path / "transformer"
    return resolve_checkpoint(path)


def load_dit_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the release's or diffusers' safetensors (or a torch pickle) into `model`, strictly:
    missing, unexpected or mis-shaped keys raise CheckpointError naming the file and the keys.

    Parameters that `model` keeps in fp32 (see `models.wan.dit`) receive the checkpoint's values
    in fp32; the others are cast to the model's dtype."""
    files = dit_files(path)
    sd = read_files(files)
    if is_diffusers_layout(sd):
        sd = diffusers_to_release(sd)
    source = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
    check_state_dict(model, sd, source, target=f"the {model.config.name} DiT")
    assign_state_dict(model, sd)
    return model


__all__ = [
    "diffusers_to_release", "dit_files", "is_diffusers_layout", "load_dit_weights", "release_to_diffusers",
]
