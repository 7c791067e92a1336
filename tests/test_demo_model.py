"""The trained demo model (`hunyuan-video-demo`, weights in models/demo/hunyuan-video-demo/).

CPU, fp32, gloo on any machine (`--device cpu`): the shipped files load through --model-dir like
any checkpoint; generated videos show what their prompts say (held-out combinations included)
and random weights fail the same check; 2 ranks (Ulysses 2) equal 1 rank; the training script
writes a folder the launcher loads, and resumes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.demo import WEIGHTS_DIR, grammar

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--preset", "hunyuan-video-demo", "--device", "cpu"]


def launcher(*args, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.run([*run, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def demo_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/demo_check.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# --- the grammar and its read-back ------------------------------------------------------------


@pytest.mark.slow
def test_read_back_recovers_every_caption_from_rendered_videos(tmp_path):
    """Ground truth through a real mp4: the check reads what the renderer drew."""
    from launcher.video import read_video_frames, write_video

    caps = grammar.all_captions()
    videos = grammar.render(caps, seed=5)
    wrong = []
    for i, (cap, video) in enumerate(zip(caps, videos)):
        path = write_video(video, tmp_path / f"{i}.mp4", fps=8)
        got = grammar.read_back(read_video_frames(path))
        if (got.colour, got.motion) != (cap.colour, cap.motion):
            wrong.append((cap.text, got))
    assert not wrong


def test_held_out_combinations_are_never_trained_and_always_checked():
    train = {(c.colour, c.shape, c.motion) for c in grammar.training_captions()}
    assert train.isdisjoint(grammar.HELD_OUT) and len(train) + len(grammar.HELD_OUT) == len(grammar.all_captions())
    # Every word of a held-out caption is still trained in other combinations.
    for colour, shape, motion in grammar.HELD_OUT:
        assert any(c == colour for c, _, _ in train) and any(s == shape for _, s, _ in train)
        assert any(m == motion for _, _, m in train)
    prompts = grammar.check_prompts(20)
    assert len(prompts) == 20 == len(set(prompts))
    assert {(c.colour, c.shape, c.motion) for c in prompts} >= set(grammar.HELD_OUT)
    assert grammar.parse("A red circle moves left") == grammar.Caption("red", "circle", "moves left")
    with pytest.raises(ValueError, match="not a demo"):
        grammar.parse("a cat walks on the grass")


# --- the shipped weights ------------------------------------------------------------------------


def test_shipped_weights_are_small_and_load_strictly_through_the_release_layout():
    from models import build_model, load_weights
    from models.hunyuan_video.vae import VAE_PRESETS, load_vae

    files = sorted(p for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    names = {p.relative_to(WEIGHTS_DIR).as_posix() for p in files}
    assert {"transformers/mp_rank_00_model_states.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "vae/config.json"} <= names
    assert sum(p.stat().st_size for p in files) <= 30e6
    model = load_weights(build_model("hunyuan-video-demo", dtype=torch.float32), WEIGHTS_DIR)  # strict
    assert all(torch.isfinite(p).all() for p in model.parameters())
    vae = load_vae(WEIGHTS_DIR)
    assert vae.config.block_out_channels == VAE_PRESETS["demo"].block_out_channels
    assert vae.config.scaling_factor != VAE_PRESETS["demo"].scaling_factor  # measured on its latents


@pytest.fixture(scope="module")
def check_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "check.txt"
    assert demo_check("--write-prompts", path).returncode == 0
    assert len(path.read_text().splitlines()) == 20
    return path


def _generate(out: Path, prompts: Path, *extra) -> None:
    proc = launcher("generate", *CPU, "--prompts-file", str(prompts), "--seed", "0", "--output-dir", str(out),
                    *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]


# The target: the prompt's colour in >= 90% of the check videos and its motion in >= 80% (the
# shipped weights reach 100% / 100% at these seeds through generate and the mp4: docs/DEMO_MODEL.md).
COLOUR_MIN, MOTION_MIN = 0.9, 0.8


@pytest.mark.slow
def test_trained_videos_show_their_prompts(tmp_path, check_prompts):
    trained = tmp_path / "trained"
    _generate(trained, check_prompts)  # the preset's shipped weights: no --model-dir needed
    record = json.loads(next(trained.glob("*.json")).read_text())
    assert record["model"]["model_dir"] == str(WEIGHTS_DIR) and not record["model"]["random_weights"]
    # The preset's sampling: classic CFG 5 against the empty prompt it was trained to drop to.
    assert record["cfg_scale"] == 5.0 and record["negative_prompt"] == ""
    bars = ["--min-colour", COLOUR_MIN, "--min-motion", MOTION_MIN]
    ok = demo_check(trained, *bars, "--json", tmp_path / "trained.json")
    acc = json.loads((tmp_path / "trained.json").read_text())["accuracy"]
    assert ok.returncode == 0, ok.stdout
    assert acc["videos"] == 20 and acc["colour"] >= COLOUR_MIN and acc["motion"] >= MOTION_MIN, ok.stdout


@pytest.mark.slow
def test_random_weights_fail_the_same_check(tmp_path, check_prompts):
    bars = ["--min-colour", COLOUR_MIN, "--min-motion", MOTION_MIN]
    random_ = tmp_path / "random"
    _generate(random_, check_prompts, "--random-weights")
    bad = demo_check(random_, *bars, "--json", tmp_path / "random.json")
    acc = json.loads((tmp_path / "random.json").read_text())["accuracy"]
    assert bad.returncode == 1 and (acc["colour"] < COLOUR_MIN or acc["motion"] < MOTION_MIN), bad.stdout


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank(tmp_path):
    from test_distributed_generate import assert_same_videos

    args = [*CPU, "--prompt", "a yellow triangle grows", "--seed", "3", "--save-latents", "--save-grid"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, 1), (two, 2)):
        proc = launcher("generate", *args, "--output-dir", str(out), *(["--ulysses", "2"] if nproc == 2 else []),
                        nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(next(two.glob("*.json")).read_text())["topology"]["ulysses"] == 2
    assert_same_videos(one, two)  # latents 1e-5, every grid frame within +-1
    quality = launcher("quality", str(two), "--reference", str(one), "--json")
    summary = json.loads(quality.stdout)["summary"]
    assert quality.returncode == 0 and summary["videos"] == 1 and (summary["psnr_db_min"] or 1e9) > 40


# --- training -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_script_writes_a_loadable_folder_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    base = [sys.executable, "scripts/train_demo.py", "--out", str(out), "--work", str(work), "--device", "cpu",
            "--vae-steps", "1", "--vae-batch", "1", "--dataset", "4", "--dit-batch", "2", "--check-count", "1",
            "--check-steps", "1"]
    for steps in ("2", "3"):
        proc = subprocess.run([*base, "--dit-steps", steps], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"phase": "dit", "resumed_at": 2} in log
    vae = [i for i, r in enumerate(log) if r["phase"] == "vae"]
    latents = [i for i, r in enumerate(log) if r["phase"] == "latents"]
    assert vae and len(latents) == 2 and max(vae) < latents[0]  # the rerun took the trained VAE
    gen = launcher("generate", *CPU, "--model-dir", str(out), "--prompt", "a red circle moves left", "--steps", "1",
                   "--seed", "0", "--output-dir", str(tmp_path / "gen"), "--no-video")
    assert gen.returncode == 0, gen.stderr[-3000:]
