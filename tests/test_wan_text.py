"""Wan2.1's umT5 text encoder on a tiny random UMT5 saved offline, against diffusers' WanPipeline.

The reference is diffusers' own prompt encoding (`WanPipeline._get_t5_prompt_embeds`) with the
tiny encoder loaded by transformers' `from_pretrained` (not by the code under test) and the same
tokenizer, in float64. The release layout is written through `hf_to_release` in bf16 (the tiny
weights are exact in bf16), so both layouts must give identical states.
"""

import math
import re
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from models.family import ModelInputError  # noqa: E402
from models.text_builtin import BuiltinTextEncoder  # noqa: E402
from models.wan.text_encoder import (  # noqa: E402
    RELEASE_CHECKPOINT,
    RELEASE_TOKENIZER,
    UMT5_XXL,
    WanTextEncoder,
    WanTextError,
    clean_prompt,
    find_text_files,
    hf_to_release,
    load_text_encoder,
    release_to_hf,
    text_streamable,
    text_weight_bytes,
    umt5_config,
)

from tiny_wan_text import D_FF, D_MODEL, HEADS, LAYERS, PROMPTS, TEXT_LEN, write_both  # noqa: E402

LONG = " ".join(["a cat walks on the grass and a dog runs in the snow at night"] * 3)
DTYPE = torch.float64


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    release, diffusers_dir, model, tok = write_both(tmp_path_factory.mktemp("wan_text"))
    return types.SimpleNamespace(release=release, diffusers=diffusers_dir, model=model, tok=tok)


@pytest.fixture(scope="module")
def reference(dirs):
    """diffusers' prompt encoding: `prompts -> [B, TEXT_LEN, D]` (fp64, CPU)."""
    te = transformers.UMT5EncoderModel.from_pretrained(dirs.diffusers / "text_encoder", dtype=DTYPE,
                                                       local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(dirs.diffusers / "tokenizer", local_files_only=True)
    pipe = types.SimpleNamespace(text_encoder=te, tokenizer=tok)

    def encode(prompts):
        with torch.no_grad():
            return diffusers.WanPipeline._get_t5_prompt_embeds(
                pipe, prompt=prompts, max_sequence_length=TEXT_LEN, device=torch.device("cpu"), dtype=DTYPE
            )

    return encode, tok


def _load(folder, **kw):
    return load_text_encoder(folder, text_dim=D_MODEL, text_len=TEXT_LEN, device="cpu", dtype=DTYPE, **kw)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# --- key names -------------------------------------------------------------------------------

RELEASE_BLOCK_KEYS = (
    "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
    "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
)


def test_key_conversion_is_lossless_and_uses_the_release_names(dirs):
    hf = dirs.model.state_dict()
    rel = hf_to_release(hf)
    expected = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{k}" for i in range(LAYERS) for k in RELEASE_BLOCK_KEYS
    }
    assert set(rel) == expected
    # the gated FFN: gate.0 is the GELU branch (wi_0), fc1 the linear one (wi_1), fc2 the output (wo)
    ffn = "encoder.block.1.layer.1.DenseReluDense"
    assert rel["blocks.1.ffn.gate.0.weight"] is hf[f"{ffn}.wi_0.weight"]
    assert rel["blocks.1.ffn.fc1.weight"] is hf[f"{ffn}.wi_1.weight"]
    assert rel["blocks.1.pos_embedding.embedding.weight"].shape == (32, HEADS)  # one bias per layer
    back = release_to_hf(rel)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    again = hf_to_release(back)
    assert set(again) == set(rel) and all(again[k] is rel[k] for k in rel)


def test_key_conversion_rejects_unknown_and_untied(dirs):
    rel = hf_to_release(dirs.model.state_dict())
    with pytest.raises(WanTextError, match=re.escape("pos_embedding.embedding.weight")):
        release_to_hf({**rel, "pos_embedding.embedding.weight": torch.zeros(32, HEADS)})  # a shared-pos T5
    hf = dict(dirs.model.state_dict())
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"] + 1
    with pytest.raises(WanTextError, match="tie"):
        hf_to_release(hf)


def test_config_from_shapes(dirs):
    cfg = umt5_config(dirs.model.state_dict())
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (D_MODEL, LAYERS, HEADS, 8, D_FF)
    assert cfg.vocab_size == len(dirs.tok)
    assert cfg.relative_attention_max_distance == 128 and cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert UMT5_XXL["d_model"] == 4096 and UMT5_XXL["num_layers"] == 24


