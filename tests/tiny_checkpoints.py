"""A tiny model directory laid out like the release's `ckpts/` (for end-to-end and fault tests)."""

import json

import torch
from tiny_text_models import write_release_text_encoders

import models
from models.hunyuan_video.vae import VAE_PRESETS, HunyuanVideoVAE
from models.weights import init_random_


def write_release_ckpts(root):
    """A tiny model directory laid out like the release's `ckpts/`: DiT pickle under `module`,
    VAE pickle with config.json, LLM and CLIP folders."""
    write_release_text_encoders(root)
    sub = root / "hunyuan-video-t2v-720p"
    (sub / "transformers").mkdir(parents=True)
    (sub / "vae").mkdir()
    dit = models.build_model("tiny", seed=11)
    torch.save({"module": dit.state_dict()}, sub / "transformers" / "mp_rank_00_model_states.pt")
    vcfg = VAE_PRESETS["tiny"]
    vae = init_random_(HunyuanVideoVAE(vcfg), 12)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, sub / "vae" / "pytorch_model.pt")
    (sub / "vae" / "config.json").write_text(json.dumps({
        "block_out_channels": list(vcfg.block_out_channels), "layers_per_block": vcfg.layers_per_block,
        "norm_num_groups": vcfg.norm_num_groups, "latent_channels": vcfg.latent_channels,
    }))
    return dit


def write_release_fp8_dit(root, *, seed=11, map_dtype=torch.float32, scalar_shape=()):
    """The release's fp8 DiT files in `root/hunyuan-video-t2v-720p/transformers/`, in its format:
    `mp_rank_00_model_states_fp8.pt` = {"module": state dict} with every nn.Linear weight under
    double_blocks/single_blocks in float8_e4m3fn (value = weight / scale), everything else bf16;
    `mp_rank_00_model_states_fp8_map.pt` = {module name: per-tensor scale (max|w| / 448)}.
    Returns (fp8 state dict, map)."""
    from models.fp8 import E4M3_MAX, fp8_linear_names

    sub = root / "hunyuan-video-t2v-720p" / "transformers"
    sub.mkdir(parents=True, exist_ok=True)
    dit = models.build_model("tiny", dtype=torch.bfloat16, seed=seed)
    sd, scales = dit.state_dict(), {}
    for name in fp8_linear_names(dit):
        w = sd[f"{name}.weight"].float()
        scale = w.abs().max() / E4M3_MAX
        sd[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        scales[name] = scale.to(map_dtype).reshape(scalar_shape)
    torch.save({"module": sd}, sub / "mp_rank_00_model_states_fp8.pt")
    torch.save(scales, sub / "mp_rank_00_model_states_fp8_map.pt")
    return sd, scales
