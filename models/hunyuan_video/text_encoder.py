"""HunyuanVideo's two text encoders, through `transformers`, from local folders only.

- LLM (the language model of llava-llama-3-8b, a Llama config): the prompt is wrapped in the
  release's video template, tokenized to `text_len + crop` tokens, and the hidden states of the
  third-to-last layer (`hidden_states[-3]`, no final norm) are kept for the positions after the
  template prefix: txt `[B, text_len, 4096]` and its attention mask.
- CLIP-L text model (openai clip-vit-large-patch14): the raw prompt, 77 tokens, `pooler_output`
  `[B, 768]`.

The crop. The release hard-codes `crop_start = 95` for its tokenizer: `<|begin_of_text|>` plus the
94 tokens of the template before the prompt (checked against a public Llama-3 `tokenizer.json`:
94 prefix tokens without BOS). A tokenizer that adds no BOS, or any other tokenizer, has another
prefix length, and a hard-coded 95 would then cut prompt tokens or keep template ones. So by default
the crop is measured from the tokenizer (`template_prefix_length`), which gives 95 for the
release's; an explicit `crop_start` is honoured, with a warning if it differs from the measurement.

Folder layouts under `model_dir`: the release (`text_encoder/`, `text_encoder_2/`, tokenizers inside
them) and diffusers (`text_encoder/` + `tokenizer/`, `text_encoder_2/` + `tokenizer_2/`). The LLM
folder may also hold a whole LlavaForConditionalGeneration; its language model is taken.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..family import ModelInputError
from ..sampling import TextConditioning
from ..text_builtin import BuiltinTextEncoder, check_prompts

PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
RELEASE_CROP_START = 95  # the release's value for its tokenizer; see the module docstring
TEXT_LEN = 256  # LLM tokens kept after the crop
CLIP_LEN = 77
HIDDEN_STATE_INDEX = -3  # the release's hidden_state_skip_layer=2, without the final norm

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TextEncoderError(ModelInputError):
    """Encoder folders that are missing, incomplete or do not fit the model."""


@dataclass(frozen=True)
class EncoderFolders:
    llm: Path
    llm_tokenizer: Path
    clip: Path
    clip_tokenizer: Path


def _model_folder(model_dir: Path, name: str, what: str) -> Path:
    folder = model_dir / name
    if not (folder / "config.json").is_file():
        raise TextEncoderError(
            f"{folder}: expected the {what} here (a transformers folder with config.json and weights), "
            f"as in the release's ckpts/{name}/ or the diffusers layout's {name}/"
        )
    return folder


def _tokenizer_folder(model_dir: Path, diffusers_name: str, model_folder: Path) -> Path:
    # diffusers keeps tokenizers apart; the release keeps each inside its model's folder.
    for folder in (model_dir / diffusers_name, model_folder):
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            return folder
    raise TextEncoderError(
        f"no tokenizer for {model_folder}: expected one of {', '.join(_TOKENIZER_FILES)} in "
        f"{model_dir / diffusers_name} (diffusers layout) or in {model_folder} (release layout)"
    )


def find_encoder_folders(model_dir: str | Path) -> EncoderFolders:
    """The four folders of the encoders under `model_dir`, or a TextEncoderError naming the path."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TextEncoderError(f"model directory {model_dir} does not exist")
    llm = _model_folder(model_dir, "text_encoder", "LLM text encoder (llava-llama-3-8b language model)")
    clip = _model_folder(model_dir, "text_encoder_2", "CLIP text encoder (clip-vit-large-patch14)")
    llm_tok = _tokenizer_folder(model_dir, "tokenizer", llm)
    return EncoderFolders(llm, llm_tok, clip, _tokenizer_folder(model_dir, "tokenizer_2", clip))


def has_encoder_folders(model_dir: str | Path) -> bool:
    try:
        find_encoder_folders(model_dir)
    except TextEncoderError:
        return False
    return True


