"""Token chunking (models/chunking.py): a DiT's output with its token-wise parts run in chunks is
bit for bit the unchunked output in fp32, for both families, at chunk sizes that do and do not
divide the token count. CPU only, tiny presets."""

import pytest
import torch

import models
from models.chunking import MIN_CHUNK, by_chunks, linear_rows, token_spans
from models.fp8 import Float8Linear

GRID = (2, 7, 11)  # 154 image tokens: no chunk size below divides it
SIZES = (16, 23, 50, 64, 100, 153)


@pytest.mark.parametrize("n, size", [(154, 16), (154, 23), (154, 150), (30, 16), (31, 16), (10, 16), (154, None)])
def test_spans_cover_the_tokens_in_order_none_below_the_minimum(n, size):
    spans = token_spans(n, size)
    assert [i for s in spans for i in range(s.start, s.stop)] == list(range(n))
    if len(spans) > 1:
        assert all(s.stop - s.start >= MIN_CHUNK for s in spans)
        assert all(s.stop - s.start <= size + MIN_CHUNK - 1 for s in spans)


def test_by_chunks_fills_whole_outputs_and_passes_one_span_through():
    x = torch.arange(2 * 40 * 3.0).reshape(2, 40, 3)
    q, k = by_chunks(lambda s: (x[:, s] * 2, x[:, s, :1]), 40, 16)
    assert torch.equal(q, x * 2) and torch.equal(k, x[:, :, :1])
    assert by_chunks(lambda s: x[:, s], 40, None) is not None and by_chunks(lambda s: x, 40, 64) is x


def test_linear_rows_is_the_slice_of_the_whole_output():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(32, 96), torch.randn(2, 40, 32)
    for layer_ in (layer, Float8Linear.from_linear(layer)):
        with torch.inference_mode():
            assert torch.equal(linear_rows(layer_, slice(24, 80))(x), layer_(x)[..., 24:80])


def _inputs(preset: str, batch: int = 2):
    """A tiny DiT in fp32 and one forward's inputs at GRID, two prompts (one padded)."""
    model = models.build_model(preset, dtype=torch.float32, seed=1)
    cfg, n = model.config, GRID[0] * GRID[1] * GRID[2]
    gen = torch.Generator().manual_seed(2)
    img = torch.randn(batch, n, cfg.in_channels * 4, generator=gen)
    text_dim = getattr(cfg, "text_states_dim", None) or cfg.text_dim
    txt = torch.randn(batch, 12, text_dim, generator=gen)
    mask = torch.ones(batch, 12)
    mask[-1, 8:] = 0
    pooled = torch.randn(batch, getattr(cfg, "pooled_dim", 8), generator=gen)
    t, guidance = torch.full((batch,), 500.0), torch.full((batch,), 6000.0)
    return model, (img, *model.rope(GRID), txt, mask, t, pooled, guidance)


def _forward(model, args, chunk):
    models.get_family(model.config.name).set_token_chunk(model, chunk)
    with torch.inference_mode():
        return model(*args)


@pytest.mark.parametrize("preset", ["tiny", "wan-tiny"])
def test_chunked_forward_is_bit_identical_in_fp32(preset):
    model, args = _inputs(preset)
    whole = _forward(model, args, None)
    for size in SIZES:
        assert torch.equal(_forward(model, args, size), whole), size


@pytest.mark.parametrize("preset", ["tiny", "wan-tiny"])
def test_chunked_forward_in_bf16_is_within_rounding(preset):
    model, args = _inputs(preset)
    model = model.to(torch.bfloat16)
    whole = _forward(model, args, None).double()
    for size in (16, 50):
        rel = ((_forward(model, args, size).double() - whole).norm() / whole.norm()).item()
        assert rel < 1e-2, (size, rel)
