"""A weightless text encoder: deterministic pseudo-embeddings hashed from the prompt's words.

It carries no meaning. It exists so that presets without encoder weights (the tiny test and demo
models) run offline with the same API as the real encoders: the same prompt gives the same
tensors on every platform and in every process (ranks agree without a broadcast), and different
prompts give different tensors.

Values come from SHAKE-256 of each word, read as little-endian uint32 and mapped to a uniform
distribution with unit variance. No RNG and no transcendental functions are involved, so the
numbers are bit-identical everywhere (torch's CPU `randn` takes vectorised paths that depend on
the CPU's instruction set).
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

from .sampling import TextConditioning

# Uniform on [-sqrt(3), sqrt(3)] has variance 1, like the unit normal it stands in for.
_HALF_WIDTH = math.sqrt(3.0)


def hashed_vector(key: str, dim: int) -> torch.Tensor:
    """fp32 `[dim]` with unit variance, a pure function of `key` (bit-identical on every host)."""
    raw = hashlib.shake_256(key.encode("utf-8")).digest(4 * dim)
    words = torch.tensor(struct.unpack(f"<{dim}I", raw), dtype=torch.float64)
    uniform = (words + 0.5) / 2.0**32  # in (0, 1), exact in float64
    return ((2.0 * uniform - 1.0) * _HALF_WIDTH).float()


def prompt_words(prompt: str) -> list[str]:
    """The prompt's whitespace-separated words; an empty prompt is one empty word, so that every
    prompt has at least one valid token (an all-masked text sequence would give NaN attention)."""
    return prompt.split() or [""]


class BuiltinTextEncoder:
    """Same API as `HunyuanTextEncoders`: `encode(prompts) -> TextConditioning` with
    txt `[B, max_tokens, text_dim]` (one row per word, zeros after the last word),
    mask `[B, max_tokens]` long (valid first), pooled `[B, pooled_dim]` (hashed from the whole
    prompt). Words past `max_tokens` are dropped, as a tokenizer truncates."""

    def __init__(
        self,
        text_dim: int,
        pooled_dim: int,
        max_tokens: int = 256,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if min(text_dim, pooled_dim, max_tokens) < 1:
            raise ValueError(
                f"text_dim, pooled_dim and max_tokens must be >= 1, got {text_dim}, {pooled_dim}, {max_tokens}"
            )
        self.text_dim, self.pooled_dim, self.max_tokens = text_dim, pooled_dim, max_tokens
        self.device, self.dtype = torch.device(device), dtype

    def _one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        words = prompt_words(prompt)
        if len(words) > self.max_tokens:
            import warnings

            warnings.warn(f"prompt of {len(words)} words: the built-in text encoder keeps the first "
                          f"{self.max_tokens}; the rest is cut", stacklevel=3)
        words = words[: self.max_tokens]
        txt = torch.zeros(self.max_tokens, self.text_dim)
        for i, word in enumerate(words):
            txt[i] = hashed_vector("word\0" + word, self.text_dim)
        mask = torch.zeros(self.max_tokens, dtype=torch.long)
        mask[: len(words)] = 1
        return txt, mask, hashed_vector("pooled\0" + prompt, self.pooled_dim)

    def encode(self, prompts: list[str]) -> TextConditioning:
        check_prompts(prompts)
        txt, mask, pooled = (torch.stack(t) for t in zip(*(self._one(p) for p in prompts)))
        return TextConditioning(
            txt.to(self.device, self.dtype), mask.to(self.device), pooled.to(self.device, self.dtype)
        )

    def to(self, device: str | torch.device) -> "BuiltinTextEncoder":
        self.device = torch.device(device)
        return self

    def offload(self) -> None:
        """Nothing to move: the encoder holds no weights."""

    def close(self) -> None:
        """Nothing to free: the encoder holds no weights."""


def check_prompts(prompts) -> None:
    # A bare string is iterable too; encoding it character by character would be a silent bug.
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