def template_prefix_length(tokenizer, template: str = PROMPT_TEMPLATE_VIDEO) -> int:
    """Tokens before the prompt in `template`, special tokens (BOS) included, as this tokenizer
    splits the templated text. Measured as the common prefix of two templated probe prompts that
    differ in their first character, so a tokenizer that merges across the template/prompt border
    yields the tokens that are template-only in context, not those of the prefix tokenized alone."""
    a, b = (tokenizer(template.format(p))["input_ids"] for p in ("a", "b"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@contextlib.contextmanager
def _quiet_transformers():
    # Loading the release's folders prints long reports of keys it rightly skips (the LLaVA lm_head,
    # CLIP's vision tower); missing keys are checked by `_from_pretrained` instead.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _from_pretrained(cls, folder: Path, dtype: torch.dtype):
    import transformers

    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, **{dtype_key: dtype}
        )
    bad = sorted(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
    if bad:
        name = type(model).__name__
        raise TextEncoderError(f"{folder}: weights missing or mis-shaped for {name}: {bad[:8]}")
    return model.eval().requires_grad_(False)


def _load_llm(folder: Path, dtype: torch.dtype):
    """The decoder-only base model (e.g. LlamaModel) in `folder`, unwrapped from LLaVA if needed."""
    import transformers

    is_llava = json.loads((folder / "config.json").read_text()).get("model_type") == "llava"
    cls = transformers.LlavaForConditionalGeneration if is_llava else transformers.AutoModel
    model = _from_pretrained(cls, folder, dtype)
    if is_llava:
        model = _llava_language_model(model)
    if not hasattr(model, "layers") or not hasattr(model, "embed_tokens"):
        raise TextEncoderError(f"{folder}: {type(model).__name__} is not a decoder-only language model")
    return model


def _llava_language_model(llava):
    """The base language model inside a LlavaForConditionalGeneration. Only it encodes text; the
    vision tower and lm_head go with the wrapper. Newer transformers keep it at
    `.model.language_model`; before 4.52 `.language_model` was a CausalLM with the base at `.model`."""
    inner = getattr(llava, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    return llava.language_model.model


def _load_tokenizer(folder: Path, cls_name: str = "AutoTokenizer"):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder, local_files_only=True)


def warn_if_cut(prompt: str, tokens: int, window: int, encoder: str) -> None:
    """Truncation is what the release does too, but a user should know their words were dropped."""
    if tokens > window:
        head = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        warnings.warn(f"prompt {head!r}: {tokens} tokens, {encoder} keeps the first {window}; the rest is cut",
                      stacklevel=3)


class LlmPromptEncoder:
    """Templated prompt -> (txt `[B, text_len, hidden]` in the model's dtype, mask `[B, text_len]`
    long). States at padded positions are zeroed: consumers mask them (the release does too), and
    zeros keep them independent of the pad id."""

    def __init__(
        self, model, tokenizer, *, template: str = PROMPT_TEMPLATE_VIDEO, crop_start: int | None = None,
        text_len: int = TEXT_LEN,
    ):
        if "{}" not in template:
            raise ValueError("template must contain '{}' where the prompt goes")
        self.model, self.tokenizer, self.template, self.text_len = model, tokenizer, template, text_len
        # Right padding and truncation keep the template first and the valid tokens before padding.
        tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
        if tokenizer.pad_token is None:  # Llama-3 tokenizers have none; padded states are zeroed anyway
            tokenizer.pad_token = tokenizer.eos_token
        measured = template_prefix_length(tokenizer, template)
        if crop_start is not None and crop_start != measured:
            warnings.warn(
                f"crop_start={crop_start} differs from this tokenizer's template prefix ({measured} tokens): "
                "the kept text tokens will not start at the prompt",
                stacklevel=2,
            )
        self.crop_start = measured if crop_start is None else crop_start

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        templated = [self.template.format(p) for p in prompts]
        for prompt, ids in zip(prompts, self.tokenizer(templated)["input_ids"]):
            warn_if_cut(prompt, len(ids) - self.crop_start, self.text_len, "the LLM text encoder")
        batch = self.tokenizer(
            templated,
            max_length=self.text_len + self.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        device = self.model.embed_tokens.weight.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        txt = out.hidden_states[HIDDEN_STATE_INDEX][:, self.crop_start :]
        mask = mask[:, self.crop_start :].long()
        return txt * mask[..., None].to(txt.dtype), mask


class ClipPooledEncoder:
    """Raw prompt -> CLIP text `pooler_output` `[B, hidden]` (the final-normed EOS state)."""

    def __init__(self, model, tokenizer, *, max_length=CLIP_LEN):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for prompt, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
            warn_if_cut(prompt, len(ids), self.max_length, "CLIP (its pooled vector)")
        batch = self.tokenizer(
            prompts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        return self.model(input_ids=ids, attention_mask=mask).pooler_output


class HunyuanTextEncoders:
    """The LLM + CLIP pair: `encode(prompts) -> TextConditioning` with txt `[B, text_len, 4096]`,
    mask `[B, text_len]` long (valid first), pooled `[B, 768]`, on the encoders' device and in their
    dtype. Call `offload()` or `close()` before the DiT needs the GPU memory."""

    def __init__(self, llm: LlmPromptEncoder, clip: ClipPooledEncoder):
        self.llm, self.clip = llm, clip

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        crop_start: int | None = None,
        text_len: int = TEXT_LEN,
    ) -> "HunyuanTextEncoders":
        """Load both encoders from `model_dir` (release or diffusers layout; never the hub).
        `crop_start=None` measures the template prefix from the tokenizer (95 for the release's)."""
        folders = find_encoder_folders(model_dir)
        from transformers import CLIPTextModel

        llm_model, llm_tok = _load_llm(folders.llm, dtype), _load_tokenizer(folders.llm_tokenizer)
        llm = LlmPromptEncoder(llm_model, llm_tok, crop_start=crop_start, text_len=text_len)
        clip_model = _from_pretrained(CLIPTextModel, folders.clip, dtype)
        clip = ClipPooledEncoder(clip_model, _load_tokenizer(folders.clip_tokenizer, "CLIPTokenizer"))
        return cls(llm, clip).to(device)

    @property
    def text_dim(self) -> int:
        return self._alive().llm.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self._alive().clip.model.config.hidden_size

    def _alive(self) -> "HunyuanTextEncoders":
        if self.llm is None:
            raise RuntimeError("text encoders were closed")
        return self

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextConditioning:
        check_prompts(prompts)
        self._alive()
        txt, mask = self.llm(prompts)
        return TextConditioning(txt, mask, self.clip(prompts))

    def to(self, device: str | torch.device) -> "HunyuanTextEncoders":
        self._alive()
        self.llm.model.to(device)
        self.clip.model.to(device)
        return self

    def offload(self) -> None:
        """Move the weights to host memory (to encode again later) and release cached GPU memory."""
        self.to("cpu")
        _empty_cuda_cache()

    def close(self) -> None:
        """Drop the weights for good and release cached GPU memory."""
        self.llm = self.clip = None
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    """Give the encoders' GPU memory back: the allocator's cache, and cuBLAS's workspaces (33 MiB
    on an H200, allocated by the encoders' first matmuls; the DiT makes its own when it needs them)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


def load_text_encoder(
    model_dir: str | Path | None,
    *,
    text_dim: int,
    pooled_dim: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> HunyuanTextEncoders | BuiltinTextEncoder:
    """The release's encoders from `model_dir`, or the weightless built-in one when `model_dir` is
    None (presets without encoder weights). A `model_dir` without the encoder folders, or whose
    encoders' widths differ from the preset's `text_dim` / `pooled_dim`, raises TextEncoderError
    (the widths are read from the configs before any weights are loaded)."""
    if model_dir is None:
        return BuiltinTextEncoder(text_dim, pooled_dim, TEXT_LEN, device=device, dtype=dtype)
    _check_widths(find_encoder_folders(model_dir), text_dim, pooled_dim)
    return HunyuanTextEncoders.from_pretrained(model_dir, device=device, dtype=dtype)


def _text_hidden_size(folder: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # LLaVA and full CLIP folders nest the text model's config (with defaults filled in).
    return getattr(config, "text_config", config).hidden_size


def _check_widths(folders: EncoderFolders, text_dim: int, pooled_dim: int) -> None:
    got = (_text_hidden_size(folders.llm), _text_hidden_size(folders.clip))
    if got != (text_dim, pooled_dim):
        raise TextEncoderError(
            f"text encoders in {folders.llm.parent} give text_dim {got[0]} / pooled_dim {got[1]}, "
            f"but the model expects {text_dim} / {pooled_dim}"
        )
