"""FP8 weights (models/fp8.py): quantisation error, Float8Linear, quantised DiT, the release's fp8
checkpoint, quantise-at-load, state-dict round trip, fp8 matmul, memory accounting.

Every tolerance below is stated where it is asserted, with the reason for its size."""

import copy
import logging

import pytest
import torch
from tiny_checkpoints import write_release_fp8_dit

import models
from models import CheckpointError, fp8
from models.fp8_checkpoint import quantize_state_dict
from models.fp8 import FP8, Float8Linear
from models.sampling import TextConditioning, denoise_tokens
from models.scheduler import FlowMatchEuler

GRID = (3, 4, 6)  # token grid of the test inputs: 72 image tokens


def rel(a, b) -> float:
    """Relative Frobenius error |a - b| / |b| (in float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _inputs(cfg, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(2, 72, cfg.patch_dim_in, generator=g, dtype=dtype),
        txt=torch.randn(2, 10, cfg.text_states_dim, generator=g, dtype=dtype),
        txt_mask=torch.tensor([[1] * 7 + [0] * 3, [1] * 10]),
        timestep=torch.tensor([900.0, 300.0]),
        pooled=torch.randn(2, cfg.pooled_dim, generator=g, dtype=dtype),
        guidance=torch.full((2,), 6000.0),
    )


@torch.no_grad()
def _forward(model, dtype=torch.float32):
    cos, sin = model.rope(GRID)
    return model(rope_cos=cos, rope_sin=sin, **_inputs(model.config, dtype))


def _strong_gates(model):
    """Random init gives gates ~0.02, so the blocks carry only ~5% of the output and any error in
    them looks small. Scaling the modulation weights makes the gates O(1): the blocks then carry
    most of the output and the DiT tolerance below means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mod" in name and name.endswith("weight"):
                p.mul_(30)
    return model


def _without_blocks(model):
    m = copy.deepcopy(model)
    m.double_blocks, m.single_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
    return m


# --- (1) quantize_weight -----------------------------------------------------------------------


def test_quantize_weight_round_trip_error_bounds():
    g = torch.Generator().manual_seed(0)
    # Rows over 4 decades of magnitude, one all-zero row, one row with a single outlier.
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0
    w[9, 3] = 1e3
    w8, scale = fp8.quantize_weight(w)
    assert w8.dtype == FP8 and w8.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale, scale.bfloat16().float()), "scales must be bf16-exact (dequantised in bf16)"
    deq = fp8.dequantize_weight(w8, scale, torch.float32)
    assert torch.isfinite(deq).all() and torch.equal(deq[5], torch.zeros(96)) and scale[5] == 1
    # Per element: e4m3 keeps 3 mantissa bits, so rounding is <= 2^-4 relative for normal values;
    # below the smallest normal (2^-6 * scale) the spacing is 2^-9 * scale, i.e. <= 2^-10 * scale.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    # Whole tensor (rows without outliers): uniform rounding error over the binade gives ~2.6%
    # Frobenius for Gaussian rows (measured 0.026); 3e-2 is the brief's bound.
    rows = [i for i in range(64) if i != 9]
    assert rel(deq[rows], w[rows]) <= 3e-2


def test_quantize_weight_row_scale_is_amax_over_448():
    w = torch.tensor([[0.5, -448.0 * 3], [1.0, 2.0]])
    w8, scale = fp8.quantize_weight(w)
    torch.testing.assert_close(scale, torch.tensor([3.0, 2.0 / 448]).bfloat16().float())
    assert w8.float().abs().amax(1).tolist() == [448.0, 448.0]


# --- (2) Float8Linear against nn.Linear ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_storage_mode_matches_linear(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80).to(dtype)
    q = Float8Linear.from_linear(lin)
    x = torch.randn(3, 7, 96, dtype=dtype)
    with torch.no_grad():
        out, ref = q(x), lin(x)
    assert out.dtype == dtype and out.shape == ref.shape
    # Exactly F.linear with the dequantised weight (storage mode adds nothing else).
    assert torch.equal(out, torch.nn.functional.linear(x, q.dequantized_weight(dtype), lin.bias))
    # Against the unquantised layer: the weight's ~2.5% relative error passes to the output of a
    # random input at about the same size; bf16 rounding adds < 1%. Bound 4e-2.
    assert rel(out, ref) <= 4e-2
    assert q.weight.dtype == FP8 and not q.weight.requires_grad and q.bias.dtype == dtype


