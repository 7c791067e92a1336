"""Wan2.1's umT5-XXL text encoder (encoder only), run through transformers' `UMT5EncoderModel`.

The release encodes with its own T5 code; its checkpoint is a torch pickle in that code's key names
(`release_to_hf` / `hf_to_release` map them; every layer has its own relative position bias). The
computation is the same as transformers' UMT5 (RMS norms, unscaled attention with a bucketed
bidirectional position bias, gated tanh-GELU FFN, final norm), so the output is the encoder's last
hidden state.

What the DiT gets, as the release hands it: the prompt cleaned (`clean_prompt`), tokenized with the
EOS token, padded and truncated to `text_len` (512) tokens; the states of the valid tokens and
zeros after them (the release cuts each sequence to its length, its DiT pads with zeros). The
release's cleaning runs ftfy.fix_text first; ftfy is optional here and skipped when not installed.

Folder layouts under `model_dir`: the release's (`models_t5_umt5-xxl-enc-bf16.pth` and the
tokenizer in `google/umt5-xxl/`) and diffusers' (`text_encoder/`: config.json + safetensors,
`tokenizer/`). Either is loaded strictly onto the meta device first, then assigned (the release
pickle stays memory-mapped).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..family import ModelInputError
from ..hunyuan_video.text_encoder import warn_if_cut
from ..sampling import TextConditioning
from ..text_builtin import BuiltinTextEncoder, check_prompts
from ..weights import StateDict, read_files, read_state_dict

RELEASE_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
RELEASE_TOKENIZER = "google/umt5-xxl"
TEXT_LEN = 512
GIB = 2**30
# umt5-xxl as the release builds it; sizes a checkpoint's shapes give override these.
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=24,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
# release block suffix -> transformers block suffix
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_BLOCK_KEYS = {v: k for k, v in _BLOCK_KEYS.items()}
_EMBED, _HF_EMBEDS = "token_embedding.weight", ("shared.weight", "encoder.embed_tokens.weight")
_NORM, _HF_NORM = "norm.weight", "encoder.final_layer_norm.weight"


class WanTextError(ModelInputError):
    """umT5 files that are missing, incomplete or do not fit the model."""


# --- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFiles:
    """Where the encoder lives: ``layout`` "release" (``weights`` the .pth) or "diffusers"
    (``weights`` the text_encoder/ folder), and the tokenizer folder."""

    layout: str
    weights: Path
    tokenizer: Path


def _tokenizer_dir(folder: Path) -> Path:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise WanTextError(f"{folder}: expected the umT5 tokenizer here (one of {', '.join(_TOKENIZER_FILES)})")
    return folder


def find_text_files(model_dir: str | Path) -> TextFiles:
    """The encoder's files under `model_dir` (the release layout first), or a WanTextError
    naming what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WanTextError(f"model directory {model_dir} does not exist")
    if (model_dir / RELEASE_CHECKPOINT).is_file():
        return TextFiles("release", model_dir / RELEASE_CHECKPOINT, _tokenizer_dir(model_dir / RELEASE_TOKENIZER))
    folder = model_dir / "text_encoder"
    if (folder / "config.json").is_file():
        return TextFiles("diffusers", folder, _tokenizer_dir(model_dir / "tokenizer"))
    raise WanTextError(
        f"no umT5 text encoder in {model_dir}: expected {RELEASE_CHECKPOINT} + {RELEASE_TOKENIZER}/ (release "
        "layout) or text_encoder/ (config.json + safetensors) + tokenizer/ (diffusers layout)"
    )


# --- key names -------------------------------------------------------------------------------


def release_to_hf(sd: StateDict) -> StateDict:
    """The release's umT5 encoder keys -> transformers' UMT5EncoderModel keys (same tensors; the
    embedding under both of its tied names). An unknown key raises WanTextError naming it."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == _EMBED:
            out.update({name: value for name in _HF_EMBEDS})
        elif key == _NORM:
            out[_HF_NORM] = value
        elif (m := _BLOCK.match(key)) and m[2] in _BLOCK_KEYS:
            out[f"encoder.block.{m[1]}.{_BLOCK_KEYS[m[2]]}"] = value
        else:
            raise WanTextError(f"not a key of the release's umT5 encoder: {key}")
    return out


def hf_to_release(sd: StateDict) -> StateDict:
    """transformers' UMT5EncoderModel keys -> the release's (same tensors). The tied embedding
    may come under either name or both (then they must be equal)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key in _HF_EMBEDS:
            if _EMBED in out and not _same(out[_EMBED], value):
                raise WanTextError(f"{' and '.join(_HF_EMBEDS)} differ; umT5 ties them")
            out[_EMBED] = value
        elif key == _HF_NORM:
            out[_NORM] = value
        elif (m := _HF_BLOCK.match(key)) and m[2] in _HF_BLOCK_KEYS:
            out[f"blocks.{m[1]}.{_HF_BLOCK_KEYS[m[2]]}"] = value
        else:
            raise WanTextError(f"not a key of transformers' UMT5EncoderModel: {key}")
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or a.is_meta or b.is_meta:  # a model on the meta device ties them; no values to compare
        return a.shape == b.shape
    return torch.equal(a, b)


