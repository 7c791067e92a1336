"""Step caching (TeaCache, First-Block Cache): exact at threshold 0, for every registered family,
and decided alike on every rank of a replica (the reduction over the shards is needed and present).

Single-process tests run on the CPU in fp32. The multi-process ones (`multiprocess` marker) run the
real command line under torchrun on 2 and 4 CPU processes over gloo and compare with one process.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
import toy_family  # noqa: F401  (registers the toy family: the cache must work for it too)
from launcher.config import ConfigError
from models.sampling import denoise_tokens, initial_noise
from models.step_cache import CacheSettings, StepCache, l1_sums, polynomial, rescaled
from test_cli_config import _cfg
from test_distributed_generate import run_launcher

STEPS = 8


def _smallest_preset(family) -> str:
    return min(family.presets, key=lambda p: (family.presets[p].hidden_size, p))


def _problem(family):
    """(model, noise tokens [1, S, F], rope, conditioning, scheduler factory, embedded guidance) of
    a small video for ``family``'s smallest preset, seeded random weights, CPU fp32."""
    preset = _smallest_preset(family)
    cfg = family.config(preset)
    model = models.build_model(preset, seed=0, dtype=torch.float32)
    size = (2 * family.size_multiple, 3 * family.size_multiple, 2 * family.frame_step + 1)
    latent = initial_noise((1, cfg.in_channels, *cfg.latent_grid(*size)), 3)
    encoder = family.text.load(None, cfg, device="cpu", dtype=torch.float32)
    cond = encoder.encode(["a red ball rolls to the left"])
    guidance = 6.0 if family.guidance == "embedded" and getattr(cfg, "guidance_embed", True) else None
    return (model, family.patchify(latent, cfg.patch_size), model.rope(cfg.token_grid(*size)), cond,
            lambda: family.scheduler(steps=STEPS, shift=7.0), guidance)


def _denoise(problem, cache: StepCache | None, negative=None, cfg_scale=1.0):
    model, tokens, rope, cond, scheduler, guidance = problem
    return denoise_tokens(model, tokens, rope, cond, scheduler(), embedded_guidance=guidance, cache=cache,
                          negative=negative, cfg_scale=cfg_scale)


def _cache(family, kind: str, threshold: float | None) -> StepCache:
    preset = _smallest_preset(family)
    return StepCache(CacheSettings.resolve(kind, threshold, family.cache(family.config(preset))), STEPS)


