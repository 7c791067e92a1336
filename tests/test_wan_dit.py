"""The Wan2.1 DiT: release key listing, equality with diffusers' WanTransformer3DModel, the
checkpoint layouts, and the bf16 dtype policy. CPU only, tiny configs.

Regenerate the key listings (after a deliberate change of the model) with
    PYTHONPATH=. .venv/bin/python tests/test_wan_dit.py --write-keys
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.weights import CheckpointError, init_random_
from models.wan.checkpoint import diffusers_to_release, load_dit_weights, release_to_diffusers
from models.wan.config import PRESETS, WanConfig, get_preset
from models.attention import sdpa_joint_attention
from models.wan.dit import WanDiT, patchify, unpatchify
from models.wan.layers import timestep_sinusoid

DATA = Path(__file__).parent / "data"
KEY_FILES = {name: DATA / f"{name}_keys.txt" for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")}
# Counted on the meta device; the release calls them 1.3B and 14B (its fp32 1.3B file is 5.68 GB).
PARAMS = {"wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584}
CPU = torch.device("cpu")


def _meta_model(name: str) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(get_preset(name))


def _listing(model: torch.nn.Module) -> str:
    return "".join(f"{k}\t{tuple(v.shape)}\n" for k, v in model.state_dict().items())


@torch.no_grad()
def _tiny(dtype=torch.float64, seed=3, **overrides) -> WanDiT:
    """Seeded random weights, the norms' too (init_random_ sets them to 1 and 0, which would let
    a mix-up of two norms' keys pass unnoticed)."""
    model = init_random_(WanDiT(get_preset("wan-tiny", **overrides)).to(device=CPU, dtype=dtype), seed)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval().requires_grad_(False)


def _diffusers_model(cfg: WanConfig):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.mlp_hidden, num_layers=cfg.depth, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    )


class _Fp64Sinusoid(torch.nn.Module):
    """diffusers computes the timestep sinusoid in fp32 (arguments up to 1000 rad lose ~1e-4);
    the release computes it in fp64. For the fp64 comparison diffusers gets the release's."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_sinusoid(t, self.dim)


def _inputs(cfg: WanConfig, batch: int, grid, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    shape = (batch, cfg.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    lat = torch.randn(shape, generator=g, dtype=dtype)
    txt = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    mask = torch.ones(batch, cfg.text_len)
    mask[0, 5:] = 0  # item 0 has 5 valid tokens; the rest is garbage the DiT must zero
    t = torch.tensor([999.0, 412.5, 3.25][:batch], dtype=dtype)
    return lat, txt, mask, t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KEY_FILES))
def test_release_key_listing_and_parameter_count(name):
    model = _meta_model(name)
    assert _listing(model) == KEY_FILES[name].read_text()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(KEY_FILES))
def test_release_keys_convert_to_the_diffusers_model_keys(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        ref = _diffusers_model(cfg)
    ours = release_to_diffusers(_meta_model(name).state_dict())
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_config_geometry_and_validation():
    cfg = get_preset("wan2.1-t2v-1.3b")
    assert cfg.head_dim == 128 and cfg.rope_axes_dim == (44, 42, 42) and not cfg.guidance_embed
    assert cfg.latent_grid(480, 832, 81) == (21, 60, 104)
    assert cfg.token_grid(480, 832, 81) == (21, 30, 52)  # 32760 tokens, the release's 480p seq_len
    assert get_preset("wan-tiny").rope_axes_dim == (8, 4, 4) and get_preset("wan-tiny").vae_preset == "tiny"
    with pytest.raises(ValueError, match="not divisible"):
        get_preset("wan-tiny", num_heads=5)
    with pytest.raises(ValueError, match="even and >= 6"):
        get_preset("wan-tiny", hidden_size=16, num_heads=4)
    with pytest.raises(ValueError, match="valid: "):
        get_preset("wan-huge")
    assert set(PRESETS) >= {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-tiny"}


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 16, 3, 6, 10)
    tok = patchify(x, (1, 2, 2))
    assert tok.shape == (2, 3 * 3 * 5, 64)
    assert torch.equal(unpatchify(tok, (3, 3, 5), (1, 2, 2)), x)
    # token 1 is (t=0, h=0, w=1); within it channel 0 holds its 2x2 patch first
    assert torch.equal(tok[0, 1, :4], x[0, 0, 0, 0:2, 2:4].reshape(-1))


def test_rope_equals_diffusers_table():
    model = _tiny()
    ref = _diffusers_model(model.config).double()
    lat = torch.zeros(1, 16, 3, 10, 14, dtype=torch.float64)
    ref_cos, ref_sin = ref.rope(lat)  # [1, S, 1, D], fp64 tables rounded to fp32 by diffusers
    cos, sin = model.rope((3, 5, 7))
    assert cos.dtype == torch.float32 and cos.shape == (105, 16)
    assert torch.equal(cos, ref_cos[0, :, 0].float()) and torch.equal(sin, ref_sin[0, :, 0].float())
    cos64, sin64 = model.rope((3, 5, 7), torch.float64)
    torch.testing.assert_close(cos64, ref_cos[0, :, 0], rtol=0, atol=1e-7)
    assert torch.equal(cos64.float(), cos) and torch.equal(sin64.float(), sin)


# ---- equality with diffusers -----------------------------------------------------------------


def _run_ours(model, lat, txt, mask, t, grid):
    cos, sin = model.rope(grid, torch.float64)
    out = model(patchify(lat, model.config.patch_size), cos, sin, txt, mask, t)
    return unpatchify(out, grid, model.config.patch_size)


def _run_diffusers(ref, lat, txt, mask, t):
    # The release zero-pads each trimmed prompt to text_len and attends to all of it.
    return ref(lat, t, txt * mask[..., None].to(txt.dtype), return_dict=False)[0]


@pytest.mark.parametrize("batch,grid", [(1, (1, 3, 5)), (2, (3, 3, 5)), (2, (2, 5, 7)), (1, (4, 2, 2))])
@torch.no_grad()
def test_forward_equals_diffusers(batch, grid):
    ours = _tiny()
    ref = _diffusers_model(ours.config).double().eval()
    ref.load_state_dict(release_to_diffusers(ours.state_dict()), strict=True)
    ref.condition_embedder.timesteps_proj = _Fp64Sinusoid(ours.config.freq_dim)
    lat, txt, mask, t = _inputs(ours.config, batch, grid)
    out, want = _run_ours(ours, lat, txt, mask, t, grid), _run_diffusers(ref, lat, txt, mask, t)
    assert out.shape == want.shape == lat.shape
    assert _rel(out, want) < 1e-6


@torch.no_grad()
def test_forward_equals_unpatched_diffusers_up_to_its_fp32_sinusoid():
    ours = _tiny()
    ref = _diffusers_model(ours.config).double().eval()
    ref.load_state_dict(release_to_diffusers(ours.state_dict()), strict=True)
    lat, txt, mask, t = _inputs(ours.config, 2, (2, 3, 3))
    assert _rel(_run_ours(ours, lat, txt, mask, t, (2, 3, 3)), _run_diffusers(ref, lat, txt, mask, t)) < 1e-5


@torch.no_grad()
def test_diffusers_weights_load_into_ours_and_agree(tmp_path):
    """Weights initialised by diffusers, saved by diffusers, read through load_dit_weights."""
    cfg = get_preset("wan-tiny")
    torch.manual_seed(11)
    ref = _diffusers_model(cfg).double().eval()
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours = load_dit_weights(WanDiT(cfg).to(CPU, torch.float64).eval(), tmp_path)
    ref.condition_embedder.timesteps_proj = _Fp64Sinusoid(cfg.freq_dim)
    lat, txt, mask, t = _inputs(cfg, 2, (3, 2, 3))
    assert _rel(_run_ours(ours, lat, txt, mask, t, (3, 2, 3)), _run_diffusers(ref, lat, txt, mask, t)) < 1e-6


@torch.no_grad()
def test_short_text_is_zero_padded_and_masked_text_ignored():
    model = _tiny()
    lat, txt, mask, t = _inputs(model.config, 2, (2, 2, 3))
    grid = (2, 2, 3)
    full = _run_ours(model, lat, txt, mask, t, grid)
    garbage = txt.clone()
    garbage[0, 5:] = 1e3  # masked positions carry anything: the DiT zeroes them as the release trims
    assert torch.equal(_run_ours(model, lat, garbage, mask, t, grid), full)
    short = txt[1:, :7]  # 7 valid tokens, padded to text_len inside
    ref = txt[1:].clone()
    ref[:, 7:] = 0
    one = _run_ours(model, lat[1:], short, torch.ones(1, 7), t[1:], grid)
    padded = _run_ours(model, lat[1:], ref, torch.ones(1, 16), t[1:], grid)
    torch.testing.assert_close(one, padded, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="text_len"):
        _run_ours(model, lat, torch.zeros(2, 17, 32, dtype=torch.float64), torch.ones(2, 17), t, grid)


@torch.no_grad()
def test_self_attention_goes_through_set_attention():
    model = _tiny()
    calls = []

    def spy(q, k, v, txt_q, txt_k, txt_v, txt_lens):
        calls.append((tuple(q.shape), txt_q, txt_k, txt_v, txt_lens))
        return sdpa_joint_attention(q, k, v, None, None, None, None)

    lat, txt, mask, t = _inputs(model.config, 1, (1, 3, 5))
    base = _run_ours(model, lat, txt, mask, t, (1, 3, 5))
    model.set_attention(spy)
    assert "_attention" not in dict(model.named_modules()) and "_attention" not in model.state_dict()
    assert torch.equal(_run_ours(model, lat, txt, mask, t, (1, 3, 5)), base)
    assert calls == [((1, 15, 4, 16), None, None, None, None)] * model.config.depth


# ---- checkpoint layouts ------------------------------------------------------------------------


def test_release_diffusers_round_trip_is_lossless():
    sd = _tiny(torch.float32).state_dict()
    d = release_to_diffusers(sd)
    assert {"blocks.0.attn2.norm_k.weight", "blocks.0.norm2.bias", "scale_shift_table"} <= d.keys()
    assert "blocks.0.norm3.weight" not in d  # the release's cross-attn norm3 is diffusers' norm2
    back = diffusers_to_release(d)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ref = _diffusers_model(get_preset("wan-tiny"))
    ref_sd = ref.state_dict()
    again = release_to_diffusers(diffusers_to_release(ref_sd))
    assert again.keys() == ref_sd.keys() and all(torch.equal(again[k], v) for k, v in ref_sd.items())


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_release_folder_single_and_sharded(tmp_path):
    src = _tiny(torch.float32, seed=5)
    sd = src.state_dict()
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, single / "diffusion_pytorch_model.safetensors")
    assert _equal(load_dit_weights(_tiny(torch.float32, seed=9), single), src)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:30],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[30:]}
    for fname, part in shards.items():
        save_file({k: sd[k] for k in part}, sharded / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with torch.device("meta"):
        meta = WanDiT(get_preset("wan-tiny"))
    assert _equal(load_dit_weights(meta, sharded), src)  # a meta model takes the tensors as they are


def test_diffusers_folder_loads(tmp_path):
    src = _tiny(torch.float32, seed=5)
    ref = _diffusers_model(src.config)
    ref.load_state_dict(release_to_diffusers(src.state_dict()), strict=True)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    assert _equal(load_dit_weights(_tiny(torch.float32, seed=9), tmp_path), src)
    assert _equal(load_dit_weights(_tiny(torch.float32, seed=9), tmp_path / "transformer"), src)


def test_bad_checkpoints_raise_naming_file_and_key(tmp_path):
    sd = _tiny(torch.float32).state_dict()
    missing = dict(sd)
    del missing["blocks.1.cross_attn.norm_k.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    msg = r"missing\.safetensors.*1 missing \(blocks\.1\.cross_attn\.norm_k\.weight\)"
    with pytest.raises(CheckpointError, match=msg):
        load_dit_weights(_tiny(torch.float32), tmp_path / "missing.safetensors")
    wrong = dict(sd)
    wrong["head.head.weight"] = torch.zeros(64, 63)
    save_file(wrong, tmp_path / "wrong.safetensors")
    msg = r"wrong\.safetensors.*mis-shaped \(head\.head\.weight \(64, 63\)"
    with pytest.raises(CheckpointError, match=msg):
        load_dit_weights(_tiny(torch.float32), tmp_path / "wrong.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*diffusion_pytorch_model"):
        load_dit_weights(_tiny(torch.float32), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit_weights(_tiny(torch.float32), tmp_path / "nowhere.safetensors")


# ---- dtype policy ------------------------------------------------------------------------------


def test_bf16_keeps_fp32_parts_and_stays_close_to_fp32():
    fp32 = _tiny(torch.float32, seed=4)
    bf16 = _tiny(torch.float32, seed=4).to(torch.bfloat16)
    dtypes = {k: v.dtype for k, v in bf16.state_dict().items()}
    kept = [k for k in dtypes if k.startswith(("time_", "head.")) or "modulation" in k or "norm" in k]
    assert kept and all(dtypes[k] == torch.float32 for k in kept)
    assert all(dtypes[k] == torch.bfloat16 for k in dtypes if k not in kept)
    sd32 = fp32.state_dict()
    assert all(torch.equal(bf16.state_dict()[k], sd32[k]) for k in kept)  # values untouched
    assert bf16.dtype == torch.bfloat16
    assert _tiny(torch.float32).to(torch.float64).head.modulation.dtype == torch.float64
    bf16.blocks[0].to(torch.bfloat16)  # a block cast on its own keeps them too (layer streaming)
    assert bf16.blocks[0].modulation.dtype == torch.float32

    seen = {}
    bf16.blocks[0].register_forward_pre_hook(
        lambda m, a: seen.update(x=a[0].dtype, e0=a[1].dtype, ctx=a[4].dtype)
    )
    bf16.blocks[1].register_forward_pre_hook(lambda m, a: seen.update(x1=a[0].dtype))
    lat, txt, mask, t = _inputs(fp32.config, 2, (2, 3, 5), dtype=torch.float32)
    cos, sin = fp32.rope((2, 3, 5))
    tok = patchify(lat, fp32.config.patch_size)
    with torch.no_grad():
        want = fp32(tok, cos, sin, txt, mask, t)
        got = bf16(tok, cos, sin, txt, mask, t)
    assert seen == {"x": torch.bfloat16, "e0": torch.float32, "ctx": torch.bfloat16, "x1": torch.float32}
    assert got.dtype == torch.float32 and want.dtype == torch.float32
    assert _rel(got, want) < 2e-2


def _write_keys() -> None:
    for name, path in KEY_FILES.items():
        path.write_text(_listing(_meta_model(name)))
        print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-keys"]:
        _write_keys()
