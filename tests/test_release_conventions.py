"""The HunyuanVideo release's numeric conventions that decide the output (embedded guidance in the
DiT's dtype, stripped prompts, the release's noise as an option); truncating frames to uint8 is in
tests/test_video_output.py.

CPU tests (fp32/bf16 on the CPU, gloo); the `gpu` tests check the release-noise option against
`torch.Generator("cuda")` and across 2 GPU ranks.
"""

import json

import pytest
import torch

import models
from models.hunyuan_video import patchify
from models.sampling import TextConditioning, denoise_tokens, embedded_guidance_tensor, initial_noise
from models.scheduler import FlowMatchEuler

GRID = (3, 4, 6)  # latent [1, 16, 3, 8, 12] -> 3 x 4 x 6 tokens


def release_guidance(scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The release's expression (its pipeline's denoising loop), written out here."""
    return torch.tensor([scale], dtype=torch.float32).to(dtype) * 1000.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "dtype, values",
    [
        (torch.bfloat16, {6.0: 6016.0, 7.0: 7008.0, 5.0: 4992.0, 1.0: 1000.0}),
        (torch.float16, {6.0: 6000.0, 7.0: 7000.0, 5.0: 5000.0}),
        (torch.float32, {6.0: 6000.0, 7.5: 7500.0}),
    ],
)
def test_embedded_guidance_value_is_rounded_in_the_dit_dtype(dtype, values):
    for scale, want in values.items():
        got = embedded_guidance_tensor(scale, 2, dtype)
        assert got.dtype == dtype and got.shape == (2,)
        assert got.tolist() == [want, want]
        assert torch.equal(got, release_guidance(scale, dtype).expand(2))


def test_bf16_guidance_embedding_equals_the_release_expression():
    model = models.build_model("tiny", dtype=torch.bfloat16, seed=0)
    ours = model.guidance_in(embedded_guidance_tensor(6.0, 1, model.dtype))
    assert torch.equal(ours, model.guidance_in(release_guidance(6.0, torch.bfloat16)))
    # What the old fp32 expression embedded (6000) is another guidance, not rounding noise.
    old = model.guidance_in(torch.full((1,), 6000.0))
    assert rel(old.float(), ours.float()) > 0.05


def _cond(cfg) -> TextConditioning:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 9:] = 0
    txt = torch.randn(1, 12, cfg.text_states_dim, generator=g)
    return TextConditioning(txt, mask, torch.randn(1, cfg.pooled_dim, generator=g))


def _reference_loop(model, tokens, cond, scheduler, guidance: torch.Tensor) -> torch.Tensor:
    """An Euler loop written out as the release runs it: fp32 timesteps, `guidance` as given."""
    cos, sin = model.rope(GRID)
    x = tokens.float()
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps()):
            v = model(x, cos, sin, cond.txt, cond.mask, t[None], cond.pooled, guidance).float()
            x = scheduler.step(x, v, i)
    return x


def test_bf16_sampling_follows_the_release_expression():
    """CPU, bf16 weights. The reference runs the same weights in fp32 fed the value the release
    computes for a bf16 DiT (6016): our bf16 loop is within bf16 rounding of it; the old fp32
    expression (6000) is not."""
    model = models.build_model("tiny", dtype=torch.bfloat16, seed=0)
    exact = models.build_model("tiny", dtype=torch.bfloat16, seed=0).float()
    cond, sched = _cond(model.config), FlowMatchEuler(steps=4)
    tokens = patchify(initial_noise((1, 16, 3, 8, 12), 1), model.config.patch_size)
    ref = _reference_loop(exact, tokens, cond, sched, release_guidance(6.0, torch.bfloat16))
    ours = denoise_tokens(model, tokens, model.rope(GRID), cond, sched, embedded_guidance=6.0)
    old = _reference_loop(model, tokens, cond, sched, torch.full((1,), 6000.0))
    assert rel(ours, ref) < 1e-2
    assert rel(old, ref) > 2e-2


def test_release_noise_on_cpu_is_the_cpu_generator_in_the_release_dtype():
    shape = (1, 16, 3, 8, 12)
    got = initial_noise(shape, 42, source="release", device="cpu", dtype=torch.float16)
    want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float16)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    # Other numbers than the default fp32 stream (how torch's CPU generator fills fp16 differs
    # between torch versions: rounded fp32 draws in 2.13, another stream in 2.11).
    assert not torch.equal(got, initial_noise(shape, 42))
    with pytest.raises(ValueError, match="valid: cpu, release"):
        initial_noise(shape, 42, source="gpu")


def test_prompts_are_stripped(tmp_path):
    from launcher.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["generate", "--preset", "tiny", "--prompt", "  a cat walks \n",
                                      "--negative-prompt", " blurry\t", "--cfg-scale", "5"])
    cfg = run_config_from_args(args)
    assert cfg.prompts == ("a cat walks",) and cfg.negative_prompt == "blurry"
    lines = tmp_path / "prompts.txt"
    lines.write_text("  one  \n\n# comment\n\ttwo\n")
    args = build_parser().parse_args(["generate", "--preset", "tiny", "--prompts-file", str(lines)])
    assert run_config_from_args(args).prompts == ("one", "two")


@pytest.mark.multiprocess
def test_release_noise_generate_parallel_equals_single_and_is_recorded(tmp_path):
    """CPU, fp32, gloo: `--noise release` on 2 ranks (ulysses 2) equals 1 rank; the record says
    which conventions ran."""
    from test_distributed_generate import assert_same_videos, run_launcher

    args = ("--noise", "release", "--text-encoder-precision", "fp16", "--device", "cpu", "--prompt", "a cat")
    single, par = tmp_path / "single", tmp_path / "par"
    for out, nproc in ((single, 1), (par, 2)):
        proc = run_launcher(out, *args, nproc=nproc)
        assert proc.returncode == 0, proc.stderr
    assert_same_videos(single, par)
    conv = json.loads(next(single.glob("*.json")).read_text())["conventions"]
    assert conv["noise"] == {"source": "release", "generator": "cpu", "dtype": "float16"}
    assert conv["embedded_guidance_value"] == 6000.0  # fp32 on the CPU
    assert conv["text_encoder_dtype"] == "float16"


@pytest.mark.gpu
def test_release_noise_on_gpu_equals_the_cuda_generator():
    shape = (1, 16, 9, 16, 24)
    got = initial_noise(shape, 1234, source="release", device="cuda", dtype=torch.float16)
    gen = torch.Generator("cuda").manual_seed(1234)
    want = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    assert torch.equal(got, want.float().cpu())
    assert not torch.equal(got, initial_noise(shape, 1234))


def _release_noise_on_my_gpu(rank: int, world: int) -> torch.Tensor:
    torch.cuda.set_device(rank)
    return initial_noise((1, 16, 9, 16, 24), 99, source="release", device=f"cuda:{rank}", dtype=torch.float16)


@pytest.mark.gpu
def test_release_noise_is_the_same_on_two_gpu_ranks():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from mp_util import run_ranks

    a, b = run_ranks(_release_noise_on_my_gpu, world_size=2, timeout=120)
    assert torch.equal(a, b)