# --- encoding against diffusers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts", [PROMPTS, [""], ["  A  cat\t&amp;amp; a dog\n "]], ids=["short", "empty", "cleaned"]
)
def test_encode_equals_diffusers(dirs, reference, prompts):
    encode_ref, tok = reference
    enc = _load(dirs.diffusers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut here
        cond = enc.encode(prompts)
    ref = encode_ref(prompts)
    assert cond.txt.shape == ref.shape == (len(prompts), TEXT_LEN, D_MODEL) and cond.txt.dtype == DTYPE
    assert _rel_err(cond.txt, ref) < 1e-6
    lens = [len(tok(clean_prompt(p))["input_ids"]) for p in prompts]  # the words + EOS
    assert cond.mask.dtype == torch.long and cond.mask.tolist() == [[1] * n + [0] * (TEXT_LEN - n) for n in lens]
    assert torch.equal(cond.pooled, torch.zeros(len(prompts), 1, dtype=DTYPE))
    assert (cond.txt[0, lens[0]:] == 0).all() and (cond.txt[0, : lens[0]].abs().sum(-1) > 0).all()


def test_long_prompt_is_cut_with_a_warning(dirs, reference):
    encode_ref, tok = reference
    n = len(tok(LONG)["input_ids"])
    assert n > TEXT_LEN
    enc = _load(dirs.diffusers)
    with pytest.warns(UserWarning, match=rf"{n} tokens, the umT5 text encoder keeps the first {TEXT_LEN}"):
        cond = enc.encode([LONG, PROMPTS[0]])
    ref = encode_ref([LONG, PROMPTS[0]])
    assert _rel_err(cond.txt, ref) < 1e-6
    assert cond.mask[0].sum() == TEXT_LEN


def _release_math(sd, ids, mask):
    """The release's T5 encoder forward written from its definition, on its own key names (fp64):
    RMS norms (the mean square taken in fp32, as the release does), unscaled attention plus a
    per-layer bucketed bidirectional position bias (32 buckets, max distance 128, key minus query,
    the log in fp32), padded keys masked, FFN fc2(fc1(x) * gelu_tanh(gate(x))), final norm."""
    b, n = ids.shape
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    half, dist = 16, rel.abs()
    exact = half // 2
    far = exact + (torch.log(dist.clamp_min(1).float() / exact) / math.log(128 / exact) * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))
    masked = (mask[:, None, None, :] == 0).to(DTYPE) * torch.finfo(DTYPE).min

    def norm(x, w):
        return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = sd["token_embedding.weight"][ids]
    for i in range(LAYERS):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = norm(x, w["norm1.weight"])
        q, k, v = ((h @ w[f"attn.{c}.weight"].T).view(b, n, HEADS, -1) for c in "qkv")
        bias = w["pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)  # [H, Lq, Lk]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias
        att = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores + masked, -1), v).reshape(b, n, -1)
        x = x + att @ w["attn.o.weight"].T
        h = norm(x, w["norm2.weight"])
        x = x + ((h @ w["ffn.fc1.weight"].T) * gelu(h @ w["ffn.gate.0.weight"].T)) @ w["ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


def test_encode_equals_the_release_math_on_its_keys(dirs, reference):
    """Guards the key mapping itself: a consistent mix-up (q/k, gate/fc1) would pass the
    round trips and the layout comparison, not this."""
    _, tok = reference
    sd = {k: v.to(DTYPE) for k, v in torch.load(dirs.release / RELEASE_CHECKPOINT, weights_only=True).items()}
    prompts = PROMPTS + [""]
    batch = tok([clean_prompt(p) for p in prompts], padding="max_length", max_length=TEXT_LEN, truncation=True,
                return_tensors="pt")
    want = _release_math(sd, batch["input_ids"], batch["attention_mask"]) * batch["attention_mask"][..., None]
    got = _load(dirs.release).encode(prompts).txt
    assert _rel_err(got, want) < 1e-12


def test_release_and_diffusers_layouts_encode_identically(dirs):
    assert find_text_files(dirs.release).layout == "release"
    assert find_text_files(dirs.diffusers).layout == "diffusers"
    prompts = PROMPTS + [""]
    a, b = _load(dirs.release).encode(prompts), _load(dirs.diffusers).encode(prompts)
    assert torch.equal(a.txt, b.txt) and torch.equal(a.mask, b.mask)
    enc = _load(dirs.release)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight  # tied again after assign
    assert enc.text_dim == D_MODEL


def test_clean_prompt():
    assert clean_prompt("  a\t\tcat &amp;amp; dog \n\u3000x ") == "a cat & dog x"


# --- files and errors ------------------------------------------------------------------------


def test_missing_files_name_what_is_missing(tmp_path, dirs):
    with pytest.raises(WanTextError, match="does not exist"):
        find_text_files(tmp_path / "nowhere")
    with pytest.raises(WanTextError, match=re.escape(RELEASE_CHECKPOINT)) as err:
        find_text_files(tmp_path)
    assert "text_encoder/" in str(err.value) and isinstance(err.value, ModelInputError)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / RELEASE_CHECKPOINT).write_bytes((dirs.release / RELEASE_CHECKPOINT).read_bytes())
    with pytest.raises(WanTextError, match=re.escape(RELEASE_TOKENIZER)):
        find_text_files(lone)
    bare = tmp_path / "bare"
    (bare / "text_encoder").mkdir(parents=True)
    (bare / "text_encoder" / "config.json").write_text((dirs.diffusers / "text_encoder" / "config.json").read_text())
    with pytest.raises(WanTextError, match="tokenizer"):
        find_text_files(bare)
    dirs.tok.save_pretrained(bare / "tokenizer")
    with pytest.raises(ModelInputError, match="text_encoder"):  # a config without weights
        _load(bare)