@pytest.mark.parametrize("family", models.families(), ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_every_family_caches_exactly_at_threshold_zero_and_skips_above_it(family, kind):
    """CPU, fp32. Threshold 0 computes every step through the DiT's stages: the latents are
    bit-identical to --cache off. A threshold above every measured distance skips steps, and the
    skipped steps change the result (the cache really reuses residuals)."""
    assert family.cache is not None, f"family {family.name} declares no step cache"
    problem = _problem(family)
    exact = _denoise(problem, None)
    zero = _cache(family, kind, 0.0)
    assert torch.equal(_denoise(problem, zero), exact)
    assert zero.skipped == [] and zero.computed == list(range(STEPS))

    eager = _cache(family, kind, 1e9)
    cached = _denoise(problem, eager)
    assert eager.skipped, "an unreachable threshold skipped nothing"
    assert eager.computed[0] == 0 and eager.computed[-1] == STEPS - 1, "the first and last steps always run"
    assert sorted(eager.computed + eager.skipped) == list(range(STEPS))
    assert torch.isfinite(cached).all() and not torch.equal(cached, exact)


def test_classic_cfg_decides_once_per_step_for_both_branches():
    """CPU, fp32. With a negative prompt both passes of a step are skipped or computed together
    (as on a CFG-parallel pair of ranks); threshold 0 still equals the uncached CFG run."""
    family = models.get_family("tiny")
    problem = _problem(family)
    negative = family.text.load(None, problem[0].config, device="cpu", dtype=torch.float32).encode([""])
    exact = _denoise(problem, None, negative, 4.0)
    assert torch.equal(_denoise(problem, _cache(family, "teacache", 0.0), negative, 4.0), exact)
    cache = _cache(family, "fbcache", 1e9)
    _denoise(problem, cache, negative, 4.0)
    assert len(cache.computed) + len(cache.skipped) == STEPS and len(cache._residual) == 2


def test_teacache_rescales_with_the_published_polynomials():
    """The polynomial is evaluated highest power first (numpy's poly1d order); where a fit goes
    negative (Wan's, far from its range) the raw change counts instead."""
    spec = models.get_family("tiny").cache(models.get_family("tiny").config("tiny"))
    d = 0.05
    c = spec.tea_coefficients
    assert polynomial(c, d) == pytest.approx(c[0] * d**4 + c[1] * d**3 + c[2] * d**2 + c[3] * d + c[4])
    assert c[0] == pytest.approx(733.226126) and c[-1] == pytest.approx(0.0961237896)
    assert rescaled(c, d) == polynomial(c, d)  # HunyuanVideo's fit stays positive: used as published
    wan = models.get_family("wan-tiny").cache(models.get_family("wan-tiny").config("wan-tiny")).tea_coefficients
    assert polynomial(wan, 0.9) < 0 and rescaled(wan, 0.9) == 0.9  # outside Wan's fit: the raw change counts


@dataclasses.dataclass(frozen=True)
class _State:
    img: torch.Tensor


class _Replay:
    """A stand-in DiT for the cache alone: replays recorded TeaCache signals (one per step)."""

    def __init__(self, signals):
        self.signals, self.calls = signals, 0

    def tea_signal(self, state):
        self.calls += 1
        return self.signals[self.calls - 1], True

    def run_blocks(self, state, start=0, stop=None):
        return _State(state.img + 1)


def _decisions(signals, settings, valid, reduce=None) -> list[int]:
    cache = StepCache(settings, len(signals), valid, reduce or (lambda sums: sums))
    dit = _Replay(signals)
    for _ in signals:
        cache.run(dit, [_State(torch.zeros(1))])
    return cache.skipped


def test_a_per_rank_decision_differs_on_uneven_shards_and_the_reduction_restores_it():
    """CPU, fp32. The TeaCache signals of a real run (the tiny HunyuanVideo DiT, 18 tokens) cut
    into the uneven shards of 4 ranks (5, 5, 5 and 3 valid tokens + 2 of padding): deciding on a
    rank's own shard skips other steps than the whole sequence does on some rank (ranks would
    take different branches and hang), while the sums added over the shards, padding left out,
    give the whole sequence's decisions on every rank."""
    family = models.get_family("tiny")
    problem = _problem(family)
    model = problem[0]
    signals = []
    original = model.tea_signal
    model.tea_signal = lambda s: (signals.append(original(s)[0]) or (signals[-1], True))
    settings = CacheSettings.resolve("teacache", 0.15, family.cache(model.config))
    whole = StepCache(settings, STEPS)
    _denoise(problem, whole)
    del model.tea_signal
    n = signals[0].shape[1]
    ranks, chunk = 4, -(-n // 4)
    assert n % ranks, "the shards must be uneven"
    shards = [[torch.nn.functional.pad(s[:, r * chunk:(r + 1) * chunk], (0, 0, 0, chunk - min(chunk, n - r * chunk)))
               for s in signals] for r in range(ranks)]
    valid = [min(chunk, n - r * chunk) for r in range(ranks)]
    assert valid[-1] < chunk
    own = [_decisions(shards[r], settings, valid[r]) for r in range(ranks)]
    assert any(d != whole.skipped for d in own), f"every shard decided as the whole ({own}): pick another case"

    for r in range(ranks):
        assert _decisions_with_steps(shards[r], settings, valid[r], shards, valid) == whole.skipped


def _decisions_with_steps(signals, settings, valid_r, shards, valid) -> list[int]:
    """The decisions of one rank whose sums are added over every rank's shard of the same step."""
    dit = _Replay(signals)

    def reduce(sums):
        i = dit.calls - 1  # the step whose signal was just read
        parts = [l1_sums([shards[q][i]], [shards[q][i - 1]], valid[q]) for q in range(len(shards))]
        return sum(parts[1:], parts[0])  # rank order, as the all-reduce adds them

    cache = StepCache(settings, len(signals), valid_r, reduce)
    for _ in signals:
        cache.run(dit, [_State(torch.zeros(1))])
    return cache.skipped


# --- the launcher: flags, record, ranks --------------------------------------------------------

def test_cache_flags_are_checked_before_any_collective():
    with pytest.raises(ConfigError, match=r"--cache-threshold -0.5: give a finite number >= 0"):
        _cfg("--preset", "tiny", "--prompt", "a cat", "--cache", "teacache", "--cache-threshold", "-0.5")
    settings = CacheSettings.resolve("fbcache", None, models.get_family("tiny").cache(None))
    assert settings.threshold == 0.06  # HunyuanVideo's First-Block Cache default
    with pytest.raises(ValueError, match="declares no step cache"):
        CacheSettings.resolve("teacache", None, None)


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_cached_steps_with_every_block_streamed_equal_the_resident_run(tmp_path, kind):
    """CPU, fp32. Skipped steps call the blocks out of the streamer's order (FBCache: block 0 alone;
    TeaCache reads block 0's modulation between its calls) and the streamer restarts its pipeline:
    with all 4 blocks of the tiny preset streamed, the latents and the skipped steps are the
    resident run's. (On CUDA the streamed weights wait in host memory: the gpu test below covers
    the signal read from there.)"""
    runs = {}
    for name, extra in (("resident", ()), ("streamed", ("--stream-blocks", "4"))):
        proc = run_launcher(tmp_path / name, *VIDEO, "--cache", kind, "--cache-threshold", "0.5", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = _latents_and_record(tmp_path / name)
    (a, rec_a), (b, rec_b) = runs["resident"], runs["streamed"]
    assert rec_b["memory"]["used"]["streamed_blocks"] == 4
    assert rec_a["step_cache"]["skipped_steps"] == rec_b["step_cache"]["skipped_steps"] != []
    # Within fp32 rounding, not bit for bit: CPU matmul kernels may pick another path for weights
    # that live in the streamer's buffers (other alignment) on a many-core machine.
    assert ((a - b).norm() / a.norm()).item() < 1e-6


@pytest.mark.gpu
def test_teacache_reads_a_streamed_first_block_from_host_memory_on_cuda(tmp_path):
    """CUDA, fp32, one process. With every block streamed, block 0's weights wait in host memory
    between its calls, so TeaCache's signal takes a device copy of its modulation layer: the
    latents and the skipped steps equal the resident run's (up to the GPU's kernel choices)."""
    runs = {}
    for name, extra in (("resident", ()), ("streamed", ("--stream-blocks", "4"))):
        proc = run_launcher(tmp_path / name, *VIDEO, "--cache", "teacache", "--cache-threshold", "0.5",
                            "--device", "cuda", "--dtype", "fp32", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = _latents_and_record(tmp_path / name)
    (a, rec_a), (b, rec_b) = runs["resident"], runs["streamed"]
    assert rec_b["memory"]["used"]["streamed_blocks"] == 4 and rec_b["device"].startswith("cuda")
    assert rec_a["step_cache"]["skipped_steps"] == rec_b["step_cache"]["skipped_steps"] != []
    assert ((a - b).norm() / a.norm()).item() < 1e-5


SKIPS = re.compile(r"\[rank (\d)\] step cache (\w+) \(threshold [0-9.e-]+\): \d+ of \d+ steps computed, skipped (.*)")
VIDEO = ("--prompt", "a cat", "--size", "48x80", "--frames", "5", "--steps", str(STEPS), "--log-all-ranks")  # 30 tokens
CFG = ("--cfg-scale", "4", "--negative-prompt", "blurry")
WAN = ("--preset", "wan-tiny")  # classic CFG by default (its release's scale and negative prompt)
# (kind, Wan) -> a threshold that skips some of the 8 steps but not all, with these random weights
THRESHOLDS = {("teacache", False): "0.1", ("fbcache", False): "0.5", ("teacache", True): "1.5", ("fbcache", True): "0.5"}


def _latents_and_record(out: Path):
    (lat,) = out.glob("*.latents.safetensors")
    (rec,) = out.glob("*.json")
    return load_file(str(lat))["latents"], json.loads(rec.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of a cache and CFG choice (computed once): latents and record."""
    runs = {}

    def get(cache: tuple, flags: tuple):
        key = (cache, flags)
        if key not in runs:
            out = tmp_path_factory.mktemp("one")
            proc = run_launcher(out, *VIDEO, *cache, *flags)
            assert proc.returncode == 0, proc.stderr
            runs[key] = _latents_and_record(out)
        return runs[key]

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
@pytest.mark.parametrize("nproc, flags, same", [
    (2, ("--ulysses", "2", "--ring", "1"), ()),
    (4, ("--ulysses", "2", "--ring", "2"), ()),
    (4, ("--ulysses", "1", "--ring", "4"), ()),
    (2, ("--cfg", "2"), CFG),
    (4, ("--cfg", "2", "--ulysses", "2"), CFG),
    (4, ("--cfg", "2", "--ulysses", "2"), WAN),
])
def test_every_rank_skips_the_steps_one_process_skips(tmp_path, one_process, kind, nproc, flags, same):
    """CPU, fp32, gloo. 30 tokens (uneven over 4 SP ranks), every SP factorisation and CFG
    parallel, both families: every rank logs the same skipped steps, which are those of one
    process, and the latents equal the one-process run's."""
    cache = ("--cache", kind, "--cache-threshold", THRESHOLDS[kind, same == WAN])
    flags = (*flags, *same)
    ref, ref_record = one_process(cache, same)
    skipped = ref_record["step_cache"]["skipped_steps"]
    assert skipped and ref_record["step_cache"]["kind"] == kind
    assert sorted(skipped + ref_record["step_cache"]["computed_steps"]) == list(range(STEPS))

    proc = run_launcher(tmp_path / "many", *VIDEO, *cache, *flags, nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    logged = {int(r): s for r, k, s in SKIPS.findall(proc.stderr)}
    assert sorted(logged) == list(range(nproc)), proc.stderr[-3000:]
    assert set(logged.values()) == {str(skipped)}
    latents, record = _latents_and_record(tmp_path / "many")
    assert record["step_cache"]["skipped_steps"] == skipped
    rel = ((latents - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"latents differ from one process: relative {rel:.2e}"


@pytest.mark.parametrize("preset", ["tiny", "wan-tiny"])
def test_an_uncached_forward_frees_the_first_block_input_before_the_last_block(preset):
    """CPU. The stages must cost nothing without a cache: by the time the last block runs, the
    image stream that entered the first block is gone (a held stage state would keep one more
    `[B, S, C]` alive through every block, which the memory planner does not count)."""
    import weakref

    family = models.get_family(preset)
    model, tokens, rope, cond, _, guidance = _problem(family)
    entered, alive = [], []
    enter = model.enter

    def tracked(*args):
        state = enter(*args)
        entered.append(weakref.ref(state.img))
        return state

    model.enter = tracked
    last = family.blocks(model)[-1][1]
    last.register_forward_pre_hook(lambda module, args: alive.append(entered[-1]() is not None))
    t = torch.tensor([500.0])
    g = None if guidance is None else torch.tensor([6000.0])
    with torch.inference_mode():
        model(tokens, *rope, cond.txt, cond.mask, t, cond.pooled, g)
    assert alive == [False], "the first block's input is still held when the last block runs"
