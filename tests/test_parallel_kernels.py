"""Local attention kernels, log-sum-exp merges and the single-process reference (one process).

The GPU-marked test checks every fused kernel's output and LSE convention against the math
kernel on the device (run on a GPU machine: ``pytest -m gpu tests/test_parallel_kernels.py``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from parallel import kernels
from parallel.kernels import KERNELS, math_attention, probe_kernel, select_kernel
from parallel.local import TextKV, attend, local_joint_attention, merge_blocks, merge_stacked


def rand(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sdpa(q, k, v, mask=None):
    """torch's SDPA on [B, S, H, D] (an independent implementation)."""
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m).transpose(1, 2)


def explicit_lse(q, k, scale, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1)


def test_math_kernel_matches_sdpa_and_explicit_lse():
    q, k, v = rand(2, 7, 3, 8, seed=1), rand(2, 11, 3, 8, seed=2), rand(2, 11, 3, 8, seed=3)
    scale = 1 / math.sqrt(8)
    out, lse = math_attention(q, k, v, scale)
    assert out.shape == q.shape and lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    assert rel(out, sdpa(q, k, v)) < 1e-6
    assert (lse.double() - explicit_lse(q, k, scale)).abs().max() < 1e-5


def test_math_kernel_key_mask_blocks_and_empty_rows(monkeypatch):
    q, k, v = rand(2, 9, 2, 4, seed=4), rand(2, 6, 2, 4, seed=5), rand(2, 6, 2, 4, seed=6)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    monkeypatch.setattr(kernels, "_MATH_BLOCK_ELEMENTS", 2 * 2 * 6 * 2)  # 2 query rows per block
    out, lse = math_attention(q, k, v, 0.5, key_mask=mask)
    ref = sdpa(q[:1], k[:1], v[:1], mask[:1])
    assert rel(out[:1], ref) < 1e-6
    assert (lse[:1].double() - explicit_lse(q[:1], k[:1], 0.5, mask[:1])).abs().max() < 1e-5
    # an item with no key at all: zero rows, lse -inf, never NaN
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_disjoint_key_blocks_is_exact(dtype):
    q, k, v = rand(1, 5, 2, 8, seed=7, dtype=dtype), rand(1, 12, 2, 8, seed=8, dtype=dtype), rand(1, 12, 2, 8, seed=9, dtype=dtype)
    full, _ = math_attention(q, k, v, 0.3)
    parts = [math_attention(q, k[:, a:b], v[:, a:b], 0.3) for a, b in ((0, 4), (4, 5), (5, 12))]
    merged = merge_blocks([p[0] for p in parts], [p[1] for p in parts], torch.float32)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert merged.dtype == torch.float32 and rel(merged, full) < tol
    assert merge_blocks([parts[0][0]], [parts[0][1]], dtype).dtype == dtype
    # the stacked merge (token-major lse), with an empty partial that must weigh nothing
    outs = torch.stack([p[0].float() for p in parts] + [torch.full_like(parts[0][0].float(), 7.0)])
    lses = torch.stack([p[1].transpose(1, 2) for p in parts] + [torch.full_like(parts[0][1].transpose(1, 2), float("-inf"))])
    assert rel(merge_stacked(outs, lses), full) < tol


def test_attend_slices_text_per_item():
    q, k, v = rand(3, 4, 2, 8, seed=10), rand(3, 6, 2, 8, seed=11), rand(3, 6, 2, 8, seed=12)
    tk, tv = rand(3, 5, 2, 8, seed=13), rand(3, 5, 2, 8, seed=14)
    lens = (5, 2, 0)
    out, lse = attend(q, k, v, math_attention, 0.25, TextKV(tk, tv, lens))
    for b, n in enumerate(lens):
        keys = torch.cat([k[b : b + 1], tk[b : b + 1, :n]], 1)
        vals = torch.cat([v[b : b + 1], tv[b : b + 1, :n]], 1)
        ref, ref_lse = math_attention(q[b : b + 1], keys, vals, 0.25)
        assert rel(out[b : b + 1], ref) < 1e-6 and (lse[b] - ref_lse[0]).abs().max() < 1e-5
    # no image keys and no text for one item: that item is empty, the others are not
    out, lse = attend(q, k[:, :0], v[:, :0], math_attention, 0.25, TextKV(tk, tv, lens))
    assert torch.isneginf(lse[2]).all() and torch.isfinite(lse[:2]).all() and not out.isnan().any()
    assert attend(q, k[:, :0], v[:, :0], math_attention, 0.25) is None


