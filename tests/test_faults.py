"""Bad input and faults under torchrun: every rank refuses bad input before any collective and the
job prints one clear message (rank 0's); a killed rank ends the job; NaN latents stop the run
naming the step. CPU, fp32, gloo (`--device cpu`), except the `gpu` test of ranks and GPUs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import write_release_ckpts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess


def torchrun(out: Path, *args, nproc: int = 2, prompt=("--prompt", "a red fox")):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "launcher", "generate", "--preset", "tiny", *prompt, "--steps", "2", "--device", "cpu",
            "--output-dir", str(out), *args]


def _bad_prompts_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n# only a comment\n")
    return ["--prompts-file", str(f)]


def _bad_checkpoint(tmp_path):
    ckpts = tmp_path / "ckpts"
    sd = write_release_ckpts(ckpts).state_dict()
    sd["final_layer.linear.weight"] = torch.zeros(3, 3)
    torch.save({"module": sd}, ckpts / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt")
    return ["--model-dir", str(ckpts)]


BAD_INPUT = {
    "size": (lambda p: ["--size", "50x64"], "height 50 is not a positive multiple of 16; nearest valid height: 48 or 64"),
    "frames": (lambda p: ["--frames", "10"], "--frames 10: the VAE needs 4n+1 frames; nearest valid: 9 or 13"),
    "topology": (lambda p: ["--ulysses", "3"], "ulysses 3 does not divide the 2 sequence-parallel GPUs"),
    "world size": (lambda p: ["--dp", "4"], "world size is not divisible by cfg 1 x dp 4"),
    "prompts file": (_bad_prompts_file, "holds no prompts"),
    "checkpoint": (_bad_checkpoint, "1 mis-shaped (final_layer.linear.weight (3, 3) != (64, 128))"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_every_rank_with_one_message(tmp_path, case):
    make_args, message = BAD_INPUT[case]
    args = make_args(tmp_path)
    cmd = torchrun(tmp_path / "out", *args, prompt=() if "--prompts-file" in args else ("--prompt", "a red fox"))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr  # rank 0's, once
    assert message in errors[0]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(pid)
    return out


def test_killed_rank_ends_the_job_and_leaves_no_video(tmp_path):
    out = tmp_path / "out"
    # Enough steps that the job is surely mid-denoise when rank 1 dies.
    cmd = torchrun(out, "--steps", "400", "--size", "128x128", "--frames", "17")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # wait until the ranks are in the loop
            if "topology" in line or time.monotonic() > deadline:
                break
        time.sleep(3)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        workers = _worker_pids(proc.pid)
        assert 1 in workers, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=90)
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    assert ended < 60, f"the job took {ended:.0f} s to end after a rank died"
    assert not out.exists() or not list(out.glob("*.mp4"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_nan_latents_stop_the_run_naming_the_step(tmp_path, nproc):
    ckpts = tmp_path / "ckpts"
    sd = write_release_ckpts(ckpts).state_dict()
    sd["final_layer.linear.bias"] = torch.full_like(sd["final_layer.linear.bias"], float("nan"))
    torch.save({"module": sd}, ckpts / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    args = ["--model-dir", str(ckpts)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a red fox",
               "--steps", "2", "--output-dir", str(out), *args]
    else:
        cmd = torchrun(out, *args, nproc=nproc)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 if nproc == 1 else proc.returncode != 0
    assert proc.stderr.count("error: NaN or Inf in the latents after denoising step 1 of 2") == nproc, proc.stderr
    assert not out.exists() or not list(out.glob("*.mp4"))


@pytest.mark.gpu
def test_more_ranks_than_gpus_is_refused_with_a_message(tmp_path):
    """torchrun starting more processes than the node has GPUs: a message and exit 2 from the
    launcher, never a CUDA error (`--device auto` picks the GPUs here)."""
    gpus = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus + 1}", "--standalone",
           "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a red fox", "--steps", "1",
           "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    want = f"error: {gpus + 1} processes on this node but {gpus} GPU(s) visible: start at most {gpus} per node"
    assert want in proc.stderr and "--device cpu" in proc.stderr, proc.stderr
    assert "CUDA error" not in proc.stderr and "invalid device ordinal" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_ends_quietly(tmp_path):
    """SIGINT (what Ctrl-C sends) to a one-process run mid-denoise: one line, exit 130, no traceback."""
    cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a red fox", "--device", "cpu",
           "--steps", "400", "--size", "128x128", "--frames", "17", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # wait until the loop runs
        lines.append(line)
        if "attention:" in line:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_killed_batch_keeps_the_videos_it_finished(tmp_path):
    """A prompts file stopped hard (SIGKILL, as a Slurm time limit does) after its first video:
    that video and its record are whole on disk; nothing half-written is left."""
    from launcher.video import probe_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\na green frog\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompts-file", str(prompts),
           "--device", "cpu", "--steps", "300", "--seed", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if "wrote " in line:
                break
        proc.kill()
    finally:
        proc.wait(timeout=60)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["a-red-fox_seed1.json", "a-red-fox_seed1.mp4"], files
    assert probe_video(out / "a-red-fox_seed1.mp4")["frames"] == 9
    assert json.loads((out / "a-red-fox_seed1.json").read_text())["prompt"] == "a red fox"
