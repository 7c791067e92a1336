"""The Wan2.1 VAE (models/wan/vae*.py) against diffusers' AutoencoderKLWan with the same weights.

CPU, fp32, tiny configs. diffusers' decode takes raw latents, ours the DiT's normalised ones, so
the references are fed `denormalize(z)` and our encode is compared after `normalize`.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.weights import CheckpointError, init_random_
from models.wan.vae import (
    RELEASE_FILE,
    VAE_PRESETS,
    WAN21_LATENTS_MEAN,
    WanVAE,
    WanVaeConfig,
    diffusers_to_release,
    find_vae_files,
    load_vae,
    release_to_diffusers,
    vae_params,
)
from models.wan.vae_tiling import (
    DEFAULT_TILING,
    TILING_PRESETS,
    VaeTiling,
    _decoder_widths,
    decode_bytes,
    tile_shape,
    tiling_config,
)

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan
CPU = torch.device("cpu")
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def diffusers_twin(ours: WanVAE) -> AutoencoderKLWan:
    """diffusers' model of the same config holding our weights (through release_to_diffusers)."""
    cfg = ours.config
    ref = AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    )  # fmt: skip
    ref.load_state_dict(release_to_diffusers(ours.state_dict()), strict=True)
    return ref.to(CPU).eval()


def tiny_vae(config: WanVaeConfig | None = None, seed: int = 0) -> WanVAE:
    model = WanVAE(config or VAE_PRESETS["tiny"]).to(CPU)
    return init_random_(model, seed).eval()


@pytest.fixture(scope="module")
def pair():
    ours = tiny_vae()
    return ours, diffusers_twin(ours)


def latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- (a) encode / decode equal diffusers' ---------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16, 1, 4, 4), (1, 16, 3, 5, 7), (2, 16, 2, 3, 6)])
def test_decode_matches_diffusers(pair, shape):
    ours, ref = pair
    z = latents(shape)
    got = ours.decode(z)
    with torch.no_grad():
        want = ref.decode(ours.denormalize(z)).sample
    t = shape[2]
    assert got.shape == (shape[0], 3, 4 * (t - 1) + 1, 8 * shape[3], 8 * shape[4]) == want.shape
    assert got.dtype == torch.float32
    assert (got.abs() < 1).float().mean() > 0.9  # the comparison is not hidden by the clamp
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("shape", [(1, 3, 1, 32, 32), (1, 3, 9, 40, 56)])
def test_encode_matches_diffusers(pair, shape):
    ours, ref = pair
    video = latents(shape, seed=1).clamp(-1, 1)
    got = ours.encode(video)
    with torch.no_grad():
        want = ref.encode(video).latent_dist.mode()
    assert got.shape == (1, 16, (shape[2] - 1) // 4 + 1, shape[3] // 8, shape[4] // 8) == want.shape
    assert rel_err(got, ours.normalize(want)) < TOL
    assert rel_err(ours.denormalize(got), want) < TOL


def test_normalisation_is_the_release_one(pair):
    ours, _ = pair
    mu = latents((1, 16, 1, 2, 2))
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(VAE_PRESETS["wan2.1"].latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(ours.normalize(mu), (mu - mean) / std)
    torch.testing.assert_close(ours.denormalize(ours.normalize(mu)), mu)


def test_bad_shapes_raise(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="4k\\+1"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="8m"):
        ours.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 4, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode(pair, dtype):
    ours, _ = pair
    half = tiny_vae().to(dtype)
    z = latents((1, 16, 2, 4, 4))
    got = half.decode(z)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - ours.decode(z)).abs().max() < 0.1
    assert half.encode(latents((1, 3, 5, 16, 16)).clamp(-1, 1)).dtype == torch.float32


# ---- (b) tiled decode ------------------------------------------------------------------------


@pytest.mark.slow
def test_tiled_decode_matches_diffusers_and_untiled(pair):
    ours, ref = pair
    z = latents((1, 16, 3, 12, 20), seed=2)
    tiling = VaeTiling(tile=8, stride=6)
    got = ours.decode(z, tiling=tiling)
    tile, stride = tiling.pixels()
    ref.enable_tiling(
        tile_sample_min_height=tile, tile_sample_min_width=tile,
        tile_sample_stride_height=stride, tile_sample_stride_width=stride,
    )  # fmt: skip
    try:
        with torch.no_grad():
            want = ref.decode(ours.denormalize(z)).sample
    finally:
        ref.disable_tiling()
    assert got.shape == want.shape == (1, 3, 9, 96, 160)
    assert rel_err(got, want) < TOL
    # Tiles see zero borders and their own middle attention, so tiled != untiled; with random
    # weights and 64-px tiles the gap is ~1/4 of the gap to an unrelated video's decode.
    full, unrelated = ours.decode(z), ours.decode(latents(z.shape, seed=3))
    assert (got - full).abs().mean() < 0.4 * (unrelated - full).abs().mean()


@pytest.mark.slow
def test_tiling_presets_and_small_latents(pair):
    ours, _ = pair
    assert DEFAULT_TILING == "tiles" and TILING_PRESETS["tiles"].pixels() == (256, 192)
    assert TILING_PRESETS["small"].pixels() == (128, 96)
    assert tiling_config("auto") == TILING_PRESETS["tiles"] and tiling_config("off") is None
    with pytest.raises(ValueError, match="valid: off, auto, tiles, small"):
        tiling_config("huge")
    with pytest.raises(ValueError, match="stride"):
        VaeTiling(tile=8, stride=9)
    z = latents((1, 16, 2, 6, 8))  # fits in one tile: the plain decode, bit for bit
    torch.testing.assert_close(ours.decode(z, tiling=VaeTiling(tile=8, stride=6)), ours.decode(z), rtol=0, atol=0)


# ---- (c) key layout and size of the release model ---------------------------------------------


def test_release_keys_equal_converted_diffusers_keys():
    with torch.device("meta"):
        ref, ours = AutoencoderKLWan(), WanVAE(VAE_PRESETS["wan2.1"])
    converted = {k: tuple(v.shape) for k, v in diffusers_to_release(ref.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(converted) == 194
    n_ref = sum(p.numel() for p in ref.parameters())
    assert vae_params("wan2.1") == n_ref == 126_892_531
    assert vae_params("tiny") < 1_000_000


@pytest.mark.parametrize("preset", ["wan2.1", "tiny"])
def test_key_conversion_is_lossless(preset):
    with torch.device("meta"):
        sd = WanVAE(VAE_PRESETS[preset]).state_dict()
    there = release_to_diffusers(sd)
    assert len(there) == len(sd) and {id(v) for v in there.values()} == {id(v) for v in sd.values()}
    back = diffusers_to_release(there)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    deeper = WanVaeConfig(base_dim=4, dim_mult=(1, 1, 2, 2), num_res_blocks=3)
    with torch.device("meta"):
        sd3 = WanVAE(deeper).state_dict()
    assert diffusers_to_release(release_to_diffusers(sd3)).keys() == sd3.keys()


def test_config_validation():
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVaeConfig(temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="z_dim"):
        WanVaeConfig(z_dim=8)


# ---- (d) loading both layouts --------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pair):
    ours, _ = pair
    root = tmp_path_factory.mktemp("wan_vae")
    release, diff = root / "release", root / "diffusers"
    release.mkdir()
    torch.save({k: v.clone() for k, v in ours.state_dict().items()}, release / RELEASE_FILE)
    diffusers_twin(ours).save_pretrained(diff / "vae", safe_serialization=True)
    return release, diff


def test_both_layouts_load_and_decode_the_same(pair, folders):
    ours, _ = pair
    release, diff = folders
    assert find_vae_files(release).layout == "release"
    found = find_vae_files(diff)
    assert found.layout == "diffusers" and found.weights.name == "diffusion_pytorch_model.safetensors"
    a = load_vae(release, CPU, torch.float32, config=VAE_PRESETS["tiny"])
    b = load_vae(diff, CPU)
    assert b.config == VAE_PRESETS["tiny"] and not b.training
    z = latents((1, 16, 2, 3, 5))
    want = ours.decode(z)
    torch.testing.assert_close(a.decode(z), want, rtol=0, atol=0)
    torch.testing.assert_close(b.decode(z), want, rtol=0, atol=0)
    assert load_vae(diff, CPU, torch.bfloat16).conv2.weight.dtype == torch.bfloat16


def test_missing_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_vae_files(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / RELEASE_FILE) in msg and str(tmp_path / "vae" / "config.json") in msg
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path)


def test_wrong_key_names_file_and_key(pair, tmp_path):
    ours, _ = pair
    sd = dict(ours.state_dict())
    sd["decoder.head.2.bogus"] = sd.pop("decoder.head.2.bias")
    torch.save(sd, tmp_path / RELEASE_FILE)
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path, config=VAE_PRESETS["tiny"])
    msg = str(err.value)
    assert RELEASE_FILE in msg and "decoder.head.2.bias" in msg and "decoder.head.2.bogus" in msg
    with pytest.raises(CheckpointError, match="mis-shaped"):  # the tiny file is not the 2.1 model
        torch.save(ours.state_dict(), tmp_path / RELEASE_FILE)
        load_vae(tmp_path)


def test_diffusers_config_checks(folders, tmp_path):
    _, diff = folders
    vae = tmp_path / "vae"
    vae.mkdir()
    weights = "diffusion_pytorch_model.safetensors"
    (vae / weights).write_bytes((diff / "vae" / weights).read_bytes())
    raw = json.loads((diff / "vae" / "config.json").read_text())
    for key, value, match in (
        ("latents_mean", [0.0] * 16, "latents_mean differs"),
        ("is_residual", True, "is_residual"),
    ):
        (vae / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(CheckpointError, match=match) as err:
            load_vae(tmp_path)
        assert "config.json" in str(err.value)
    (vae / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="differs from the config argument"):
        load_vae(tmp_path, config=VAE_PRESETS["wan2.1"])


# ---- memory model ----------------------------------------------------------------------------


def test_decode_memory_model():
    cfg = VAE_PRESETS["wan2.1"]
    widest, cache = _decoder_widths(cfg, 10, 12)
    # the last up-sampling's nearest x2 input: 4 frames x 192 channels x (8h x 8w)
    assert widest == 4 * 192 * 80 * 96
    assert cache > 0
    latent = (21, 90, 160)  # 81 frames of 720 x 1280
    assert tile_shape(latent, "off") == latent
    assert tile_shape(latent, "tiles") == (21, 32, 32) and tile_shape(latent, "small") == (21, 16, 16)
    assert tile_shape((21, 30, 20), "tiles") == (21, 30, 20)
    off, tiles, small = (decode_bytes(latent, t) for t in ("off", "tiles", "small"))
    video = 3 * 81 * 720 * 1280 * 4
    assert off > tiles > small > video
    assert decode_bytes(latent, "auto") == tiles
    assert decode_bytes(latent, "off", bytes_per_element=2) < off