def umt5_config(sd: StateDict):
    """A UMT5Config for a state dict in transformers' names: sizes from the shapes (so tiny test
    checkpoints work), the rest as umt5-xxl."""
    from transformers import UMT5Config

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise WanTextError(f"umT5 state dict lacks {key}: cannot tell the encoder's sizes")
        return tuple(sd[key].shape)

    vocab, d_model = shape(_HF_EMBEDS[0])
    blocks = {int(m[1]) for k in sd if (m := _HF_BLOCK.match(k))}
    attn = "encoder.block.0.layer.0.SelfAttention"
    inner = shape(f"{attn}.q.weight")[0]
    buckets, heads = shape(f"{attn}.relative_attention_bias.weight")
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    sizes = dict(vocab_size=vocab, d_model=d_model, num_layers=len(blocks), num_heads=heads, d_kv=inner // heads,
                 relative_attention_num_buckets=buckets, d_ff=d_ff)
    return UMT5Config(**{**UMT5_XXL, **sizes})


# --- loading ---------------------------------------------------------------------------------


def _check_keys(expected: dict[str, tuple[int, ...]], sd: StateDict, source: Path, show: int = 3) -> None:
    """Raise naming the first missing, unexpected and mis-shaped keys (in the file's own names)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} {tuple(sd[k].shape)} != {s}" for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:show])}{', ...' if len(keys) > show else ''})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise WanTextError(f"{source}: does not match the umT5 encoder: " + "; ".join(problems))


def _empty_model(config):
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(config)


def _assign(model: nn.Module, sd: StateDict, dtype: torch.dtype) -> nn.Module:
    """Assign the (checked) tensors, each cast once; then re-tie the embedding, which
    `load_state_dict(assign=True)` would otherwise leave as two parameters (two device copies)."""
    cast: dict[int, torch.Tensor] = {}
    for v in sd.values():
        if id(v) not in cast:
            cast[id(v)] = v.to(dtype)
    tensors = {k: cast[id(v)] for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def _load_release(path: Path, dtype: torch.dtype) -> nn.Module:
    raw = read_files([path])
    try:
        sd = release_to_hf(raw)
        config = umt5_config(sd)
    except WanTextError as err:
        sizes = (_EMBED, "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight",
                 "blocks.0.ffn.gate.0.weight")
        lacking = [k for k in sizes if k not in raw]
        raise WanTextError(f"{path}: lacks {', '.join(lacking)}" if lacking else f"{path}: {err}") from None
    model = _empty_model(config)
    _check_keys({k: tuple(v.shape) for k, v in hf_to_release(model.state_dict()).items()}, raw, path)
    return _assign(model, sd, dtype)


def _load_diffusers(folder: Path, dtype: torch.dtype) -> nn.Module:
    sd = dict(read_state_dict(folder))
    for name, other in (_HF_EMBEDS, _HF_EMBEDS[::-1]):  # safetensors may store one tied name only
        if name not in sd and other in sd:
            sd[name] = sd[other]
    model = _empty_model(_hf_config(folder))
    _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, folder)
    return _assign(model, sd, dtype)


def _hf_config(folder: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "umt5":
        raise WanTextError(f"{folder}/config.json: model_type {config.model_type!r}, expected 'umt5'")
    return config


def _width(files: TextFiles) -> int:
    """The encoder's output width, read before any weights are loaded (the pickle is mapped)."""
    if files.layout == "diffusers":
        return _hf_config(files.weights).d_model
    sd = read_files([files.weights])
    if _EMBED not in sd:
        raise WanTextError(f"{files.weights}: lacks {_EMBED}")
    return sd[_EMBED].shape[1]


