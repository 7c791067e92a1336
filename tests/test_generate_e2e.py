"""`python -m launcher generate` end to end on one process with the tiny preset."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import write_release_ckpts

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "prompt", "seed", "model", "size", "frames", "steps", "guidance", "flow_shift", "topology",
    "timings_s", "peak_memory", "versions", "outputs", "command", "finished",
}


def _generate(tmp_path, *extra):
    cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "A cat walks on the grass",
           "--size", "64x96", "--frames", "9", "--steps", "2", "--seed", "5", "--device", "cpu",
           "--output-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_writes_video_record_latents_and_grid(tmp_path):
    from launcher.video import probe_video

    proc = _generate(tmp_path, "--save-latents", "--save-grid")
    assert proc.returncode == 0, proc.stderr
    video = Path(proc.stdout.strip().splitlines()[-1])
    assert video.parent == tmp_path and video.name == "a-cat-walks-on-the-grass_seed5.mp4"
    info = probe_video(video)
    assert (info["frames"], info["height"], info["width"]) == (9, 64, 96)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"

    record = json.loads(video.with_suffix(".json").read_text())
    assert RECORD_KEYS <= record.keys()
    assert record["size"] == [64, 96] and record["frames"] == 9 and record["steps"] == 2 and record["seed"] == 5
    assert {"text_encode", "load_dit", "denoise", "vae_decode", "write"} <= record["timings_s"].keys()
    assert record["peak_memory"]["host_rss_gib"] > 0 and "torch" in record["versions"]

    latents = load_file(str(tmp_path / "a-cat-walks-on-the-grass_seed5.latents.safetensors"))["latents"]
    assert latents.shape == (1, 16, 3, 8, 12) and torch.isfinite(latents).all()
    assert (tmp_path / "a-cat-walks-on-the-grass_seed5.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"

    # Same seed again: refused without --overwrite, nothing replaced.
    before = video.stat().st_mtime_ns
    proc = _generate(tmp_path)
    assert proc.returncode == 2 and "output exists" in proc.stderr and "--overwrite" in proc.stderr
    assert video.stat().st_mtime_ns == before


@pytest.mark.slow
def test_generate_from_a_release_layout_model_dir(tmp_path):
    from launcher.video import probe_video

    ckpts = tmp_path / "ckpts"
    write_release_ckpts(ckpts)
    out = tmp_path / "out"
    proc = _generate(out, "--model-dir", str(ckpts), "--save-latents")
    assert proc.returncode == 0, proc.stderr
    video = Path(proc.stdout.strip().splitlines()[-1])
    assert probe_video(video)["frames"] == 9
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["model"]["model_dir"] == str(ckpts)
    read = {Path(f["path"]).relative_to(ckpts).as_posix() for f in record["model"]["files"]}
    assert any(p.startswith("hunyuan-video-t2v-720p/transformers/") for p in read), read
    assert any(p.startswith("hunyuan-video-t2v-720p/vae/") for p in read), read
    assert any(p.startswith("text_encoder/") for p in read) and any(p.startswith("text_encoder_2/") for p in read), read
    assert all(f["bytes"] > 0 for f in record["model"]["files"])
    # Loaded weights, not the seeded random ones: the latents differ from a run without --model-dir.
    random_run = _generate(tmp_path / "random", "--save-latents")
    assert random_run.returncode == 0, random_run.stderr
    name = "a-cat-walks-on-the-grass_seed5.latents.safetensors"
    a, b = load_file(str(out / name))["latents"], load_file(str(tmp_path / "random" / name))["latents"]
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_bad_checkpoint_in_model_dir_exits_2_with_the_file_named(tmp_path):
    ckpts = tmp_path / "ckpts"
    dit = write_release_ckpts(ckpts)
    sd = dit.state_dict()
    del sd["final_layer.linear.bias"]
    path = ckpts / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    torch.save({"module": sd}, path)
    proc = _generate(tmp_path / "out", "--model-dir", str(ckpts))
    assert proc.returncode == 2
    assert f"error: {path}: does not match the tiny DiT: 1 missing (final_layer.linear.bias)" in proc.stderr
    assert not list((tmp_path / "out").glob("*.mp4"))


@pytest.mark.slow
def test_the_record_says_where_and_from_what_it_ran(tmp_path):
    proc = _generate(tmp_path, "--no-video")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    run = rec["run"]
    assert run["hosts"] == [socket.gethostname()] and run["argv"][1:3] == ["generate", "--preset"]
    assert run["git"] is None or len(run["git"]["commit"]) == 40
    assert rec["wall_s"] > 0 and rec["started"] <= rec["finished"]
    assert rec["peak_memory_per_rank"][0]["host"] == socket.gethostname()
    assert "wrote" in proc.stderr and "steps in" in proc.stderr and "GiB host memory per rank" in proc.stderr


@pytest.mark.slow
def test_skip_existing_resumes_a_killed_batch(tmp_path):
    """A resubmitted job over a prompts file: prompts with a record (written last) are skipped and
    left untouched; a video without its record (the job was killed in between) is made again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["generate", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--seed", "3",
            "--prompts-file", str(prompts), "--output-dir", str(tmp_path / "out")]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "launcher", *args, *extra], cwd=ROOT,  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    assert run().returncode == 0
    out = tmp_path / "out"
    first, second = out / "a-cat_seed3", out / "a-dog_seed4"
    kept = first.with_suffix(".mp4").read_bytes(), first.with_suffix(".json").stat().st_mtime_ns
    second.with_suffix(".json").unlink()  # killed before the second record was written
    second.with_suffix(".mp4").write_bytes(b"partial")
    refused = run()
    assert refused.returncode == 2 and "output exists" in refused.stderr  # never silently replaced
    again = run("--skip-existing")
    assert again.returncode == 0, again.stderr
    assert "1 of 2 prompts already have their record" in again.stderr
    assert (first.with_suffix(".mp4").read_bytes(), first.with_suffix(".json").stat().st_mtime_ns) == kept
    assert second.with_suffix(".json").is_file() and second.with_suffix(".mp4").read_bytes() != b"partial"
    bad = run("--skip-existing", "--overwrite")
    assert bad.returncode == 2 and "--skip-existing" in bad.stderr