def _release_copy(tmp_path, dirs, edit):
    root = tmp_path / "edited"
    dirs.tok.save_pretrained(root / RELEASE_TOKENIZER)
    sd = torch.load(dirs.release / RELEASE_CHECKPOINT, weights_only=True)
    edit(sd)
    torch.save(sd, root / RELEASE_CHECKPOINT)
    return root


def test_missing_unknown_and_misshaped_keys_are_named(tmp_path, dirs):
    root = _release_copy(tmp_path, dirs, lambda sd: sd.pop("blocks.1.ffn.fc2.weight"))
    with pytest.raises(WanTextError, match=r"1 missing \(blocks\.1\.ffn\.fc2\.weight\)"):
        _load(root)
    root = _release_copy(tmp_path / "e", dirs, lambda sd: sd.pop("token_embedding.weight"))
    with pytest.raises(WanTextError, match=r"lacks token_embedding\.weight"):
        WanTextEncoder.from_pretrained(root, dtype=DTYPE)
    root = _release_copy(tmp_path / "b", dirs, lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(1)}))
    with pytest.raises(WanTextError, match=re.escape("blocks.0.extra.weight")):
        _load(root)
    root = _release_copy(tmp_path / "c", dirs, lambda sd: sd.update({"blocks.0.norm2.weight": torch.ones(3)}))
    with pytest.raises(WanTextError, match=r"mis-shaped \(blocks\.0\.norm2\.weight"):
        _load(root)


def test_width_mismatch_names_both(dirs):
    for folder in (dirs.release, dirs.diffusers):
        with pytest.raises(WanTextError, match=rf"text_dim {D_MODEL}.*expects 4096"):
            load_text_encoder(folder, text_dim=4096, text_len=TEXT_LEN, device="cpu", dtype=DTYPE)


def test_no_folder_gives_the_builtin_encoder():
    enc = load_text_encoder(None, text_dim=48, text_len=TEXT_LEN, device="cpu", dtype=torch.float32)
    assert isinstance(enc, BuiltinTextEncoder)
    cond = enc.encode(["a cat"])
    assert cond.txt.shape == (1, TEXT_LEN, 48) and cond.pooled.shape == (1, 1)
    assert text_streamable(enc) is None


# --- streaming and memory --------------------------------------------------------------------


def test_text_streamable_lists_the_blocks(dirs):
    enc = _load(dirs.release)
    resident, blocks = text_streamable(enc)
    assert [name for name, _ in blocks] == [f"encoder.block.{i}" for i in range(LAYERS)]
    assert blocks[0][1] is enc.model.encoder.block[0]
    assert enc.model.shared in resident and enc.model.encoder.final_layer_norm in resident
    # every parameter is in exactly one part: nothing is left behind on the host
    ids = [id(p) for m in resident for p in m.parameters()]
    ids = list(dict.fromkeys(ids)) + [id(p) for _, b in blocks for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in enc.model.parameters())


def test_streamed_blocks_encode_the_same(dirs):
    placement = pytest.importorskip("parallel.placement")
    enc = _load(dirs.release)
    want = enc.encode(PROMPTS)
    resident, blocks = text_streamable(enc)
    placed = placement.place_blocks(blocks, device=torch.device("cpu"), streamed=len(blocks),
                                    materialise=lambda name, m: m, structure=lambda name, m: m.to("meta"))
    try:
        got = enc.encode(PROMPTS)
    finally:
        placed.close()
    assert torch.equal(got.txt, want.txt)


def test_text_weight_bytes():
    gib = 2**30
    full, streamed = text_weight_bytes(False), text_weight_bytes(True)
    assert 11.3e9 < full - gib < 11.45e9  # the release's 11.4 GB bf16 file
    assert 3.2e9 < streamed - gib < 3.3e9  # 2.1 GB embedding + 3 blocks of 386 MB
