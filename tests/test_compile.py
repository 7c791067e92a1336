"""`--compile`: regional torch.compile of the DiT blocks (models/compile.py).

Every test here runs on the CPU in fp32 (a GPU node runs them on its CPU too); the multi-process
one uses gloo. Tests that check what is traced, and how blocks share compiled code, use dynamo's
"aot_eager" backend (the same regions and graph breaks, no code generated); the ones that check
numbers use the real default, inductor, which on the CPU needs a C++ compiler.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from launcher import pipeline as ph
from launcher.memory_plan import Placement
from models.attention import sdpa_joint_attention
from models.compile import compile_dit, first_step_extra_s, use_cache_dir
from models.fp8 import scaled_mm_supported

ROOT = Path(__file__).resolve().parents[1]
GRID = (3, 4, 6)  # 72 image tokens
needs_cxx = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                               reason="inductor's CPU backend needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing, and compile_dit's process-wide setting is undone after."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(suppress_errors=False):
        yield
    torch._dynamo.reset()


def dit_inputs(model):
    """One forward's inputs at GRID: tokens, RoPE rows, 16 text tokens (12 valid), t, pooled, guidance."""
    cfg, n = model.config, GRID[0] * GRID[1] * GRID[2]
    gen = torch.Generator().manual_seed(2)
    txt = torch.randn(1, 16, getattr(cfg, "text_states_dim", None) or cfg.text_dim, generator=gen)
    mask = torch.ones(1, 16)
    mask[:, 12:] = 0
    pooled = torch.randn(1, getattr(cfg, "pooled_dim", 8), generator=gen)
    img = torch.randn(1, n, cfg.patch_dim_in, generator=gen)
    return (img, *model.rope(GRID), txt, mask, torch.tensor([500.0]), pooled, torch.tensor([6000.0]))


def forward(model, args, times: int = 1):
    with torch.inference_mode():
        for _ in range(times):
            out = model(*args)
    return out


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


class CountingAttention:
    """The model's attention, counting its calls and whether any ran inside a compiler trace."""

    def __init__(self, inner=sdpa_joint_attention):
        self.inner, self.calls, self.traced = inner, 0, 0

    def __call__(self, *args):
        self.calls += 1
        self.traced += torch.compiler.is_compiling()
        return self.inner(*args)


def graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "wan-tiny"])
def test_compiled_blocks_equal_eager_with_inductor(preset):
    """CPU, fp32: the default backend's blocks give the eager output (inductor reorders sums)."""
    model = models.build_model(preset, dtype=torch.float32, seed=1)
    args = dit_inputs(model)
    eager = forward(model, args)
    report = compile_dit(model, models.get_family(preset).blocks(model))
    compiled = forward(model, args, times=2)
    assert rel(compiled, eager) < 1e-5
    entry = report.finish([1.0, 1.0])
    classes = len({type(b) for _, b in models.get_family(preset).blocks(model)})
    assert entry["regions"] == 2 * classes and entry["failed_regions"] == 0 and entry["backend"] == "inductor"


@pytest.mark.parametrize("preset", ["tiny", "wan-tiny"])
def test_attention_runs_eagerly_between_two_compiled_regions(preset):
    """CPU, fp32: the attention is called once per block and forward, with real tensors, never
    inside a trace; dynamo breaks the graph at it (the disabled wrapper), nowhere else."""
    model = models.build_model(preset, dtype=torch.float32, seed=1)
    args = dit_inputs(model)
    attention = CountingAttention()
    model.set_attention(attention)
    eager = forward(model, args)
    per_forward = attention.calls
    assert per_forward == len(models.get_family(preset).blocks(model))
    compile_dit(model, models.get_family(preset).blocks(model), backend="aot_eager")
    assert model.attention is not attention  # the disabled wrapper around it
    out = forward(model, args, times=3)
    assert attention.calls == 4 * per_forward and attention.traced == 0
    assert rel(out, eager) < 1e-6
    breaks = graph_breaks()
    assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks


def test_blocks_of_one_class_share_compiled_code():
    """CPU, fp32: 20 double- and 40 single-stream blocks compile to 4 regions (two per class),
    and a second forward compiles nothing."""
    from torch._dynamo.utils import counters

    from models.hunyuan_video.config import get_preset

    model = models.build_model(get_preset("tiny", depth_double=20, depth_single=40), dtype=torch.float32)
    args = dit_inputs(model)
    report = compile_dit(model, models.get_family("tiny").blocks(model), backend="aot_eager")
    forward(model, args)
    frames = counters["frames"]["total"]
    forward(model, args)
    assert counters["frames"]["total"] == frames
    entry = report.finish([2.0, 1.0, 1.0])
    assert entry["blocks"] == 60 and entry["regions"] == 4 and entry["failed_regions"] == 0
    assert entry["first_step_extra_s"] == 1.0 and entry["cache_dir"] is None  # no inductor, no cache


