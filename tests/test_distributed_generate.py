"""`torchrun ... -m launcher generate` on 2 and 4 CPU processes (gloo) equals the single-process run.

Each case launches the real command line twice (torchrun and plain python) with the same seed and
compares the latents written by --save-latents and the decoded frames of the mp4s.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess
# CPU, fp32, gloo on any machine (on a GPU node the default would be bf16 on the GPUs).
BASE = ["--preset", "tiny", "--steps", "2", "--save-latents", "--save-grid", "--device", "cpu"]


def run_launcher(out: Path, *args, nproc: int = 1, timeout: float = 240, seed: str | None = "7"):
    seed_args = ["--seed", seed] if seed is not None else []
    launcher = ["-m", "launcher", "generate", "--output-dir", str(out), *BASE, *seed_args, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *launcher]
    else:
        cmd = [sys.executable, *launcher]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _outputs(out: Path) -> dict[str, Path]:
    return {p.name.removesuffix(".latents.safetensors"): p for p in out.glob("*.latents.safetensors")}


def assert_same_videos(single: Path, parallel: Path, rtol: float = 1e-5) -> None:
    from launcher.video import read_video_frames

    a, b = _outputs(single), _outputs(parallel)
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for stem in a:
        la, lb = load_file(str(a[stem]))["latents"], load_file(str(b[stem]))["latents"]
        assert la.shape == lb.shape
        rel = ((la - lb).norm() / la.norm()).item()
        assert rel < rtol, f"{stem}: latents differ, relative error {rel:.2e}"
        # The decoded frames, losslessly (the PNG grid): fp32 rounding may move a pixel one level.
        ga, gb = (torch.from_numpy(np.array(Image.open(d / f"{stem}.png"))).int() for d in (single, parallel))
        assert ga.shape == gb.shape and (ga - gb).abs().max() <= 1, f"{stem}: decoded frames differ"
        # The mp4s: H.264 is lossy, and a pixel one level apart can change the encoder's choices
        # around it (seen on a 16-core machine), so these are compared on average.
        fa = torch.from_numpy(read_video_frames(single / f"{stem}.mp4")).int()
        fb = torch.from_numpy(read_video_frames(parallel / f"{stem}.mp4")).int()
        assert fa.shape == fb.shape and (fa - fb).abs().float().mean() <= 1, f"{stem}: videos differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of every case, computed once."""
    cache = {}

    def get(*args):
        if args not in cache:
            out = tmp_path_factory.mktemp("single")
            proc = run_launcher(out, *args)
            assert proc.returncode == 0, proc.stderr
            cache[args] = out
        return cache[args]

    return get


ODD_9 = ("--size", "48x48", "--frames", "1")  # 1x3x3 = 9 tokens: divisible by neither 2 nor 4
UNEVEN_30 = ("--size", "48x80", "--frames", "5")  # 2x3x5 = 30 tokens: not divisible by 4
CASES = [
    # (processes, video flags, topology flags, expected topology label)
    (2, ODD_9, (), "2x1"),
    (2, ODD_9, ("--ulysses", "1", "--ring", "2"), "1x2"),
    (4, UNEVEN_30, (), "4x1"),
    (4, UNEVEN_30, ("--ulysses", "2", "--ring", "2"), "2x2"),
    (4, UNEVEN_30, ("--ulysses", "1", "--ring", "4"), "1x4"),
]


@pytest.mark.parametrize("nproc, video, topo, label", CASES, ids=[f"{c[3]}-{c[0]}p" for c in CASES])
def test_parallel_equals_single_process(tmp_path, reference, nproc, video, topo, label):
    proc = run_launcher(tmp_path, "--prompt", "a red fox", *video, *topo, nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    assert f"topology {label}" in proc.stderr
    assert_same_videos(reference("--prompt", "a red fox", *video), tmp_path)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    u, r = (int(x) for x in label.split("x"))
    assert record["topology"] == {"world_size": nproc, "dp": 1, "cfg": 1, "ring": r, "ulysses": u, "source": record["topology"]["source"]}
    assert len(record["peak_memory_per_rank"]) == nproc


def test_data_parallel_spreads_prompts(tmp_path, reference):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\na green frog\n")
    flags = ("--prompts-file", str(prompts), "--size", "48x48", "--frames", "1")
    out = tmp_path / "out"
    proc = run_launcher(out, *flags, "--dp", "2", nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert len(_outputs(out)) == 3
    assert_same_videos(reference(*flags), out)


def test_cfg_parallel_equals_sequential_cfg(tmp_path, reference):
    flags = ("--prompt", "a red fox", "--negative-prompt", "blurry", "--cfg-scale", "3.5",
             "--size", "48x80", "--frames", "5")
    proc = run_launcher(tmp_path, *flags, nproc=4)
    assert proc.returncode == 0, proc.stderr
    assert "dp 1, cfg 2, ring 1, ulysses 2" in proc.stderr
    single = reference(*flags)
    assert_same_videos(single, tmp_path)
    # CFG really ran: without the negative pass the result differs.
    no_cfg = reference("--prompt", "a red fox", "--size", "48x80", "--frames", "5")
    la = load_file(str(next(iter(_outputs(single).values()))))["latents"]
    lb = load_file(str(next(iter(_outputs(no_cfg).values()))))["latents"]
    assert not torch.allclose(la, lb, atol=1e-3)


def test_without_a_seed_rank_0_draws_one_for_every_rank(tmp_path):
    video = ("--prompt", "a red fox", *ODD_9)
    proc = run_launcher(tmp_path / "par", *video, nproc=2, seed=None)
    assert proc.returncode == 0, proc.stderr
    seed = json.loads(next((tmp_path / "par").glob("*.json")).read_text())["seed"]
    assert f"seed {seed} (drawn by rank 0" in proc.stderr
    # Both ranks drew the same noise: the result equals a single process given that seed.
    single = run_launcher(tmp_path / "single", *video, seed=str(seed))
    assert single.returncode == 0, single.stderr
    assert_same_videos(tmp_path / "single", tmp_path / "par")


def test_token_chunks_on_two_ranks_equal_one_rank_whole(tmp_path, reference):
    """The blocks' token-wise parts in chunks (96 image tokens per rank, chunks of 40 and 56) on 2
    ranks give what 1 rank computes whole; on 1 rank, chunked latents are bit for bit the same."""
    video = ("--prompt", "a red fox", "--size", "128x128", "--frames", "9")  # 3x8x8 = 192 tokens
    proc = run_launcher(tmp_path / "par", *video, "--chunk-tokens", "40", nproc=2)
    assert proc.returncode == 0, proc.stderr
    whole = reference(*video)
    assert_same_videos(whole, tmp_path / "par")
    memory = json.loads(next((tmp_path / "par").glob("*.json")).read_text())["memory"]
    assert memory["chunk_tokens"] == 40 and "token chunks of 40" in memory["used"]["label"]
    single = run_launcher(tmp_path / "one", *video, "--chunk-tokens", "40")
    assert single.returncode == 0, single.stderr
    same = [load_file(str(p))["latents"] for p in (*_outputs(whole).values(), *_outputs(tmp_path / "one").values())]
    assert torch.equal(*same)


TILED = ("--size", "144x144", "--frames", "5", "--vae-tiling", "small")  # 18x18 latents: 4 tiles of 16


@pytest.mark.parametrize("nproc, topo", [(2, ()), (4, ("--ulysses", "2", "--ring", "2"))], ids=["2p", "4p"])
def test_shared_tiled_decode_equals_single_process(tmp_path, reference, nproc, topo):
    """Every rank of the replica decodes a run of the tiles; the frames equal one process's."""
    flags = ("--prompt", "a red fox", *TILED)
    proc = run_launcher(tmp_path, *flags, *topo, nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    assert_same_videos(reference(*flags), tmp_path)
    decode = json.loads(next(tmp_path.glob("*.json")).read_text())["vae_decode"]
    assert decode["path"] == "shared-tiles" and decode["tiling"] == "small"
    assert len(decode["tiles_per_rank"]) == nproc and sum(decode["tiles_per_rank"]) == 4
    assert decode["tiles_per_rank"][1] > 0 and len(decode["seconds_per_rank"]) == nproc
    single = json.loads(next(reference(*flags).glob("*.json")).read_text())["vae_decode"]
    assert single["path"] == "first-rank" and single["why"] == "a replica of one rank"
