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
Checkpoints (quantising while reading, the release's fp8 file and its map): models/fp8_checkpoint.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MODES = ("storage", "matmul")
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MIN_MATMUL_ROWS = 16  # fewer rows (tokens) than this compute in storage mode even in "matmul"
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


class _RowQuantizer:
    """`quantize_rows`, compiled with torch.compile on CUDA. Eager it makes ~5 passes over the
    activations (abs, amax, multiply, clamp, cast), which at 720p costs about what the fp8 GEMM
    saves on the wide layers (fc2: K = 12288, linear2: K = 15360); compiled it is one fused
    reduction + cast. Falls back to eager, with one warning, if compilation fails."""

    def __init__(self):
        self.enabled = True
        self._compiled = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.enabled and x.is_cuda):
            return quantize_rows(x)
        if self._compiled is None:
            self._compiled = torch.compile(quantize_rows, dynamic=True)
        try:
            return self._compiled(x)
        except Exception as err:  # any compiler failure: eager is correct, only slower
            self.enabled = False
            _warn_once(f"torch.compile of the fp8 activation quantiser failed ({type(err).__name__}: {err}); using eager")
            return quantize_rows(x)


# One per process (compiled code is shared by every layer); `row_quantizer.enabled = False`
# forces eager, e.g. to time the difference.
row_quantizer = _RowQuantizer()


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
        self.use_fast_accum = True

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

    def rows(self, rows: slice) -> "Float8Rows":
        """The output features ``rows`` of this layer as a callable of its own, on views of the
        same tensors (no copy; taken when called for, as ``forward`` reads them)."""
        return Float8Rows(self, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., in]` -> `[..., out]` in x's dtype."""
        if self.mode == "matmul" and self._matmul_ok(x):
            return self._forward_matmul(x)
        return self._forward_storage(x)

    def _forward_storage(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _matmul_ok(self, x: torch.Tensor) -> bool:
        # A handful of rows (the modulation linears see one per batch item) is bound by the
        # weight's bytes, where dequantising costs as little; it also keeps tiny-M shapes away
        # from the fp8 GEMM kernels.
        if x.numel() < MIN_MATMUL_ROWS * self.in_features:
            return False
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
        x8, scale_a = row_quantizer(x.reshape(-1, k))
        scale_b = self.scale.float().reshape(1, -1)
        if scale_b.shape[1] != n:  # a per-tensor scale, should one be assigned
            scale_b = scale_b.expand(1, n).contiguous()
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        # Fast accumulation (Hopper's fp8 accumulator, promoted periodically) is what fp8 inference
        # stacks use for forward passes; `use_fast_accum = False` on the module turns it off.
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=self.use_fast_accum)
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


class Float8Rows:
    """``Float8Linear.rows``: output features ``rows`` of a layer, computed as the layer computes
    them, on views of its tensors. A plain object rather than a Module because a block makes one
    inside its forward (the single-stream block's fused ``linear1``), where torch.compile cannot
    construct Parameters (each one would be a graph break)."""

    def __init__(self, layer: Float8Linear, rows: slice):
        self.weight, self.scale = layer.weight[rows], layer.scale[rows]
        self.bias = None if layer.bias is None else layer.bias[rows]
        self.out_features, self.in_features = self.weight.shape
        self.mode, self.use_fast_accum = layer.mode, layer.use_fast_accum

    # The layer's own code, so both compute alike.
    __call__ = forward = Float8Linear.forward
    dequantized_weight = Float8Linear.dequantized_weight
    _forward_storage = Float8Linear._forward_storage
    _matmul_ok = Float8Linear._matmul_ok
    _forward_matmul = Float8Linear._forward_matmul


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
    "BLOCK_PREFIXES", "E4M3_MAX", "FP8", "FP8_DTYPES", "MODES", "Float8Linear", "Float8Rows", "block_weight_bytes",
    "dequantize_weight", "fp8_linear_names", "float8_modules", "quantize_model", "quantize_rows",
    "quantize_weight", "row_quantizer", "scaled_mm_supported", "set_fp8_mode", "weight_bytes",
]