PLACEMENTS = {
    "streamed": Placement(streamed=3),
    "fp8-storage": Placement(fp8="storage"),
    "fp8-matmul": Placement(fp8="matmul"),
    "chunked": Placement(chunk_tokens=24),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_streamed_fp8_and_chunked_blocks_compile_like_plain_ones(name):
    """CPU, fp32: blocks placed as the memory plan places them (the last 3 streamed through the
    layer streamer's hooks, FP8 linears, token chunks) compile to the same 4 regions as plain ones,
    with no other graph break, and give the eager result; streaming's hooks fire as often."""
    if name == "fp8-matmul" and not scaled_mm_supported("cpu"):
        pytest.skip("torch._scaled_mm does not run on this CPU build")
    family, placement, cpu = models.get_family("tiny"), PLACEMENTS[name], torch.device("cpu")
    runs = []
    for compiled in (False, True):
        model, placed = ph.build_dit(family, "tiny", None, cpu, torch.float32, placement)
        if compiled:
            report = compile_dit(model, family.blocks(model), backend="aot_eager")
        runs.append((forward(model, dit_inputs(model), times=2), placed.streamer and placed.streamer._loads))
        placed.close()
    (eager, eager_loads), (out, loads) = runs
    assert rel(out, eager) < 1e-6 and loads == eager_loads
    entry = report.finish([1.0])
    assert entry["regions"] == 4 and entry["failed_regions"] == 0
    assert all("torch.compiler.disable" in reason for reason in graph_breaks())


def test_hooks_that_rebind_weights_fire_on_a_compiled_block():
    """CPU, fp32: a block's forward hooks (what layer streaming uses) run on every compiled call,
    and the compiled regions read the weights a pre-hook bound, not the ones compiled against."""
    model = models.build_model("wan-tiny", dtype=torch.float32, seed=1)
    args = dit_inputs(model)
    block = model.blocks[1]
    kept = block.ffn[0].weight
    calls = []

    @torch.compiler.disable
    def swap_in(module, inputs):
        calls.append("pre")
        module.ffn[0]._parameters["weight"] = kept * 2

    @torch.compiler.disable
    def swap_out(module, inputs, output):
        calls.append("post")
        module.ffn[0]._parameters["weight"] = kept

    block.register_forward_pre_hook(swap_in)
    block.register_forward_hook(swap_out)
    eager = forward(model, args)
    compile_dit(model, models.get_family("wan-tiny").blocks(model), backend="aot_eager")
    calls.clear()
    out = forward(model, args, times=2)
    assert calls == ["pre", "post"] * 2 and rel(out, eager) < 1e-6
    block._forward_pre_hooks.clear()
    block._forward_hooks.clear()
    assert rel(forward(model, args), eager) > 1e-3  # the swapped weights mattered


def test_a_region_that_fails_to_compile_runs_eagerly(caplog):
    """CPU, fp32: a backend that fails on every other region (the post-attention ones among them)
    leaves those regions eager; the attention still runs once per block, the output is eager's,
    and the report counts the failures."""
    model = models.build_model("tiny", dtype=torch.float32, seed=1)
    args = dit_inputs(model)
    attention = CountingAttention()
    model.set_attention(attention)
    eager = forward(model, args)
    graphs = []

    def flaky(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) % 2 == 0:
            raise RuntimeError("injected compile failure")
        return gm.forward

    report = compile_dit(model, models.get_family("tiny").blocks(model), backend=flaky)
    attention.calls = 0
    with caplog.at_level("WARNING"):
        out = forward(model, args, times=2)
        entry = report.finish([1.0])
    assert attention.calls == 2 * 4 and torch.equal(out, eager)
    assert entry["failed_regions"] >= 2 and entry["backend"] == "flaky"
    assert "failed to compile on this rank and run eagerly" in caplog.text


def test_first_step_extra_is_the_first_step_over_the_median_of_the_rest():
    assert first_step_extra_s([10.0, 1.0, 1.5, 1.0]) == 9.0
    assert first_step_extra_s([3.0]) is None


def test_compile_cache_sets_inductors_folder(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # put back as it was after the test
    use_cache_dir(None)
    assert cache_dir() == str(tmp_path / "before")  # no flag: whatever inductor would use
    use_cache_dir(tmp_path / "cache")
    assert cache_dir() == str(tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# The command line


def _cfg(*argv):
    from launcher.cli import build_parser, run_config_from_args

    return run_config_from_args(build_parser().parse_args(["generate", "--preset", "tiny", "--prompt", "a", *argv]))


def test_compile_flags_reach_the_run_config(tmp_path):
    assert not _cfg().compile and _cfg().compile_cache is None
    cfg = _cfg("--compile", "--compile-cache", str(tmp_path / "new"))
    assert cfg.compile and cfg.compile_cache == tmp_path / "new"


def test_bad_compile_cache_is_refused_before_anything_runs(tmp_path, capsys):
    from launcher.__main__ import main
    from launcher.config import ConfigError

    a_file = tmp_path / "cache"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"--compile-cache .*cache: not a directory"):
        _cfg("--compile", "--compile-cache", str(a_file))
    with pytest.raises(ConfigError, match=r"--compile-cache .*is not a folder this process can write"):
        _cfg("--compile", "--compile-cache", str(a_file / "below"))
    with pytest.raises(ConfigError, match="give --compile too"):
        _cfg("--compile-cache", str(tmp_path))
    rc = main(["generate", "--preset", "tiny", "--prompt", "a", "--compile", "--compile-cache", str(a_file),
               "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "error: --compile-cache" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_bad_compile_cache_ends_every_rank_before_a_collective(tmp_path):
    """2 ranks under torchrun (--device cpu): the ranks refuse the file before any process group
    exists; the job prints rank 0's one line and ends at once (no collective to time out in)."""
    a_file = tmp_path / "cache"
    a_file.write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launcher",
           "generate", "--preset", "tiny", "--prompt", "a", "--device", "cpu", "--timeout", "600", "--compile",
           "--compile-cache", str(a_file), "--output-dir", str(tmp_path / "out")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert errors == [f"error: --compile-cache {a_file}: not a directory (a file is in the way); give a folder"], \
        proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# generate --compile, end to end


def run_generate(out: Path, *args, nproc: int = 1):
    """`generate` on the CPU in fp32 (--device cpu: on a GPU node too), 2 steps, latents only."""
    gen = ["-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a red fox", "--steps", "2", "--seed", "7",
           "--device", "cpu", "--no-video", "--output-dir", str(out), *args]
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*head, *gen], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    latents = load_file(str(next(out.glob("*.latents.safetensors"))))["latents"]
    return latents, json.loads(next(out.glob("*.json")).read_text())


@needs_cxx
@pytest.mark.slow
def test_generate_compile_equals_eager_and_reuses_its_cache(tmp_path):
    """CPU, fp32, one process, inductor: the latents equal the eager run's; the record says what
    compiled and where its cache is; a second run loads every region from that cache."""
    eager, rec = run_generate(tmp_path / "eager")
    assert rec["compile"] is None
    cache = tmp_path / "inductor-cache"
    latents, rec = run_generate(tmp_path / "compiled", "--compile", "--compile-cache", str(cache))
    assert rel(latents, eager) < 1e-5
    entry = rec["compile"]
    assert entry["blocks"] == 4 and entry["regions"] == 4 and entry["failed_regions"] == 0
    assert entry["cache_dir"] == str(cache) and entry["fx_graph_cache"]["misses"] == 4 and entry["compile_s"] > 0
    assert entry["first_step_extra_s"] is not None
    again, rec = run_generate(tmp_path / "again", "--compile", "--compile-cache", str(cache))
    assert rec["compile"]["fx_graph_cache"] == {"hits": 4, "misses": 0} and rel(again, latents) < 1e-6


@needs_cxx
@pytest.mark.slow
@pytest.mark.multiprocess
def test_generate_compile_on_two_gloo_ranks_equals_one_eager_process(tmp_path):
    """CPU, fp32, 2 ranks over gloo (ulysses 2, the parallel attention eager between the compiled
    regions): the latents equal one eager process's."""
    eager, _ = run_generate(tmp_path / "eager")
    latents, rec = run_generate(tmp_path / "par", "--compile", "--compile-cache", str(tmp_path / "cache"), nproc=2)
    assert rec["topology"]["ulysses"] == 2 and rec["attention"]["backend"] == "native"
    assert rel(latents, eager) < 1e-5
    assert rec["compile"]["regions"] == 4 and rec["compile"]["failed_regions"] == 0


@needs_cxx
@pytest.mark.slow
def test_gpu_compile_bench_runs_its_smoke_check(tmp_path):
    """scripts/gpu_compile_bench.py --smoke (CPU, fp32, the tiny blocks at 72 tokens): its JSON
    holds a row per block with the compiled output equal to the eager one, and the table."""
    proc = subprocess.run([sys.executable, "scripts/gpu_compile_bench.py", "--smoke", "--out", str(tmp_path),
                           "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # a hang guard: a cold CPU compile took 40 s here, 93 s on a GPU node
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "compile_bench.json").read_text())
    assert [(r["tokens"], r["block"]) for r in result["rows"]] == [(72, "double"), (72, "single")]
    assert all(r["rel_err"] < 1e-5 for r in result["rows"]) and result["compile"]["failed_regions"] == 0
    assert proc.stdout.strip().endswith(result["table"].splitlines()[-1])
