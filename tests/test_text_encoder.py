"""Text encoders: the real LLM + CLIP path on tiny random models saved offline, and the built-in one.

The tiny models are the same transformers classes as the release's (Llama, LLaVA, CLIP) with
random weights, saved to tmp folders in every supported layout with tokenizers built here; no file
is downloaded. References are computed independently of the code under test: the crop is counted
from the template text, and the third-to-last hidden state is the output of a copy of the model cut
after its first N-2 layers with the final norm removed.
"""

import copy
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from models.hunyuan_video.text_encoder import (  # noqa: E402
    PROMPT_TEMPLATE_VIDEO,
    HunyuanTextEncoders,
    LlmPromptEncoder,
    TextEncoderError,
    find_encoder_folders,
    has_encoder_folders,
    load_text_encoder,
    template_prefix_length,
)
from models.text_builtin import BuiltinTextEncoder, hashed_vector  # noqa: E402

from tiny_text_models import (  # noqa: E402
    CLIP_HIDDEN,
    HIDDEN,
    LAYERS,
    PROMPTS,
    TEXT_LEN,
    llama_config,
    llm_tokenizer,
    split_tokens,
    write_clip_tokenizer,
    write_release_text_encoders,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{layout: model_dir} for the release, diffusers and LLaVA layouts, all holding the same
    weights, plus "ref": the in-memory originals (LlamaModel, CLIP text model), never saved and loaded."""
    root = tmp_path_factory.mktemp("ckpts")
    release = root / "release"  # LlamaForCausalLM + tokenizer; the whole CLIPModel + its tokenizer
    causal, clip_full, tok, n_vocab, vision = write_release_text_encoders(release)

    diffusers = root / "diffusers"  # base models, tokenizers in folders of their own
    causal.model.save_pretrained(diffusers / "text_encoder")
    llm_tokenizer(with_pad=True)[0].save_pretrained(diffusers / "tokenizer")
    clip_text = transformers.CLIPTextModel.from_pretrained(release / "text_encoder_2", local_files_only=True)
    clip_text.save_pretrained(diffusers / "text_encoder_2")
    write_clip_tokenizer(diffusers / "tokenizer_2")

    llava = root / "llava"  # a whole LlavaForConditionalGeneration as the LLM folder
    llava_config = transformers.LlavaConfig(
        vision_config=vision, text_config=llama_config(n_vocab), image_token_index=n_vocab - 1
    )
    llava_model = transformers.LlavaForConditionalGeneration(llava_config)
    llava_model.model.language_model.load_state_dict(causal.model.state_dict())
    llava_model.save_pretrained(llava / "text_encoder")
    tok.save_pretrained(llava / "text_encoder")
    shutil.copytree(release / "text_encoder_2", llava / "text_encoder_2")
    ref = (causal.model, clip_full.text_model)
    return {"release": release, "diffusers": diffusers, "llava": llava, "ref": ref}


@pytest.fixture(scope="module")
def enc(ckpts):
    return HunyuanTextEncoders.from_pretrained(ckpts["release"], device="cpu", dtype=torch.float32)


def n_tokens(text: str) -> int:
    return len(split_tokens(text))


def reference_llm(llm, tokenizer, prompt):
    """hidden_states[-3] computed by hand: the model cut after its first N-2 layers, without the
    final norm, run on the templated prompt; then the template prefix (BOS + its tokens) dropped."""
    crop = 1 + n_tokens(PROMPT_TEMPLATE_VIDEO.split("{}")[0])
    batch = tokenizer(PROMPT_TEMPLATE_VIDEO.format(prompt), max_length=TEXT_LEN + crop, padding="max_length",
                      truncation=True, return_tensors="pt")
    cut = copy.deepcopy(llm)
    cut.layers = cut.layers[: LAYERS - 2]
    cut.config.num_hidden_layers = LAYERS - 2
    cut.norm = torch.nn.Identity()
    with torch.no_grad():
        states = cut(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return states[:, crop:], crop


def test_shapes_and_dtypes(enc):
    cond = enc.encode(PROMPTS)
    assert cond.txt.shape == (2, TEXT_LEN, HIDDEN) and cond.txt.dtype == torch.float32
    assert cond.mask.shape == (2, TEXT_LEN) and cond.mask.dtype == torch.long
    assert cond.pooled.shape == (2, CLIP_HIDDEN)
    assert (enc.text_dim, enc.pooled_dim) == (HIDDEN, CLIP_HIDDEN)


def test_llm_states_are_third_to_last_layer_after_the_crop(enc, ckpts):
    llm, _ = ckpts["ref"]
    for prompt in PROMPTS:
        ref, crop = reference_llm(llm, enc.llm.tokenizer, prompt)
        assert enc.llm.crop_start == crop
        valid = n_tokens(prompt) + 1  # the prompt's words and <|eot_id|>
        got = enc.encode([prompt])
        torch.testing.assert_close(got.txt[0, :valid], ref[0, :valid], rtol=1e-5, atol=1e-5)


def test_mask_counts_prompt_tokens_and_padding_is_zero(enc):
    cond = enc.encode(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        valid = n_tokens(prompt) + 1
        assert cond.mask[b].tolist() == [1] * valid + [0] * (TEXT_LEN - valid)
        assert cond.txt[b, :valid].abs().sum(-1).min() > 0
        assert torch.all(cond.txt[b, valid:] == 0)


def test_long_prompt_is_truncated_to_text_len_with_a_warning(enc):
    with pytest.warns(UserWarning) as caught:
        cond = enc.encode(["cat " * 300])
    assert cond.txt.shape[1] == TEXT_LEN and cond.mask.sum() == TEXT_LEN
    said = [str(w.message) for w in caught]
    assert any(f"the LLM text encoder keeps the first {TEXT_LEN}" in m for m in said), said
    assert any("CLIP (its pooled vector) keeps the first 77" in m for m in said), said


def test_first_kept_token_is_the_prompt(enc):
    tok = enc.llm.tokenizer
    ids = tok(PROMPT_TEMPLATE_VIDEO.format(PROMPTS[0]))["input_ids"]
    assert ids[enc.llm.crop_start] == tok.convert_tokens_to_ids("A")
    assert template_prefix_length(tok) == enc.llm.crop_start


def test_clip_pooled_is_the_eos_state(enc, ckpts):
    _, clip = ckpts["ref"]
    batch = enc.clip.tokenizer(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    eos = batch["attention_mask"].sum(1) - 1  # the raw prompt, no template: EOS is the last valid token
    assert torch.all(batch["input_ids"][torch.arange(2), eos] == enc.clip.tokenizer.eos_token_id)
    torch.testing.assert_close(enc.encode(PROMPTS).pooled, states[torch.arange(2), eos], rtol=1e-5, atol=1e-5)


def test_different_prompts_differ_and_batch_equals_singles(enc):
    both = enc.encode(PROMPTS)
    singles = [enc.encode([p]) for p in PROMPTS]
    for b, one in enumerate(singles):
        torch.testing.assert_close(both.txt[b], one.txt[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(both.mask[b], one.mask[0])
        torch.testing.assert_close(both.pooled[b], one.pooled[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both.txt[0, :3], both.txt[1, :3])
    assert not torch.allclose(both.pooled[0], both.pooled[1])


@pytest.mark.parametrize("layout", ["diffusers", "llava"])
def test_other_layouts_give_the_same_encoding(enc, ckpts, layout):
    other = HunyuanTextEncoders.from_pretrained(ckpts[layout], device="cpu", dtype=torch.float32)
    a, b = enc.encode(PROMPTS), other.encode(PROMPTS)
    torch.testing.assert_close(a.txt, b.txt, rtol=1e-5, atol=1e-5)  # padded with <pad> vs <|end_of_text|>
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-5, atol=1e-5)


def test_bf16_load(ckpts):
    cond = HunyuanTextEncoders.from_pretrained(ckpts["diffusers"], dtype=torch.bfloat16).encode(PROMPTS[:1])
    assert cond.txt.dtype == cond.pooled.dtype == torch.bfloat16
    assert torch.isfinite(cond.txt.float()).all()


def test_explicit_crop_start_that_disagrees_warns(enc):
    with pytest.warns(UserWarning, match="template prefix"):
        bad = LlmPromptEncoder(enc.llm.model, enc.llm.tokenizer, crop_start=enc.llm.crop_start + 1)
    assert bad.crop_start == enc.llm.crop_start + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LlmPromptEncoder(enc.llm.model, enc.llm.tokenizer, crop_start=enc.llm.crop_start)


def test_missing_folders_name_the_path(tmp_path, ckpts):
    assert has_encoder_folders(ckpts["diffusers"]) and not has_encoder_folders(tmp_path)
    with pytest.raises(TextEncoderError, match=r"text_encoder: expected the LLM text encoder"):
        find_encoder_folders(tmp_path)
    shutil.copytree(ckpts["release"] / "text_encoder", tmp_path / "text_encoder")
    with pytest.raises(TextEncoderError, match=r"text_encoder_2: expected the CLIP"):
        load_text_encoder(tmp_path, text_dim=HIDDEN, pooled_dim=CLIP_HIDDEN)
    (tmp_path / "text_encoder_2").mkdir()
    shutil.copy(ckpts["release"] / "text_encoder_2" / "config.json", tmp_path / "text_encoder_2")
    with pytest.raises(TextEncoderError, match=r"no tokenizer for .*text_encoder_2.*tokenizer_2"):
        find_encoder_folders(tmp_path)
    with pytest.raises(TextEncoderError, match="does not exist"):
        find_encoder_folders(tmp_path / "nope")


def test_missing_weights_are_an_error(tmp_path, ckpts):
    llm, _ = ckpts["ref"]
    folder = tmp_path / "text_encoder"
    llm.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in llm.state_dict().items() if k != "norm.weight"}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from models.hunyuan_video.text_encoder import _load_llm

    with pytest.raises(TextEncoderError, match=r"norm\.weight"):
        _load_llm(folder, torch.float32)


def test_load_text_encoder_picks_and_checks_widths(ckpts):
    builtin = load_text_encoder(None, text_dim=24, pooled_dim=8)
    assert isinstance(builtin, BuiltinTextEncoder) and builtin.encode(["x"]).txt.shape == (1, TEXT_LEN, 24)
    with pytest.raises(TextEncoderError, match=f"text_dim {HIDDEN} / pooled_dim {CLIP_HIDDEN}.*expects 24 / 8"):
        load_text_encoder(ckpts["release"], text_dim=24, pooled_dim=8)
    real = load_text_encoder(ckpts["release"], text_dim=HIDDEN, pooled_dim=CLIP_HIDDEN, dtype=torch.float32)
    assert isinstance(real, HunyuanTextEncoders)


def test_offload_and_close(ckpts):
    e = HunyuanTextEncoders.from_pretrained(ckpts["release"], dtype=torch.float32)
    e.offload()
    assert e.encode(PROMPTS[:1]).txt.device.type == "cpu"
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        e.encode(PROMPTS[:1])


def _live_cuda_tensors() -> str:
    """What still holds GPU memory (for the failure message)."""
    import gc

    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                found.append(f"{type(obj).__name__}{tuple(obj.shape)} {obj.dtype}")
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            continue
    return f"{torch.cuda.memory_allocated()} bytes allocated; live CUDA tensors: {found[:20]}"


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_and_offload_frees_memory(enc, ckpts):
    torch._C._cuda_clearCublasWorkspaces()  # earlier tests' workspaces are not this test's to count
    base = torch.cuda.memory_allocated()
    gpu = HunyuanTextEncoders.from_pretrained(ckpts["release"], device="cuda", dtype=torch.bfloat16)
    assert torch.cuda.memory_allocated() > base
    got, want = gpu.encode(PROMPTS), enc.encode(PROMPTS)
    assert got.txt.device.type == got.mask.device.type == got.pooled.device.type == "cuda"
    assert torch.equal(got.mask.cpu(), want.mask)
    for a, b in ((got.txt, want.txt), (got.pooled, want.pooled)):
        assert (a.float().cpu() - b).norm() / b.norm() < 3e-2  # bf16 weights and activations
    del got, a, b  # the loop's names still held the last pair
    gpu.offload()
    assert torch.cuda.memory_allocated() == base, _live_cuda_tensors()
    assert gpu.encode(PROMPTS[:1]).txt.device.type == "cpu"


def test_prompts_must_be_a_list_of_strings(enc):
    for bad in ("a cat", [], [1]):
        with pytest.raises(TypeError, match="list of strings"):
            enc.encode(bad)


# --- built-in encoder -------------------------------------------------------------------------


def test_builtin_pinned_values():
    # Pinned so that a change of hash, byte order or scaling on any platform is caught. The first
    # value by hand: SHAKE-256(b"word\0cat") starts 23 3e 79 79, little-endian 0x79793e23.
    first = ((0x79793E23 + 0.5) / 2**32 * 2 - 1) * 3**0.5
    expected = torch.tensor([first, 1.040121078491211, 1.6220802068710327, -0.6453915238380432])
    torch.testing.assert_close(hashed_vector("word\0cat", 4), expected, rtol=0, atol=1e-7)
    cond = BuiltinTextEncoder(4, 3, 6).encode(["a cat"])
    assert torch.equal(cond.txt[0, 1], hashed_vector("word\0cat", 4))
    expected_pooled = torch.tensor([-1.0022969245910645, -1.6231294870376587, 0.1996588110923767])
    torch.testing.assert_close(cond.pooled[0], expected_pooled, rtol=0, atol=1e-7)


def test_builtin_layout_and_determinism():
    e = BuiltinTextEncoder(16, 8, max_tokens=5)
    with pytest.warns(UserWarning, match="prompt of 7 words: the built-in text encoder keeps the first 5"):
        cond = e.encode(["a cat walks", "a cat walks", "a dog walks", "", "one two three four five six seven"])
    assert cond.txt.shape == (5, 5, 16) and cond.mask.shape == (5, 5) and cond.pooled.shape == (5, 8)
    assert cond.mask.sum(1).tolist() == [3, 3, 3, 1, 5]  # empty prompt: one token; long ones truncated
    assert torch.equal(cond.txt[0], cond.txt[1]) and torch.equal(cond.pooled[0], cond.pooled[1])
    assert torch.equal(cond.txt[0, 0], cond.txt[2, 0])  # same word, same row
    assert not torch.equal(cond.txt[0, 1], cond.txt[2, 1]) and not torch.equal(cond.pooled[0], cond.pooled[2])
    assert torch.all(cond.txt[0, 3:] == 0)
    assert torch.equal(BuiltinTextEncoder(16, 8, max_tokens=5).encode(["a cat walks"]).txt[0], cond.txt[0])
    v = hashed_vector("word\0x", 20000)
    assert abs(v.mean()) < 0.05 and abs(v.var() - 1) < 0.05


def test_builtin_dtype_and_device():
    e = BuiltinTextEncoder(4, 2, 3, dtype=torch.bfloat16)
    cond = e.encode(["x"])
    assert cond.txt.dtype == cond.pooled.dtype == torch.bfloat16 and cond.mask.dtype == torch.long
    assert e.to("cpu") is e
    e.offload(), e.close()


def test_streamed_llm_layers_encode_the_same(ckpts, enc):
    """The LLM's decoder layers streamed from host memory (launcher.pipeline.stream_text, for GPU
    budgets below the LLM's size) give the same states as the resident encoder."""
    import models
    from launcher.pipeline import stream_text

    prompts = ["A cat walks on the grass", "a red fox"]
    want = enc.encode(prompts)
    streamed = HunyuanTextEncoders.from_pretrained(ckpts["release"], device="cpu", dtype=torch.float32)
    placed = stream_text(models.get_family("hunyuan-video-13b"), streamed, torch.device("cpu"))
    try:
        assert len(placed.streamed) == len(streamed.llm.model.layers)
        got = streamed.encode(prompts)
    finally:
        placed.close()
    assert torch.equal(got.txt, want.txt) and torch.equal(got.mask, want.mask) and torch.equal(got.pooled, want.pooled)
