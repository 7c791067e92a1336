"""The demo model's world and training (`hunyuan-video-demo`, docs/DEMO_MODEL.md).

CPU, fp32 on any machine (`--device cpu`): the read-back recovers every caption from rendered
videos through a real mp4; held-out combinations are never trained and always checked; the
training script writes a folder in the release's layout that `--model-dir` loads, and resumes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.demo import grammar

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--preset", "hunyuan-video-demo", "--device", "cpu"]


def launcher(*args, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.run([*run, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- the grammar and its read-back ------------------------------------------------------------


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


# --- training -----------------------------------------------------------------------------------


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
