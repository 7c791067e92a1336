"""HunyuanVideo DiT checkpoint layouts: the release's keys <-> the diffusers keys.

The model's own names are the release's (`double_blocks.N.img_attn_qkv.weight`, ...). The
diffusers layout (`transformer_blocks.N.attn.to_q.weight`, ...) splits fused projections and
stores the final layer's (shift, scale) as (scale, shift); both directions are lossless.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..fp8 import float8_modules
from ..fp8_checkpoint import prepare_state_dict
from ..weights import assign_state_dict, check_state_dict, read_files, resolve_checkpoint

StateDict = dict[str, torch.Tensor]

# Renames of whole key stems (after the block prefix), release -> diffusers.
_DOUBLE = {
    "img_mod.linear": "norm1.linear",
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "img_attn_proj": "attn.to_out.0",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mod.linear": "norm1_context.linear",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "txt_attn_proj": "attn.to_add_out",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}
_SINGLE = {
    "linear2": "proj_out",
    "q_norm": "attn.norm_q",
    "k_norm": "attn.norm_k",
    "modulation.linear": "norm.linear",
}
_REFINER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}
_TOP = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# Fused release projections and the diffusers pieces they split into (row blocks, in order).
_SPLITS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_BLOCK_PREFIXES = (
    ("double_blocks", "transformer_blocks", _DOUBLE),
    ("single_blocks", "single_transformer_blocks", _SINGLE),
    ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", _REFINER),
)


def is_diffusers_layout(keys) -> bool:
    """True when the keys look like diffusers' HunyuanVideoTransformer3DModel."""
    return any(k.startswith(("transformer_blocks.", "x_embedder.", "context_embedder.")) for k in keys)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _split_sizes(stem: str, rows: int, hidden: int) -> list[int]:
    n = len(_SPLITS[stem])
    if stem == "linear1":  # q, k, v of `hidden` rows each, the MLP input takes the rest
        return [hidden, hidden, hidden, rows - 3 * hidden]
    return [rows // n] * n


def _block_entries() -> list[tuple[re.Pattern, str, dict]]:
    return [(re.compile(rf"^{re.escape(o)}\.(\d+)\.(.+)$"), d, table) for o, d, table in _BLOCK_PREFIXES]


def _map_stem(stem: str, table: dict) -> str | None:
    """`img_mlp.fc1.weight` -> `ff.net.0.proj.weight` using a table of stems."""
    for src, dst in table.items():
        if stem.startswith(src + "."):
            return dst + stem[len(src):]
    return None


def official_to_diffusers(sd: StateDict, hidden_size: int) -> StateDict:
    """Release keys -> diffusers keys (fused projections split, final shift/scale swapped)."""
    out: StateDict = {}
    blocks = _block_entries()
    for key, w in sd.items():
        if key.startswith(_FINAL_MOD[0] + "."):
            out[_FINAL_MOD[1] + key[len(_FINAL_MOD[0]):]] = _swap_halves(w)
            continue
        for pattern, dst_prefix, table in blocks:
            m = pattern.match(key)
            if m:
                idx, stem = m.groups()
                prefix = f"{dst_prefix}.{idx}."
                fused, _, suffix = stem.rpartition(".")
                if fused in _SPLITS:
                    parts = w.split(_split_sizes(fused, w.shape[0], hidden_size), dim=0)
                    for name, part in zip(_SPLITS[fused], parts):
                        out[f"{prefix}{name}.{suffix}"] = part
                else:
                    out[prefix + (_map_stem(stem, table) or stem)] = w
                break
        else:
            out[_map_stem(key, _TOP) or key] = w  # unknown keys pass through: strict load names them
    return out


def diffusers_to_official(sd: StateDict) -> StateDict:
    """Diffusers keys -> release keys (the exact inverse of `official_to_diffusers`)."""
    out: StateDict = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    inverse_top = {v: k for k, v in _TOP.items()}
    blocks = [
        (re.compile(rf"^{re.escape(d)}\.(\d+)\.(.+)$"), o, {v: k for k, v in t.items()})
        for o, d, t in _BLOCK_PREFIXES
    ]
    for key, w in sd.items():
        if key.startswith(_FINAL_MOD[1] + "."):
            out[_FINAL_MOD[0] + key[len(_FINAL_MOD[1]):]] = _swap_halves(w)
            continue
        for pattern, src_prefix, table in blocks:
            m = pattern.match(key)
            if m:
                idx, stem = m.groups()
                mapped = _map_stem(stem, table)
                piece, _, suffix = stem.rpartition(".")
                fused = _fused_name(src_prefix, piece)
                if mapped is None and fused is not None:  # a piece of a fused projection
                    pending.setdefault((f"{src_prefix}.{idx}.{fused}", suffix), {})[piece] = w
                else:
                    out[f"{src_prefix}.{idx}.{mapped or stem}"] = w
                break
        else:
            out[_map_stem(key, inverse_top) or key] = w
    for (fused_key, suffix), pieces in pending.items():
        names = _SPLITS[fused_key.rsplit(".", 1)[1]]
        missing = [n for n in names if n not in pieces]
        if missing:
            raise KeyError(f"diffusers checkpoint lacks {fused_key} pieces {missing} ({suffix})")
        out[f"{fused_key}.{suffix}"] = torch.cat([pieces[n] for n in names], dim=0)
    return out


_FUSED_BY_PREFIX = {
    "double_blocks": ("img_attn_qkv", "txt_attn_qkv"),
    "single_blocks": ("linear1",),
    "txt_in.individual_token_refiner.blocks": ("self_attn_qkv",),
}


def _fused_name(src_prefix: str, piece: str) -> str | None:
    """The release projection a diffusers piece (`attn.to_q`, `proj_mlp`, ...) belongs to."""
    for fused in _FUSED_BY_PREFIX[src_prefix]:
        if piece in _SPLITS[fused]:
            return fused
    return None


def load_dit_weights(
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
        prefer_fp8 = bool(float8_modules(model))
    files = resolve_checkpoint(path, prefer_fp8=prefer_fp8)
    sd = read_files(files)
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    source = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
    sd = prepare_state_dict(model, sd, files, device=quantize_device)
    check_state_dict(model, sd, source, target=f"the {model.config.name} DiT")
    assign_state_dict(model, sd)
    return model
