"""load_vae: the release's pickle and diffusers' safetensors layouts, config.json, strict errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.hunyuan_video.vae import (
    VAE_PRESETS,
    HunyuanVideoVAE,
    VAECheckpointError,
    VAEConfig,
    config_from_json,
    load_vae,
)

TINY = VAE_PRESETS["tiny"]

# The release's config.json keys (plus the tiny sizes); unmodelled keys must be ignored.
RELEASE_JSON = {
    "_class_name": "AutoencoderKLCausal3D",
    "act_fn": "silu",
    "block_out_channels": list(TINY.block_out_channels),
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": TINY.layers_per_block,
    "norm_num_groups": TINY.norm_num_groups,
    "sample_size": 256,
    "sample_tsize": 64,
    "scaling_factor": 0.476986,
    "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}


@pytest.fixture(scope="module")
def source() -> HunyuanVideoVAE:
    torch.manual_seed(0)
    return HunyuanVideoVAE(TINY).eval()


def _write_release(root: Path, state: dict, config: dict = RELEASE_JSON) -> Path:
    """ckpts/<model>/vae/{config.json, pytorch_model.pt} with a state_dict wrapper and vae. prefixes."""
    vae_dir = root / "vae"
    vae_dir.mkdir(parents=True)
    wrapped = {f"vae.{k}": v for k, v in state.items()}
    wrapped["loss.logvar"] = torch.zeros(())  # other modules' weights beside the VAE's are dropped
    torch.save({"state_dict": wrapped}, vae_dir / "pytorch_model.pt")
    (vae_dir / "config.json").write_text(json.dumps(config))
    return root


def _write_diffusers(root: Path, state: dict, config: dict) -> Path:
    vae_dir = root / "vae"
    vae_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, vae_dir / "diffusion_pytorch_model.safetensors")
    (vae_dir / "config.json").write_text(json.dumps(config))
    return vae_dir


def _assert_same_weights(model: HunyuanVideoVAE, source: HunyuanVideoVAE) -> None:
    ours, theirs = model.state_dict(), source.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


def test_release_layout(tmp_path, source):
    root = _write_release(tmp_path / "hunyuan-video-t2v-720p", source.state_dict())
    model = load_vae(root)  # the model folder; vae/ is found inside it
    assert model.config == TINY and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    _assert_same_weights(model, source)
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(model.decode(z), source.decode(z))


def test_diffusers_layout_with_dtype(tmp_path, source):
    config = {
        k: v
        for k, v in RELEASE_JSON.items()
        if k not in ("time_compression_ratio", "sample_size", "sample_tsize")
    }
    config |= {
        "_class_name": "AutoencoderKLHunyuanVideo",
        "temporal_compression_ratio": 4,
        "spatial_compression_ratio": 8,
    }
    vae_dir = _write_diffusers(tmp_path, source.state_dict(), config)
    model = load_vae(
        vae_dir / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16
    )  # a file path works too
    assert model.config == TINY
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_same_weights(model, source)


def test_explicit_config_overrides_json(tmp_path, source):
    vae_dir = _write_diffusers(tmp_path, source.state_dict(), {"block_out_channels": [1, 2, 3, 4]})
    assert load_vae(vae_dir, config=TINY).config == TINY


def test_config_json_mapping_and_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"temporal_compression_ratio": 4, "scaling_factor": 0.5, "force_upcast": True})
    )
    assert config_from_json(path) == VAEConfig(scaling_factor=0.5)
    path.write_text(json.dumps({"act_fn": "gelu"}))
    with pytest.raises(ValueError, match="config.json: act_fn 'gelu'"):
        config_from_json(path)
    path.write_text(json.dumps({"time_compression_ratio": 3}))
    with pytest.raises(ValueError, match="config.json: .*time_compression_ratio = 3"):
        config_from_json(path)


def test_mismatched_checkpoint_names_keys_and_file(tmp_path, source):
    state = dict(source.state_dict())
    state["decoder.conv_out.conv.weight"] = torch.zeros(3, 16, 3, 3, 1)
    del state["decoder.conv_in.conv.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    vae_dir = _write_diffusers(tmp_path, state, RELEASE_JSON)
    with pytest.raises(VAECheckpointError) as err:
        load_vae(vae_dir)
    message = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in message
    assert "1 missing (decoder.conv_in.conv.bias)" in message
    assert "1 unexpected (decoder.extra.weight)" in message
    assert "decoder.conv_out.conv.weight (3, 16, 3, 3, 1) != (3, 16, 3, 3, 3)" in message


def test_checkpoint_for_another_config_fails(tmp_path, source):
    root = _write_release(
        tmp_path, source.state_dict(), {**RELEASE_JSON, "block_out_channels": [16, 16, 32, 64]}
    )
    with pytest.raises(VAECheckpointError, match=r"pytorch_model.pt: .* mis-shaped \(.*, \.\.\.\)"):
        load_vae(root)


def test_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_model.pt"):
        load_vae(tmp_path)
