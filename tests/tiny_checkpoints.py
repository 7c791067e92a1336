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