def test_local_joint_attention_matches_per_item_sdpa():
    b, s, l, h, d = 2, 10, 6, 2, 8
    img = [rand(b, s, h, d, seed=20 + i) for i in range(3)]
    txt = [rand(b, l, h, d, seed=30 + i) for i in range(3)]
    lens = torch.tensor([6, 3])
    n_img = 7  # the last 3 image tokens are padding
    img_out, txt_out = local_joint_attention(*img, *txt, lens, num_valid_tokens=n_img)
    for i in range(b):
        n = int(lens[i])
        q = torch.cat([img[0][i : i + 1], txt[0][i : i + 1]], 1)
        k = torch.cat([img[1][i : i + 1, :n_img], txt[1][i : i + 1, :n]], 1)
        v = torch.cat([img[2][i : i + 1, :n_img], txt[2][i : i + 1, :n]], 1)
        ref = sdpa(q, k, v)
        assert rel(img_out[i : i + 1], ref[:, :s]) < 1e-6
        assert rel(txt_out[i : i + 1, :n], ref[:, s : s + n]) < 1e-6
        assert torch.equal(txt_out[i, n:], torch.zeros_like(txt_out[i, n:]))
    # no text
    out, none = local_joint_attention(*img, None, None, None, None)
    assert none is None and rel(out, sdpa(*img)) < 1e-6


def test_kernel_selection_on_cpu_and_unknown_names():
    assert select_kernel("auto", torch.device("cpu"), torch.float32, 64)[0] == "math"
    assert select_kernel("auto", torch.device("cpu"), torch.bfloat16, 64)[0] == "math"
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'; valid: auto, cudnn"):
        select_kernel("nope", torch.device("cpu"), torch.float32, 64)
    # a kernel that cannot run here is reported, not raised
    assert probe_kernel("cudnn", torch.device("cpu"), torch.bfloat16, 64) is not None
    assert probe_kernel("math", torch.device("cpu"), torch.float32, 64) is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cudnn", "flash", "efficient", "fa2", "fa3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_output_and_lse_convention(name, dtype):
    if name in ("fa2", "fa3"):
        pytest.importorskip("flash_attn" if name == "fa2" else "flash_attn_interface")
    dev = torch.device("cuda")
    q, k, v = rand(2, 300, 4, 128, seed=1, dtype=dtype, device=dev), rand(2, 517, 4, 128, seed=2, dtype=dtype, device=dev), rand(2, 517, 4, 128, seed=3, dtype=dtype, device=dev)
    k_view, v_view = k[:, :389], v[:, :389]  # a prefix view, as the ring passes to kernels
    out, lse = KERNELS[name](q, k_view, v_view, 1 / math.sqrt(128))
    ref, ref_lse = math_attention(q, k_view, v_view, 1 / math.sqrt(128))
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, 4, 300)
    assert rel(out.float(), ref.float()) < 1e-2
    assert (lse - ref_lse).abs().max() < 1e-2


@pytest.mark.gpu
def test_gpu_fused_merge_equals_the_eager_merge():
    """The compiled one-kernel merge of ring blocks computes what the eager float32 merge does."""
    from parallel.local import _merge_blocks_eager

    dev = torch.device("cuda")
    q = rand(1, 700, 4, 128, seed=1, dtype=torch.bfloat16, device=dev)
    parts = [KERNELS["cudnn"](q, rand(1, 300, 4, 128, seed=s, dtype=torch.bfloat16, device=dev),
                              rand(1, 300, 4, 128, seed=s + 10, dtype=torch.bfloat16, device=dev), 1 / math.sqrt(128))
             for s in range(2, 6)]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    fused = merge_blocks(outs, lses, torch.bfloat16)
    eager = _merge_blocks_eager(outs, lses, torch.bfloat16)
    assert fused.dtype == torch.bfloat16 and rel(fused.float(), eager.float()) < 4e-3


# --- run-time fallback (CPU: every fused kernel raises here, a real failure) ------------------------


def test_a_kernel_that_raises_gives_way_down_to_math_with_the_same_result(caplog):
    """On the CPU the fused kernels raise (NotImplementedError for the device, ImportError for
    flash-attn): a chain starting at cuDNN ends on math within the first call, warns at each
    switch, keeps the switches, and returns what math returns."""
    q, k, v = rand(1, 24, 2, 16, seed=1), rand(1, 40, 2, 16, seed=2), rand(1, 40, 2, 16, seed=3)
    chain = kernels.KernelChain("cudnn")
    with caplog.at_level("WARNING", logger="launcher"):
        out, lse = chain(q, k, v, 0.25)
    ref_out, ref_lse = math_attention(q, k, v, 0.25)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert chain.name == "math" and [f["to"] for f in chain.fallbacks] == ["fa3", "fa2", "flash", "efficient", "math"]
    assert len([r for r in caplog.records if "gives way to" in r.message]) == 5
    chain(q, k, v, 0.25)  # later calls run math directly: no new switch
    assert len(chain.fallbacks) == 5


def test_math_failing_is_not_swallowed_and_adopt_moves_only_down():
    chain = kernels.KernelChain("efficient")
    chain.adopt(kernels.FALLBACK_ORDER.index("flash"))  # behind it: ignored
    assert chain.name == "efficient" and chain.fallbacks == []
    chain.adopt(kernels.FALLBACK_ORDER.index("math"))
    assert chain.name == "math" and chain.fallbacks[-1]["error"] == "another rank's kernel failed"
    with pytest.raises(RuntimeError):
        chain(rand(1, 4, 2, 8), rand(1, 4, 2, 16), rand(1, 4, 2, 16), 0.25)  # bad shapes: math raises
