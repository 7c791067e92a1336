"""Tiny random text encoders of the release's classes (Llama, CLIP) with tokenizers built here.

Shared by the text-encoder tests and the end-to-end `generate --model-dir` test; nothing is
downloaded.
"""

import json
import re

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from models.hunyuan_video.text_encoder import PROMPT_TEMPLATE_VIDEO

TEXT_LEN = 256
HIDDEN, LAYERS, CLIP_HIDDEN = 64, 4, 32
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL_RE = re.compile(r"(<\|[a-z_]+\|>)")
PROMPTS = ["A cat walks on the grass", "a dog runs in the snow at night"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def split_tokens(text: str) -> list[str]:
    """The test tokenizer's split, redone by hand: special tokens whole, then in the text between
    them words and runs of punctuation (the Whitespace pre-tokenizer's \\w+|[^\\w\\s]+)."""
    parts = SPECIAL_RE.split(text)
    return [t for i, part in enumerate(parts) for t in ([part] if i % 2 else re.findall(r"\w+|[^\w\s]+", part))]


def llm_tokenizer(with_pad: bool):
    words = sorted(set(split_tokens(PROMPT_TEMPLATE_VIDEO + " " + " ".join(PROMPTS))) - set(SPECIALS))
    vocab = {t: i for i, t in enumerate(SPECIALS + ["<unk>", "<pad>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS + ["<pad>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])]
    )
    kw = {"pad_token": "<pad>"} if with_pad else {}  # Llama-3's own tokenizer has no pad token
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="<unk>", **kw
    )
    return fast, len(vocab)


def write_clip_tokenizer(folder):
    """A CLIP BPE vocabulary of single letters (plain and word-final) and a few merges."""
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens = list(LETTERS) + [c + "</w>" for c in LETTERS] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def llama_config(vocab_size):
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )


def clip_text_config(vocab_size):
    # bos/eos ids are the last two entries of the vocabulary written above.
    return transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def write_release_text_encoders(root, seed=0):
    """`root/text_encoder` (Llama, width HIDDEN) and `root/text_encoder_2` (CLIP text, width
    CLIP_HIDDEN) in the release's layout; returns the in-memory (LlamaForCausalLM, CLIPModel)."""
    torch.manual_seed(seed)
    tok, n_vocab = llm_tokenizer(with_pad=False)
    causal = transformers.LlamaForCausalLM(llama_config(n_vocab)).eval()
    clip_vocab = write_clip_tokenizer(root / "text_encoder_2")
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14,
    )
    clip_config = transformers.CLIPConfig(
        text_config=clip_text_config(clip_vocab).to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    clip_full = transformers.CLIPModel(clip_config).eval()
    causal.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "text_encoder")
    clip_full.save_pretrained(root / "text_encoder_2")
    return causal, clip_full, tok, n_vocab, vision
