"""FP8 (float8 e4m3) weights for the linears of the transformer blocks.

Format (one layout for our quantiser and for the release's fp8 checkpoint):
    `<name>.weight` float8_e4m3fn `[out, in]`  (row-major, as nn.Linear)
    `<name>.scale`  float32       `[out]`      (the real weight is `weight[o, :] * scale[o]`)
    `<name>.bias`   compute dtype `[out]`      (unchanged)
Our quantiser gives one scale per output row (amax / 448). The release stores one scale per tensor
in a separate map file; the loader expands it to `[out]`, which computes exactly the same thing.

Two ways to compute (`Float8Linear.mode`):
    "storage": dequantise the weight to the input's dtype (bf16 on GPU), then one F.linear. Saves
               memory, costs a little time per call.
    "matmul":  `torch._scaled_mm` on fp8 operands: activations quantised per row (per token) on
               the fly, the weight per output channel; bf16 out. Needs an FP8 tensor-core GPU
               (capability >= 8.9) or a CPU build that supports it; elsewhere it falls back to
               "storage" with one logged warning.

The release converts every nn.Linear inside `double_blocks.*` and `single_blocks.*` (attention
qkv/proj, MLP fc1/fc2, single-block linear1/linear2, and the modulation linears), and keeps the
embedders, the token refiner and the final layer in bf16; `BLOCK_PREFIXES` follows it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import CheckpointError, StateDict

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MODES = ("storage", "matmul")
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Capability of torch._scaled_mm per device ("cuda:0", "cpu"), probed once: a fact of the
# machine, not of a model, so one cache for the process is right.
_SCALED_MM_OK: dict[str, bool] = {}
_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


# ---------------------------------------------------------------------------------------------
# Quantisation of tensors


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [out, in]` (any float dtype) -> (`w8 [out, in]` e4m3, `scale [out]` fp32), per row.

    scale = amax(|row|) / 448, rounded to a bf16 value so that dequantising in bf16 (as the
    release does) multiplies by exactly the stored scale; an all-zero row gets scale 1.
    Error per element: <= 2^-4 relative (3 mantissa bits), or <= 2^-10 * scale below e4m3's
    smallest normal (2^-6 * scale).
    """
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / E4M3_MAX).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # The clamp catches the bf16 rounding of the scale (the row max may land a hair above 448).
    w8 = (wf / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)
    return w8, scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w8 [out, in]` fp8, `scale [out]` (or one element) -> `[out, in]` in `dtype`, multiplied
    in `dtype` (the release's own order: both cast to the compute dtype, then multiplied)."""
    return w8.to(dtype) * scale.to(dtype).reshape(-1, 1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) quantisation of activations `x [M, K]` (bf16 or fp32) ->
    (`x8 [M, K]` e4m3, `scale [M, 1]` fp32) with x ~= x8 * scale.

    The inverse scale is rounded to x's dtype first and the returned scale is its exact
    reciprocal, so the pair stays consistent without an fp32 copy of the activations."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    inv = (E4M3_MAX / amax).to(x.dtype)
    x8 = (x * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)
    return x8, inv.float().reciprocal()


def scaled_mm_supported(device: torch.device | str) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales and bf16 output runs on `device` (probed
    once per device with a 16x16 product)."""
    device = torch.device(device)
    key = str(device)
    if key not in _SCALED_MM_OK:
        _SCALED_MM_OK[key] = _probe_scaled_mm(device)
    return _SCALED_MM_OK[key]


def _probe_scaled_mm(device: torch.device) -> bool:
    if device.type == "meta":
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False  # no FP8 tensor cores before Ada / Hopper
    try:
        a = torch.zeros(16, 16, device=device).to(FP8)
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
            bias=torch.zeros(16, device=device, dtype=torch.bfloat16), out_dtype=torch.bfloat16,
        )
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# The layer


class Float8Linear(nn.Module):
    """A linear layer with float8_e4m3fn weights and float32 per-output-channel scales.

    Tensors (all in `state_dict`): `weight` fp8 `[out, in]` and `bias` (compute dtype) `[out]` are
    frozen parameters, `scale` fp32 `[out]` a buffer. `forward` reads them from the module on every
    call and caches nothing derived from them, so a layer-streaming wrapper may swap them (or move
    the module) between calls. `.to(dtype)` changes only the bias: the fp8 weight and its fp32
    scale keep their dtypes (a plain cast would silently destroy the format).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *, mode: str = "storage"):
        super().__init__()
        if weight.dtype != FP8 or weight.ndim != 2:
            raise ValueError(f"Float8Linear: weight must be 2-d float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.mode = check_mode(mode)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, mode: str = "storage") -> "Float8Linear":
        """Quantise `linear` per output channel (on its device). On the meta device only the
        shapes and dtypes are made, for a checkpoint to be assigned later."""
        w, bias = linear.weight, linear.bias
        if w.is_meta:
            w8 = torch.empty(w.shape, dtype=FP8, device="meta")
            scale = torch.empty(w.shape[0], dtype=torch.float32, device="meta")
        else:
            w8, scale = quantize_weight(w)
        return cls(w8, scale, None if bias is None else bias.detach(), mode=mode)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """`[out, in]` in `dtype`."""
        return dequantize_weight(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., in]` -> `[..., out]` in x's dtype."""
        if self.mode == "matmul" and self._matmul_ok(x):
            return self._forward_matmul(x)
        return self._forward_storage(x)

    def _forward_storage(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _matmul_ok(self, x: torch.Tensor) -> bool:
        # cuBLASLt fp8 GEMMs need the leading dimensions of both operands to be multiples of 16.
        if self.in_features % 16 or self.out_features % 16:
            _warn_once(f"Float8Linear {self.in_features}->{self.out_features}: fp8 matmul needs in/out "
                       "multiples of 16; such layers compute in storage mode")
            return False
        if not scaled_mm_supported(x.device):
            _warn_once(f"torch._scaled_mm (fp8, row-wise scales) is not supported on {x.device}; "
                       "fp8 'matmul' mode falls back to 'storage' (dequantise, then bf16 matmul)")
            return False
        return True

    def _forward_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """A `[M, K]` row-major fp8 with per-row scales `[M, 1]`; B = weight.t() `[K, N]`, i.e.
        the `[N, K]` row-major weight seen column-major, with per-column scales `[1, N]`."""
        n, k = self.out_features, self.in_features
        x8, scale_a = quantize_rows(x.reshape(-1, k))
        scale_b = self.scale.float().reshape(1, -1)
        if scale_b.shape[1] != n:  # a per-tensor scale, should one be assigned
            scale_b = scale_b.expand(1, n).contiguous()
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                               out_dtype=torch.bfloat16)
        return out.reshape(*x.shape[:-1], n).to(x.dtype)

    def _apply(self, fn, recurse=True):
        fixed = {id(self.weight), id(self.scale)}

        def keep_format(t):
            out = fn(t)
            if id(t) in fixed and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_format, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mode={self.mode}"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"fp8 mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------------------------------------