def test_forward_reads_swapped_tensors():
    """Layer streaming swaps a block's parameters between calls: no cached copies."""
    torch.manual_seed(0)
    q = Float8Linear.from_linear(torch.nn.Linear(32, 16))
    x = torch.randn(4, 32)
    before = q(x)
    other = Float8Linear.from_linear(torch.nn.Linear(32, 16))
    q.weight, q.bias = other.weight, other.bias
    q.scale = other.scale.clone()
    assert torch.equal(q(x), other(x)) and not torch.equal(q(x), before)


def test_dtype_casts_keep_the_fp8_format():
    q = Float8Linear.from_linear(torch.nn.Linear(32, 16))
    q.to(torch.float64)
    assert q.weight.dtype == FP8 and q.scale.dtype == torch.float32 and q.bias.dtype == torch.float64
    q.to("meta")
    assert q.weight.is_meta and q.weight.dtype == FP8 and q.scale.dtype == torch.float32


# --- (3) a whole tiny DiT --------------------------------------------------------------------------


def test_quantize_model_converts_the_release_set_of_linears():
    model = fp8.quantize_model(models.build_model("tiny", device="meta"))
    names = sorted(fp8.float8_modules(model))
    per_double = [f"{s}_{p}" for s in ("img", "txt") for p in ("mod.linear", "attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2")]
    expected = sorted(
        [f"double_blocks.{i}.{p}" for i in range(2) for p in per_double]
        + [f"single_blocks.{i}.{p}" for i in range(2) for p in ("linear1", "linear2", "modulation.linear")]
    )
    assert names == expected
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert plain and all(n.startswith(("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")) for n in plain)


def test_quantized_tiny_dit_forward_error():
    model = _strong_gates(models.build_model("tiny", seed=3))
    ref = _forward(model)
    assert rel(_forward(_without_blocks(model)), ref) > 0.5, "the blocks must carry the output"
    out = _forward(fp8.quantize_model(copy.deepcopy(model)))
    # fp32 on CPU, so the error is the fp8 weights' alone: ~2.5% per linear, through 4 blocks of
    # which each stacks 2-3 quantised linears on the residual path; measured 0.043. Bound 8e-2.
    assert rel(out, ref) <= 8e-2


def test_quantized_tiny_generation_latent_error():
    """A short generation (4 Euler steps) of the tiny DiT: latents of fp8 storage vs plain."""
    model = _strong_gates(models.build_model("tiny", seed=3))
    quant = fp8.quantize_model(copy.deepcopy(model))
    inp = _inputs(model.config)
    cond = TextConditioning(inp["txt"][:1], inp["txt_mask"][:1], inp["pooled"][:1])
    noise = inp["img"][:1]
    runs = [denoise_tokens(m, noise, m.rope(GRID), cond, FlowMatchEuler(steps=4)) for m in (model, quant)]
    # Latents = noise + sum of velocity steps; the velocity error (~4%, test above) enters scaled by
    # the step sizes, and the noise part is exact. Measured 0.031; bound 5e-2.
    assert rel(runs[1], runs[0]) <= 5e-2


# --- (4) the release's fp8 checkpoint ------------------------------------------------------------


def _dequantized_reference(sd, scales, dtype=torch.bfloat16):
    """A plain bf16 model holding w8.to(bf16) * scale.to(bf16), the release's own dequantisation."""
    ref = models.build_model("tiny", dtype=dtype)
    plain = {k: v for k, v in sd.items()}
    for name, s in scales.items():
        plain[f"{name}.weight"] = sd[f"{name}.weight"].to(dtype) * s.to(dtype)
    ref.load_state_dict(plain, strict=True)
    return ref


@pytest.mark.parametrize("map_dtype,shape", [(torch.float32, ()), (torch.bfloat16, (1,))])
def test_release_fp8_checkpoint_loads_and_equals_dequantised_model(tmp_path, map_dtype, shape):
    sd, scales = write_release_fp8_dit(tmp_path, map_dtype=map_dtype, scalar_shape=shape)
    model = fp8.quantize_model(models.build_model("tiny", device="meta", dtype=torch.bfloat16))
    models.load_weights(model, tmp_path)
    layer = model.double_blocks[0].img_attn_qkv
    assert layer.weight.dtype == FP8 and layer.scale.shape == (layer.out_features,)
    assert torch.equal(layer.weight.view(torch.uint8), sd["double_blocks.0.img_attn_qkv.weight"].view(torch.uint8))
    ref = _dequantized_reference(sd, scales)
    # Same bf16 weights, same kernels: the outputs are bit-identical (exact, not "close").
    assert torch.equal(_forward(model, torch.bfloat16), _forward(ref, torch.bfloat16))
    # A plain bf16 model given the fp8 files gets the same weights dequantised.
    plain = models.load_weights(models.build_model("tiny", device="meta", dtype=torch.bfloat16), tmp_path / "hunyuan-video-t2v-720p")
    assert torch.equal(plain.double_blocks[0].img_attn_qkv.weight, ref.double_blocks[0].img_attn_qkv.weight)


