"""Checkpoint layouts and loading: release pickle, safetensors, diffusers; strict errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import models
from models import CheckpointError
from models.hunyuan_video import patchify, unpatchify
from models.hunyuan_video.checkpoint import diffusers_to_official, official_to_diffusers


@pytest.fixture(scope="module")
def tiny():
    return models.build_model("tiny", seed=7)


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_diffusers_round_trip_is_lossless(tiny):
    sd = tiny.state_dict()
    d = official_to_diffusers(sd, tiny.config.hidden_size)
    assert "transformer_blocks.0.attn.add_k_proj.weight" in d and "double_blocks.0.img_mod.linear.weight" not in d
    back = diffusers_to_official(d)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # The final layer's halves are stored swapped in diffusers: (scale, shift).
    shift, scale = sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
    torch.testing.assert_close(d["norm_out.linear.weight"], torch.cat([scale, shift]))


def test_13b_diffusers_keys_equal_the_diffusers_model():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.HunyuanVideoTransformer3DModel()
    ours = official_to_diffusers(models.build_model("hunyuan-video-13b", device="meta").state_dict(), 3072)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_forward_equals_diffusers_implementation(tiny):
    """An independent implementation of the same architecture, same weights: same output."""
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny.config
    ours = models.build_model("tiny", dtype=torch.float64, seed=7)
    ref = diffusers.HunyuanVideoTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, num_layers=cfg.depth_double,
        num_single_layers=cfg.depth_single, num_refiner_layers=cfg.refiner_depth,
        text_embed_dim=cfg.text_states_dim, pooled_projection_dim=cfg.pooled_dim, rope_axes_dim=cfg.rope_axes_dim,
    ).double().eval()
    ref.load_state_dict(official_to_diffusers(ours.state_dict(), cfg.hidden_size), strict=True)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 3, 8, 12, generator=g, dtype=torch.float64)
    txt = torch.randn(2, 10, cfg.text_states_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    pooled = torch.randn(2, cfg.pooled_dim, generator=g, dtype=torch.float64)
    t, guid = torch.tensor([900.0, 300.0], dtype=torch.float64), torch.full((2,), 6000.0, dtype=torch.float64)
    grid = (3, 4, 6)
    with torch.no_grad():
        expected = ref(lat, t, txt, mask, pooled, guidance=guid, return_dict=False)[0]
        cos, sin = ours.rope(grid)
        got = unpatchify(ours(patchify(lat, cfg.patch_size), cos, sin, txt, mask, t, pooled, guid), grid, cfg.patch_size)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("wrapper", ["module", "ema", None])
def test_release_pickle_loads_memory_mapped(tiny, tmp_path, wrapper):
    path = tmp_path / "mp_rank_00_model_states.pt"
    sd = tiny.state_dict()
    torch.save({wrapper: sd} if wrapper else sd, path)
    model = models.load_weights(models.build_model("tiny", device="meta"), path)
    assert _equal_models(model, tiny)
    # Loaded into a meta model, the weights stay pages of the file (shared by ranks on a node).
    maps = [line.split()[0] for line in open("/proc/self/maps") if str(path) in line]
    spans = [tuple(int(x, 16) for x in m.split("-")) for m in maps]
    ptr = model.final_layer.linear.weight.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in spans), "weights were copied instead of memory-mapped"


def test_release_directory_layout_and_materialised_model(tiny, tmp_path):
    (tmp_path / "transformers").mkdir()
    torch.save({"module": tiny.state_dict()}, tmp_path / "transformers" / "mp_rank_00_model_states.pt")
    model = models.load_weights(models.build_model("tiny", seed=99), tmp_path)
    assert _equal_models(model, tiny)


def test_safetensors_official_and_diffusers_layouts(tiny, tmp_path):
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(sd, tmp_path / "official.safetensors")
    assert _equal_models(models.load_weights(models.build_model("tiny", device="meta"), tmp_path / "official.safetensors"), tiny)

    # diffusers folder: sharded safetensors with an index.
    d = {k: v.contiguous() for k, v in official_to_diffusers(sd, tiny.config.hidden_size).items()}
    folder = tmp_path / "transformer"
    folder.mkdir()
    keys = sorted(d)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: d[k] for k in ks}, folder / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert _equal_models(models.load_weights(models.build_model("tiny", device="meta"), tmp_path), tiny)


def test_load_casts_to_model_dtype(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "w.pt")
    model = models.load_weights(models.build_model("tiny", device="meta", dtype=torch.bfloat16), tmp_path / "w.pt")
    assert model.final_layer.linear.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.final_layer.linear.weight.float(),
                               tiny.final_layer.linear.weight.bfloat16().float())


def test_missing_key_is_named(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    del sd["double_blocks.1.img_attn_qkv.bias"]
    path = tmp_path / "w.pt"
    torch.save({"module": sd}, path)
    with pytest.raises(CheckpointError, match=r"w\.pt: does not match the tiny DiT: 1 missing \(double_blocks\.1\.img_attn_qkv\.bias\)"):
        models.load_weights(models.build_model("tiny", device="meta"), path)


def test_unexpected_and_wrong_shape_are_named(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["final_layer.linear.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(CheckpointError) as err:
        models.load_weights(models.build_model("tiny", device="meta"), path)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "1 unexpected (extra.weight)" in msg
    assert "1 mis-shaped (final_layer.linear.weight (3, 3) != (64, 128))" in msg


def test_13b_checkpoint_into_tiny_model_lists_first_keys_and_count(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"img_in.proj.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"105 missing \(img_in\.proj\.bias, txt_in\.input_embedder\.weight, .*, \.\.\.\)"):
        models.load_weights(models.build_model("tiny", device="meta"), path)


def test_unknown_file_type_and_missing_path(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"weights\.gguf: unknown checkpoint file type '\.gguf'.*\.safetensors"):
        models.load_weights(models.build_model("tiny", device="meta"), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_weights(models.build_model("tiny", device="meta"), tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no DiT weights found"):
        models.load_weights(models.build_model("tiny", device="meta"), tmp_path)


def test_corrupt_files_name_the_file(tmp_path):
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"\x00not a checkpoint" * 10)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            models.load_weights(models.build_model("tiny", device="meta"), tmp_path / name)


def test_legacy_non_zip_pickle_still_loads(tiny, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"module": tiny.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert _equal_models(models.load_weights(models.build_model("tiny", device="meta"), path), tiny)