# Models


def fp8_linear_names(model: nn.Module, include: tuple[str, ...] = BLOCK_PREFIXES) -> list[str]:
    """Names of the nn.Linear modules that `quantize_model` converts: those under `include`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(include)]


def float8_modules(model: nn.Module) -> dict[str, Float8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear)}


@torch.no_grad()
def quantize_model(model: nn.Module, *, mode: str = "storage", include: tuple[str, ...] = BLOCK_PREFIXES) -> nn.Module:
    """Replace the nn.Linear modules under `include` by Float8Linear, in place, one at a time
    (peak memory: the model plus one layer's fp32 copy). Works on any device; on the meta device
    it only swaps the modules, for `models.load_weights` to fill (quantising while reading)."""
    check_mode(mode)
    for name in fp8_linear_names(model, include):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Float8Linear.from_linear(getattr(owner, child), mode=mode))
    return model


def set_fp8_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every Float8Linear of `model` to `mode` ("storage" or "matmul")."""
    check_mode(mode)
    for m in float8_modules(model).values():
        m.mode = mode
    return model


# ---------------------------------------------------------------------------------------------
# State dicts: quantise while loading, the release's fp8 checkpoint, dequantise


def fp8_weight_modules(sd: StateDict) -> list[str]:
    """Module names whose `.weight` is stored as float8 in `sd`."""
    return [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dtype in _FP8_DTYPES]


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
        if w is None or w.dtype in _FP8_DTYPES:
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


# ---------------------------------------------------------------------------------------------
# Memory


def weight_bytes(module: nn.Module, *, by_dtype: bool = False):
    """Bytes of `module`'s parameters and buffers (meta tensors count too); with `by_dtype` a dict
    {dtype: bytes}. A Float8Linear costs 1 byte per weight + 4 per row (scale) + its bias."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    if not by_dtype:
        return sum(t.numel() * t.element_size() for t in tensors)
    out: dict[torch.dtype, int] = {}
    for t in tensors:
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out


def block_weight_bytes(preset, *, fp8: bool, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Weight bytes of one double block, one single block, everything outside the blocks and the
    whole DiT of `preset` (a name or a config) in `dtype`, with the blocks in fp8 if `fp8`
    (computed on the meta device: no memory)."""
    from . import build_model

    model = build_model(preset, device="meta", dtype=dtype)
    if fp8:
        quantize_model(model)
    total = weight_bytes(model)
    double = weight_bytes(model.double_blocks[0]) if len(model.double_blocks) else 0
    single = weight_bytes(model.single_blocks[0]) if len(model.single_blocks) else 0
    other = total - double * len(model.double_blocks) - single * len(model.single_blocks)
    return {"double_block": double, "single_block": single, "other": other, "total": total}


__all__ = [
    "BLOCK_PREFIXES", "E4M3_MAX", "FP8", "MODES", "Float8Linear", "block_weight_bytes", "dequantize_state_dict",
    "dequantize_weight", "fp8_linear_names", "float8_modules", "prepare_state_dict", "quantize_model",
    "quantize_rows", "quantize_state_dict", "quantize_weight", "read_fp8_map", "release_map_path",
    "scaled_mm_supported", "set_fp8_mode", "weight_bytes",
]