def test_model_dir_prefers_fp8_file_only_for_an_fp8_model(tmp_path):
    write_release_fp8_dit(tmp_path, seed=5)
    bf16 = models.build_model("tiny", seed=6)
    torch.save({"module": bf16.state_dict()}, tmp_path / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt")
    plain = models.load_weights(models.build_model("tiny", device="meta"), tmp_path)
    assert torch.equal(plain.final_layer.linear.weight, bf16.final_layer.linear.weight)
    quant = models.load_weights(fp8.quantize_model(models.build_model("tiny", device="meta")), tmp_path)
    assert not torch.equal(quant.final_layer.linear.weight, bf16.final_layer.linear.weight)  # seed 5's
    quant = models.load_weights(fp8.quantize_model(models.build_model("tiny", device="meta")), tmp_path, prefer_fp8=False)
    assert torch.equal(quant.final_layer.linear.weight, bf16.final_layer.linear.weight)


def test_release_fp8_map_errors_name_the_file_and_keys(tmp_path):
    sd, scales = write_release_fp8_dit(tmp_path)
    sub = tmp_path / "hunyuan-video-t2v-720p" / "transformers"
    map_path = sub / "mp_rank_00_model_states_fp8_map.pt"
    meta = lambda: fp8.quantize_model(models.build_model("tiny", device="meta", dtype=torch.bfloat16))  # noqa: E731
    del scales["single_blocks.1.linear2"]
    scales["single_blocks.9.linear1"] = torch.tensor(1.0)
    scales["double_blocks.0.img_attn_proj"] = torch.ones(7)
    torch.save(scales, map_path)
    with pytest.raises(CheckpointError) as err:
        models.load_weights(meta(), tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(map_path)) and "1 missing (single_blocks.1.linear2)" in msg
    assert "1 unexpected (single_blocks.9.linear1)" in msg and "1 mis-shaped (double_blocks.0.img_attn_proj (7,))" in msg
    map_path.unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states_fp8\.pt: 26 float8 weights .* no scale map .*_fp8_map\.pt"):
        models.load_weights(meta(), tmp_path)


def test_check_state_dict_refuses_unscaled_float8_either_way(tmp_path):
    from models.weights import check_state_dict

    quant = fp8.quantize_model(models.build_model("tiny", device="meta"))
    bf16_sd = models.build_model("tiny").state_dict()
    bf16_sd.update({f"{n}.scale": torch.ones(m.out_features) for n, m in fp8.float8_modules(quant).items()})
    with pytest.raises(CheckpointError, match=r"x\.pt: .*float8 tensors without their scales or unquantised \(double_blocks\.0\.img_mod\.linear\.weight torch\.float32 for torch\.float8_e4m3fn"):
        check_state_dict(quant, bf16_sd, "x.pt")


# --- (6) quantise at load; state_dict round trip ---------------------------------------------------


def test_bf16_checkpoint_quantised_while_loading_equals_quantize_model(tmp_path):
    src = models.build_model("tiny", dtype=torch.bfloat16, seed=4)
    (tmp_path / "transformers").mkdir()
    torch.save({"module": src.state_dict()}, tmp_path / "transformers" / "mp_rank_00_model_states.pt")
    loaded = models.load_weights(fp8.quantize_model(models.build_model("tiny", device="meta", dtype=torch.bfloat16)), tmp_path)
    direct = fp8.quantize_model(copy.deepcopy(src))
    a, b = loaded.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_quantized_state_dict_round_trip(tmp_path):
    model = fp8.quantize_model(models.build_model("tiny", seed=8))
    path = tmp_path / "fp8_ours.pt"
    torch.save({"module": model.state_dict()}, path)
    back = models.load_weights(fp8.quantize_model(models.build_model("tiny", device="meta")), path)
    assert torch.equal(_forward(back), _forward(model))


def test_quantize_state_dict_keeps_other_tensors_as_they_are():
    sd = models.build_model("tiny").state_dict()
    out = quantize_state_dict(sd, ["single_blocks.0.linear1", "no.such.module"])
    assert out["single_blocks.0.linear1.weight"].dtype == FP8 and out["single_blocks.0.linear1.scale"].shape == (3 * 128 + 512,)
    assert out["single_blocks.0.linear2.weight"] is sd["single_blocks.0.linear2.weight"]


# --- (5) the fp8 matmul path -----------------------------------------------------------------------


def _matmul_vs_storage(device):
    torch.manual_seed(0)
    q = Float8Linear.from_linear(torch.nn.Linear(256, 384).to(device=device, dtype=torch.bfloat16))
    x = torch.randn(5, 33, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        storage = q(x)
        q.mode = "matmul"
        matmul = q(x)
    assert matmul.dtype == torch.bfloat16 and matmul.shape == storage.shape
    # The only extra error is the activations' per-token e4m3 rounding (<= 2^-4 per element,
    # ~2.6% Frobenius like the weights) plus bf16 output rounding. Bound 4e-2.
    assert rel(matmul, storage) <= 4e-2


@pytest.mark.skipif(not fp8.scaled_mm_supported("cpu"), reason="torch._scaled_mm unsupported on this CPU build")
def test_matmul_mode_matches_storage_mode_cpu():
    _matmul_vs_storage("cpu")
    model = _strong_gates(models.build_model("tiny", seed=3, dtype=torch.bfloat16))
    quant = fp8.quantize_model(copy.deepcopy(model))
    storage = _forward(quant, torch.bfloat16)
    matmul = _forward(fp8.set_fp8_mode(quant, "matmul"), torch.bfloat16)
    # Whole DiT in bf16: activation rounding in every quantised linear adds about as much as the
    # weights did (measured 0.035 against storage mode). Bound 8e-2, as the weights' own bound.
    assert rel(matmul, storage) <= 8e-2


@pytest.mark.gpu
def test_matmul_mode_matches_storage_mode_cuda():
    if not fp8.scaled_mm_supported("cuda"):
        pytest.skip("this GPU has no fp8 _scaled_mm (capability < 8.9)")
    _matmul_vs_storage("cuda")
    # The compiled activation quantiser computes what the eager one does up to rounding: its
    # fused scale arithmetic puts some values one e4m3 step (6-12%) away from the eager choice
    # (measured 1.6e-2 Frobenius between the two on an H200), so each is held to the e4m3 error
    # bound against the input, as the weights are (3e-2), and the two to that bound apart.
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    (x8c, sc), (x8e, se) = fp8.row_quantizer(x), fp8.quantize_rows(x)
    assert x8c.dtype == FP8 and sc.shape == (300, 1)
    compiled, eager = x8c.float() * sc, x8e.float() * se
    assert rel(compiled, x.float()) <= 3e-2 and rel(eager, x.float()) <= 3e-2
    assert rel(compiled, eager) <= 3e-2


def test_matmul_mode_falls_back_with_one_warning(caplog):
    q = Float8Linear.from_linear(torch.nn.Linear(24, 16), mode="matmul")  # in=24: not a multiple of 16
    x = torch.randn(3, 24)
    with caplog.at_level(logging.WARNING, logger="models.fp8"):
        out = q(x)
        q(x)
    assert torch.equal(out, torch.nn.functional.linear(x, q.dequantized_weight(torch.float32), q.bias))
    assert len([r for r in caplog.records if "multiples of 16" in r.message]) <= 1


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="valid: storage, matmul"):
        fp8.quantize_model(models.build_model("tiny", device="meta"), mode="fast")


# --- memory ----------------------------------------------------------------------------------------


def test_weight_bytes_of_fp8_blocks():
    q = Float8Linear.from_linear(torch.nn.Linear(128, 64).bfloat16())
    assert fp8.weight_bytes(q) == 64 * 128 + 4 * 64 + 2 * 64
    assert fp8.weight_bytes(q, by_dtype=True) == {FP8: 64 * 128, torch.float32: 256, torch.bfloat16: 128}
    plain = fp8.block_weight_bytes("hunyuan-video-13b", fp8=False)
    quant = fp8.block_weight_bytes("hunyuan-video-13b", fp8=True)
    assert plain["total"] == 2 * 12_821_012_544  # the release's parameter count, bf16
    assert quant["other"] == plain["other"]
    for kind in ("double_block", "single_block"):
        assert 0.5 < quant[kind] / plain[kind] < 0.51  # 1 byte/weight + per-row scales and biases


def test_matmul_mode_uses_storage_for_a_few_rows():
    """The modulation linears see one row per batch item: dequantising is as cheap there."""
    q = Float8Linear.from_linear(torch.nn.Linear(64, 32).bfloat16(), mode="matmul")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.dequantized_weight(torch.bfloat16), q.bias))


def test_our_fp8_state_dict_into_a_plain_model_is_dequantised(tmp_path):
    quant = fp8.quantize_model(models.build_model("tiny", seed=8))
    torch.save(quant.state_dict(), tmp_path / "w.pt")
    plain = models.load_weights(models.build_model("tiny", device="meta"), tmp_path / "w.pt")
    assert torch.equal(plain.single_blocks[1].linear2.weight, quant.single_blocks[1].linear2.dequantized_weight(torch.float32))
    assert torch.equal(_forward(plain), _forward(quant))
