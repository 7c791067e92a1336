"""FP8 checkpoints: quantising a bf16 checkpoint while reading it, and the release's fp8 files.

The release's fp8 DiT (`ckpts/hunyuan-video-t2v-720p/transformers/`):
    `mp_rank_00_model_states_fp8.pt`      {"module": state dict}: the same 856 keys as the bf16
        file; the `.weight` of every nn.Linear under double_blocks/single_blocks (360 in the 13B)
        is float8_e4m3fn holding weight / scale; the rest is bf16 (13.2 GB against 25.6 GB). The
        release applies the map first, then loads this file with strict=True, hence same keys.
    `mp_rank_00_model_states_fp8_map.pt`  {module name: scale}, e.g. "double_blocks.0.img_attn_qkv"
        -> one scale per tensor (max|w| / 448); the real weight is fp8.to(bf16) * scale.to(bf16).
Our own fp8 state dict instead carries `<name>.scale` fp32 `[out]` beside each fp8 weight
(models/fp8.py); `prepare_state_dict` brings either to the form a model holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .fp8 import FP8_DTYPES, dequantize_weight, float8_modules, quantize_weight
from .weights import CheckpointError, StateDict


def fp8_weight_modules(sd: StateDict) -> list[str]:
    """Module names whose `.weight` is stored as float8 in `sd`."""
    return [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dtype in FP8_DTYPES]


@torch.no_grad()
def quantize_state_dict(sd: StateDict, names, *, device: torch.device | str | None = None) -> StateDict:
    """A new dict in which each module of `names` has `.weight` fp8 `[out, in]` and `.scale` fp32
    `[out]` (per-channel); other entries are the same tensor objects (memory maps stay maps).

    Tensors are quantised one at a time on `device` (default: where they are) and stay there, so
    a 13B bf16 checkpoint read memory-mapped becomes fp8 on the GPU without ever being there whole
    in bf16. Names without a weight in `sd` are skipped (the strict check reports them)."""
    out = dict(sd)
    for name in names:
        w = sd.get(f"{name}.weight")
        if w is None or w.dtype in FP8_DTYPES:
            continue
        out[f"{name}.weight"], out[f"{name}.scale"] = quantize_weight(w.to(device) if device is not None else w)
    return out


def dequantize_state_dict(sd: StateDict, names, dtypes: dict[str, torch.dtype]) -> StateDict:
    """Inverse direction, for a plain model: `.weight` * `.scale` in `dtypes[name]`, `.scale`
    dropped."""
    out = dict(sd)
    for name in names:
        out[f"{name}.weight"] = dequantize_weight(sd[f"{name}.weight"], out.pop(f"{name}.scale"), dtypes[name])
    return out


def release_map_path(ckpt: Path) -> Path:
    """The release's rule: `mp_rank_00_model_states_fp8.pt` -> `mp_rank_00_model_states_fp8_map.pt`."""
    return ckpt.with_name(f"{ckpt.stem}_map{ckpt.suffix}")


def read_fp8_map(path: Path) -> dict[str, torch.Tensor]:
    """The release's map: a torch pickle of {module name: scale}, e.g.
    {"double_blocks.0.img_attn_qkv": tensor(0.0012), ...} (one scale per tensor)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the fp8 scale map: {err}") from err
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not an fp8 scale map (expected a dict of module name -> scale tensor)")
    return obj


def attach_fp8_map(sd: StateDict, fp8_map: dict[str, torch.Tensor], names: list[str], source: Path) -> StateDict:
    """Add `<name>.scale` fp32 `[out]` for every fp8 module of `names` from the release's map
    (one scale per tensor, expanded), strictly: fp8 weights without a scale, scales without an
    fp8 weight and scales of the wrong size raise CheckpointError naming the map file."""
    rows = {n: sd[f"{n}.weight"].shape[0] for n in names}
    missing = [n for n in names if n not in fp8_map]
    unexpected = [k for k in fp8_map if k not in rows]
    misshaped = [f"{k} {tuple(fp8_map[k].shape)}" for k in rows if k in fp8_map and fp8_map[k].numel() not in (1, rows[k])]
    _raise_if(source, "does not match the fp8 weights beside it",
              (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)))
    out = dict(sd)
    for n, r in rows.items():
        out[f"{n}.scale"] = fp8_map[n].float().reshape(-1).expand(r).contiguous()
    return out


def _raise_if(source, what: str, lists, show: int = 3) -> None:
    problems = [
        f"{len(keys)} {kind} ({', '.join(keys[:show])}{', ...' if len(keys) > show else ''})"
        for kind, keys in lists if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: {what}: " + "; ".join(problems))


def prepare_state_dict(model: nn.Module, sd: StateDict, files: list[Path], *, device=None) -> StateDict:
    """Bring a checkpoint's tensors to the form `model` holds, per module:
    fp8 weights without scales (the release's fp8 file) get their scales from the map beside the
    file; bf16 weights of the model's Float8Linear modules are quantised (on `device`); fp8
    weights of modules the model keeps plain are dequantised to the model's dtype.
    A plain model with a plain checkpoint passes through untouched."""
    stored = fp8_weight_modules(sd)
    unscaled = [n for n in stored if f"{n}.scale" not in sd]
    if unscaled:
        sd = attach_fp8_map(sd, _map_for(files, unscaled), unscaled, release_map_path(files[0]))
    wanted = set(float8_modules(model))
    sd = quantize_state_dict(sd, [n for n in wanted if n not in stored], device=device)
    params = dict(model.named_parameters())
    plain = [n for n in stored if n not in wanted and f"{n}.weight" in params]
    return dequantize_state_dict(sd, plain, {n: params[f"{n}.weight"].dtype for n in plain})


def _map_for(files: list[Path], unscaled: list[str]) -> dict[str, torch.Tensor]:
    path = release_map_path(files[0])
    if len(files) != 1 or not path.is_file():
        raise CheckpointError(
            f"{files[0]}: {len(unscaled)} float8 weights ({unscaled[0]}, ...) but no scale map "
            f"{path} (the release ships it beside the weights as ..._fp8_map.pt)"
        )
    return read_fp8_map(path)