# --- encoding --------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The release's 'whitespace' clean: ftfy.fix_text (only where ftfy is installed: it is
    optional here, and without it mojibake stays as typed), HTML entities unescaped twice, runs of
    whitespace made one space, ends stripped."""
    import regex  # a transformers dependency; its \\s is the release's (Unicode White_Space)

    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """umT5 encoder + tokenizer: `encode(prompts) -> TextConditioning` with txt
    `[B, text_len, d_model]` (zeros after the valid tokens) in the model's dtype, mask
    `[B, text_len]` long (valid first), pooled `[B, 1]` zeros (Wan has no pooled vector)."""

    def __init__(self, model: nn.Module, tokenizer, *, text_len: int = TEXT_LEN):
        self.model, self.tokenizer, self.text_len = model, tokenizer, text_len
        # right padding and truncation keep the valid tokens first, the EOS token last
        tokenizer.padding_side, tokenizer.truncation_side = "right", "right"

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
    ) -> "WanTextEncoder":
        """Load from `model_dir` (release or diffusers layout; never the hub)."""
        from transformers import AutoTokenizer

        files = find_text_files(model_dir)
        load = _load_release if files.layout == "release" else _load_diffusers
        model = load(files.weights, dtype)
        tokenizer = AutoTokenizer.from_pretrained(files.tokenizer, local_files_only=True)
        return cls(model, tokenizer, text_len=text_len).to(device)

    @property
    def text_dim(self) -> int:
        return self._alive().config.d_model

    def _alive(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("text encoder was closed")
        return self.model

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextConditioning:
        check_prompts(prompts)
        model = self._alive()
        cleaned = [clean_prompt(p) for p in prompts]
        for prompt, ids in zip(prompts, self.tokenizer(cleaned)["input_ids"]):
            warn_if_cut(prompt, len(ids), self.text_len, "the umT5 text encoder")
        batch = self.tokenizer(cleaned, padding="max_length", max_length=self.text_len, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        device = model.shared.weight.device  # stays resident when the blocks stream
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).long()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        # where, not a product: the states of padded positions carry no meaning and need not be finite
        txt = torch.where(mask[..., None].bool(), hidden, torch.zeros((), dtype=hidden.dtype, device=device))
        return TextConditioning(txt, mask, hidden.new_zeros(len(prompts), 1))

    def to(self, device: str | torch.device) -> "WanTextEncoder":
        self._alive().to(device)
        return self

    def offload(self) -> None:
        """Move the weights to host memory (to encode again later), release cached GPU memory."""
        self.to("cpu")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the weights for good and release cached GPU memory."""
        self.model = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def load_text_encoder(
    model_dir: str | Path | None,
    *,
    text_dim: int,
    text_len: int = TEXT_LEN,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> WanTextEncoder | BuiltinTextEncoder:
    """umT5 from `model_dir`, or the weightless built-in encoder when it is None. An encoder whose
    width differs from the DiT's `text_dim` raises WanTextError naming both (checked before the
    weights are loaded)."""
    if model_dir is None:
        return BuiltinTextEncoder(text_dim, 1, text_len, device=device, dtype=dtype)
    files = find_text_files(model_dir)
    width = _width(files)
    if width != text_dim:
        raise WanTextError(f"umT5 encoder in {files.weights} gives text_dim {width}, but the DiT expects {text_dim}")
    return WanTextEncoder.from_pretrained(model_dir, device=device, dtype=dtype, text_len=text_len)


# --- streaming and memory --------------------------------------------------------------------


def text_streamable(encoder) -> tuple[list[nn.Module], list[tuple[str, nn.Module]]] | None:
    """(resident modules, [(name, block)]): the 24 T5 blocks may stream from host memory; the
    embedding (both tied names) and the final norm stay on the device. None for the built-in one."""
    if not isinstance(encoder, WanTextEncoder):
        return None
    model = encoder._alive()
    resident = [model.shared, model.encoder.embed_tokens, model.encoder.final_layer_norm]
    return resident, [(f"encoder.block.{i}", block) for i, block in enumerate(model.encoder.block)]


def _xxl_params() -> tuple[int, int]:
    """(embedding + final norm, one block) parameters of umt5-xxl."""
    c = UMT5_XXL
    inner = c["num_heads"] * c["d_kv"]
    block = (4 * c["d_model"] * inner  # q, k, v, o
             + 3 * c["d_model"] * c["d_ff"]  # wi_0, wi_1, wo
             + 2 * c["d_model"]  # two RMS norms
             + c["relative_attention_num_buckets"] * c["num_heads"])  # this block's position bias
    return c["vocab_size"] * c["d_model"] + c["d_model"], block


def text_weight_bytes(streamed: bool) -> int:
    """Peak GPU bytes of umt5-xxl in bf16 (2 bytes a parameter).

    Embedding 256384 x 4096 = 1.05 G params; a block 4 x 4096^2 + 3 x 4096 x 10240 (+ norms and
    its 32 x 64 bias) = 192.9 M; 24 blocks 4.63 G; all of it 5.68 G params = 11.4 GB (the release
    file's size). Activations at 512 tokens, one prompt: the fp32 attention scores 64 x 512^2 x 4 B
    = 64 MiB, the FFN's 512 x 10240 pair 20 MiB, so 1 GiB covers them with the cuBLAS workspace
    and allocator slack. Streamed: the embedding stays (2.1 GB) and 3 blocks are on the device
    (the one running, the one prefetched, and one in the allocator's hands)."""
    resident, block = _xxl_params()
    if streamed:
        return 2 * (resident + 3 * block) + GIB
    return 2 * (resident + UMT5_XXL["num_layers"] * block) + GIB
