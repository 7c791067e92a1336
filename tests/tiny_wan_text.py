"""A tiny random umT5 encoder and a tiny umT5-style tokenizer, written offline in Wan's layouts.

The tokenizer is a `tokenizers` Unigram model like umT5's sentencepiece one (Metaspace "▁"
pieces, ids 0/1/2 = <pad>/</s>/<unk>, EOS appended), over a few words plus single characters,
so that any ASCII prompt tokenizes. The encoder is transformers' UMT5EncoderModel with random
weights rounded to bf16 values, so that the release's bf16 pickle and a float32 diffusers folder
hold the same numbers. Nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from models.wan.text_encoder import RELEASE_CHECKPOINT, RELEASE_TOKENIZER, hf_to_release

TEXT_LEN = 16
D_MODEL, LAYERS, HEADS, D_KV, D_FF = 32, 2, 4, 8, 64
WORDS = ("a", "cat", "walks", "on", "the", "grass", "dog", "runs", "in", "snow", "at", "night", "and")
PROMPTS = ["A cat walks on the grass", "a dog runs in the snow at night"]


def wan_tokenizer() -> transformers.PreTrainedTokenizerBase:
    specials = ["<pad>", "</s>", "<unk>"]
    chars = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(t, 0.0) for t in specials] + [("▁" + w, -2.0) for w in WORDS] + [(c, -6.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def tiny_umt5(vocab_size: int, seed: int = 0) -> transformers.UMT5EncoderModel:
    torch.manual_seed(seed)
    config = transformers.UMT5Config(
        vocab_size=vocab_size, d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    )
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).copy_(p.bfloat16().float())  # larger than the default init, exact in bf16
    return model


def write_diffusers_text(root: Path, model, tokenizer) -> Path:
    """`root/text_encoder/` (config.json + safetensors, float32) and `root/tokenizer/`."""
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def write_release_text(root: Path, model, tokenizer) -> Path:
    """`root/models_t5_umt5-xxl-enc-bf16.pth` (the release's key names, bf16) and the tokenizer
    in `root/google/umt5-xxl/`."""
    root.mkdir(parents=True, exist_ok=True)
    sd = hf_to_release({k: v.bfloat16().clone() for k, v in model.state_dict().items()})
    torch.save(sd, root / RELEASE_CHECKPOINT)
    tokenizer.save_pretrained(root / RELEASE_TOKENIZER)
    return root


def write_both(root: Path, seed: int = 0):
    """Release and diffusers layouts of the same tiny encoder: (release dir, diffusers dir, model, tokenizer)."""
    tokenizer = wan_tokenizer()
    model = tiny_umt5(len(tokenizer), seed)
    release = write_release_text(root / "release", model, tokenizer)
    diffusers = write_diffusers_text(root / "diffusers", model, tokenizer)
    return release, diffusers, model, tokenizer
