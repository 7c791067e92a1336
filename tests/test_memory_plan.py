"""The memory planner's choices (launcher/memory_plan.py) and its command-line faces."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launcher.config import ConfigError
from launcher.memory_plan import GIB, RUNTIME_OVERHEAD, JobShape, Placement, choose, dit_sizes, estimate, parse_memory, plan_job
from models.hunyuan_video import get_preset

ROOT = Path(__file__).resolve().parents[1]
DIT = get_preset("hunyuan-video-13b")


def shape(h=720, w=1280, f=129, gpus=4, u=4, r=1, cfg=1, llm=False):
    return JobShape(preset="hunyuan-video-13b", dit=DIT, height=h, width=w, frames=f, dtype="bf16", world=gpus, dp=1,
                    cfg_degree=cfg, ulysses=u, ring=r, text_llm=llm)


def test_block_sizes_add_up_to_the_release_parameter_count():
    sizes = dit_sizes("hunyuan-video-13b", "bf16")
    assert len(sizes.blocks) == 60
    assert sizes.other + sum(sizes.blocks) == 12_821_012_544 * 2
    # FP8: one byte per linear weight plus a float32 scale per output row: a bit over half.
    assert 0.5 < sum(sizes.blocks_fp8) / sum(sizes.blocks) < 0.52


def test_24gib_at_720p_on_4_gpus_streams_part_of_the_blocks_in_bf16():
    plan, fallback = choose(shape(), 24 * GIB)
    p = plan.placement
    assert p.fp8 == "off" and 0 < p.streamed < 60 and p.vae_tiling == "release"
    assert plan.peak <= 24 * GIB
    # The cheapest that fits: one block fewer streamed does not fit.
    assert estimate(shape(), Placement(streamed=p.streamed - 1)).peak > 24 * GIB
    assert fallback is not None and fallback.placement.streamed > p.streamed
    assert fallback.peak <= plan.peak - GIB


def test_plain_when_the_gpu_is_large():
    plan, _ = choose(shape(), 139 * GIB)
    assert plan.placement == Placement()
    # Measured on 4 x H200 (docs/BENCHMARKS.md): 27.7 GiB allocated at this shape; plus the runtime.
    assert abs(plan.denoise - RUNTIME_OVERHEAD - 27.7 * GIB) < 0.3 * GIB


def test_12gib_at_544p_streams_most_blocks_small_tiles_and_the_llm():
    plan, _ = choose(shape(544, 960, llm=True), 12 * GIB)
    p = plan.placement
    assert p.streamed > 40 and p.fp8 == "off" and p.vae_tiling == "small" and p.stream_text
    assert plan.peak <= 12 * GIB


def test_fp8_only_when_allowed_and_needed():
    # With every block streamed, FP8 still needs less (half the slots): a budget between the two.
    lowest = {m: estimate(shape(), Placement(streamed=60, fp8=m, vae_tiling="small")).peak for m in ("off", "storage")}
    assert lowest["storage"] < lowest["off"]
    budget = (lowest["storage"] + lowest["off"]) // 2
    with pytest.raises(ConfigError, match="nothing fits.*needs"):
        choose(shape(), budget, fp8="off")
    plan, _ = choose(shape(), budget, fp8="auto")
    assert plan.placement.fp8 == "storage" and plan.placement.vae_tiling == "small" and plan.peak <= budget
    plan, _ = choose(shape(), 24 * GIB, fp8="auto")
    assert plan.placement.fp8 == "off"  # exact placements come first


def test_nothing_fits_names_the_estimate():
    with pytest.raises(ConfigError) as err:
        choose(shape(gpus=1, u=1), 8 * GIB)
    assert "8.0GiB" in str(err.value) and "GiB per GPU" in str(err.value) and "activations" in str(err.value)


def test_cfg_in_parallel_falls_back_to_sequential_when_it_does_not_fit():
    def shape_for(degree):
        return shape(gpus=4, u=2 if degree == 2 else 4, cfg=degree), f"topology cfg {degree}"

    knobs = SimpleNamespace(max_gpu_memory=13 * GIB, memory_profile=None, fp8="off", stream_blocks=None, prefetch=1,
                            vae_tiling="auto")
    job = plan_job(knobs, shape_for, [2, 1], None)
    assert job.plan.placement.cfg_degree == 1 and job.topology == "topology cfg 1"
    roomy = plan_job(SimpleNamespace(**{**vars(knobs), "max_gpu_memory": 40 * GIB}), shape_for, [2, 1], None)
    assert roomy.plan.placement.cfg_degree == 2


def test_profiles_and_explicit_knobs():
    def shape_for(degree):
        return shape(), "t"

    base = dict(max_gpu_memory=None, fp8="off", stream_blocks=None, prefetch=1, vae_tiling="auto")
    extreme = plan_job(SimpleNamespace(**base, memory_profile="extreme"), shape_for, [1], None).plan.placement
    assert extreme.streamed == 60 and extreme.fp8 == "storage" and extreme.vae_tiling == "small"
    explicit = plan_job(SimpleNamespace(**{**base, "stream_blocks": 10, "fp8": "matmul"}, memory_profile=None),
                        shape_for, [1], None).plan.placement
    assert explicit.streamed == 10 and explicit.fp8 == "matmul"
    with pytest.raises(ConfigError, match="requested placement"):
        plan_job(SimpleNamespace(**{**base, "max_gpu_memory": 10 * GIB}, memory_profile="default"), shape_for, [1], None)


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GIB), ("24g", 24 * GIB), ("22.5 GiB", int(22.5 * GIB)),
                                           ("12000MiB", 12000 * 2**20), ("80GB", 80 * 10**9), ("16", 16 * GIB)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "24TB"])
def test_parse_memory_rejects(text):
    with pytest.raises(ConfigError, match="--max-gpu-memory"):
        parse_memory(text)


@pytest.mark.slow
def test_plan_command_reports_the_placement():
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--gpus", "4", "--max-gpu-memory", "24GiB", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mp = json.loads(proc.stdout)["memory_plan"]
    assert mp["chosen"]["peak_bytes"] <= 24 * GIB and 0 < mp["chosen"]["streamed_blocks"] < 60
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--gpus", "1", "--max-gpu-memory", "8GiB"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing fits" in proc.stderr


@pytest.mark.slow
def test_generate_rejects_bad_memory_flags(tmp_path):
    base = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "x", "--output-dir", str(tmp_path)]
    for extra, msg in ((["--fp8", "fast"], "--fp8"), (["--fp8", "auto"], "budget"),
                       (["--stream-blocks", "9"], "has 4 blocks"), (["--memory-profile", "tiny"], "--memory-profile"),
                       (["--max-gpu-memory", "many"], "--max-gpu-memory")):
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, (extra, proc.stderr)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("budget, user_conf, expected", [
    (24 * GIB, None, "expandable_segments:True"),  # a budget: expandable segments
    (24 * GIB, "max_split_size_mb:128", "max_split_size_mb:128"),  # the user's configuration wins
    (None, None, None),  # no budget: the allocator is left alone
])
def test_a_budget_maps_the_allocator_in_expandable_segments(monkeypatch, budget, user_conf, expected):
    from launcher.job import _expandable_segments_under_budget

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    if user_conf is not None:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_conf)
    if torch.cuda.is_initialized():  # a GPU node, after the gpu tests: too late to configure, left alone
        expected = user_conf
    _expandable_segments_under_budget(SimpleNamespace(max_gpu_memory=budget))
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected
