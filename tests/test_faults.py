"""Bad input and faults under torchrun: every rank refuses bad input before any collective and the
job prints one clear message (rank 0's); a killed rank ends the job; NaN latents stop the run
naming the step. CPU, fp32, gloo (`--device cpu`), except the `gpu` test of ranks and GPUs."""

import json
import os
import re
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


def one_process(out: Path, *args):
    """The same run as `torchrun` without torchrun."""
    return [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a red fox", "--device", "cpu",
            "--output-dir", str(out), *args]


def wait_for_a_step(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Read the job's merged output until its progress bar has counted a finished step, so that
    what the test does next lands mid-denoise on a fast machine or a slow one; returns what it read."""
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(r"\| ?[1-9][0-9]*/[0-9]+ \[", seen) and time.monotonic() < deadline:
        char = proc.stdout.read(1)
        if not char:  # the job ended
            break
        seen += char
    return seen


def signal_mid_denoise(cmd: list[str], sig: int) -> tuple[int, str, float]:
    """Start `cmd`, send `sig` once its denoising loop runs: (exit code, output, seconds from the
    signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = wait_for_a_step(proc)
    assert proc.poll() is None, seen
    proc.send_signal(sig)
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, seen + rest, time.monotonic() - sent


LONG = ("--steps", "400", "--size", "128x128", "--frames", "17")  # still denoising when signalled


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
        seen = wait_for_a_step(proc)  # the ranks are in the loop
        assert proc.poll() is None, f"the job ended before it could be interrupted:\n{seen[-2000:]}"
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
    rc, text, _ = signal_mid_denoise(one_process(tmp_path / "out", *LONG), signal.SIGINT)
    assert rc == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_ends_the_job_within_the_grace_period_and_leaves_nothing(tmp_path, nproc):
    """SIGTERM (what Slurm sends on preemption or at the time limit; torchrun forwards it to every
    rank) mid-denoise: the job unwinds, says so once, exits non-zero (143 for one process) well
    within Slurm's default 30 s grace, and leaves no file, not even a temporary one."""
    out = tmp_path / "out"
    cmd = torchrun(out, *LONG, nproc=nproc) if nproc > 1 else one_process(out, *LONG)
    rc, text, took = signal_mid_denoise(cmd, signal.SIGTERM)
    assert rc != 0 and (nproc > 1 or rc == 143), text
    assert took < 30, f"took {took:.0f} s"
    assert text.count("terminated by SIGTERM") == 1 and "Traceback" not in text.split("terminated by SIGTERM")[0]
    assert not out.exists() or not any(out.iterdir())
    assert _strays(str(out)) == 0


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


# --- injected faults (LAUNCHER_FAULT) -------------------------------------------------------------


def _strays(marker: str) -> int:
    """Processes still alive whose command line holds ``marker`` (this test's output folder)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from fault_matrix import strays

    return strays(marker)


def _run_with_fault(tmp_path, fault: str, nproc: int, *args, steps: int = 4):
    out = tmp_path / "out"
    cmd = torchrun(out, "--steps", str(steps), "--seed", "1", *args, nproc=nproc)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "LAUNCHER_FAULT": fault})
    return proc, time.monotonic() - start, out


FAULTS = [  # (LAUNCHER_FAULT, ranks, what the job's stderr says)
    ("1:2:exit", 2, "LAUNCHER_FAULT 1:2:exit: rank 1 at step 2: exiting with code 17"),
    ("1:1:raise", 2, "error: [rank 1] LAUNCHER_FAULT 1:1:raise: rank 1 at step 1"),
    ("1:3:oom", 2, "error: [rank 1] CUDA out of memory (LAUNCHER_FAULT 1:3:oom: rank 1 at step 3); no lighter"),
    ("1:2:hang", 2, "LAUNCHER_FAULT 1:2:hang: rank 1 at step 2: hanging"),
    ("3:1:exit", 4, "LAUNCHER_FAULT 3:1:exit: rank 3 at step 1: exiting with code 17"),
    ("2:3:raise", 4, "error: [rank 2] LAUNCHER_FAULT 2:3:raise: rank 2 at step 3"),
    ("1:2:oom", 4, "error: [rank 1] CUDA out of memory (LAUNCHER_FAULT 1:2:oom: rank 1 at step 2); no lighter"),
    ("3:4:hang", 4, "LAUNCHER_FAULT 3:4:hang: rank 3 at step 4: hanging"),
]


@pytest.mark.parametrize("fault, nproc, said", FAULTS, ids=[f"{f}-{n}p" for f, n, _ in FAULTS])
def test_an_injected_fault_on_one_rank_ends_the_job_and_leaves_nothing(tmp_path, fault, nproc, said):
    """Any rank's failure, at any step: the job ends non-zero within 60 s (a hang: within the
    collective timeout, 10 s here), says what happened, aborts, and leaves no file and no process."""
    args = ["--timeout", "10"] + (["--ulysses", "2"] if nproc == 4 else [])
    proc, took, out = _run_with_fault(tmp_path, fault, nproc, *args)
    text = proc.stderr
    assert proc.returncode != 0, text
    assert said in text, text
    assert took < 60, f"took {took:.0f} s"
    if not fault.endswith("exit"):
        assert "ends early: aborting its communicators" in text, text
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert _strays(str(out)) == 0


def test_a_malformed_fault_is_bad_input_on_every_rank(tmp_path):
    proc, took, out = _run_with_fault(tmp_path, "1:two:exit", 2)
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "LAUNCHER_FAULT='1:two:exit'" in errors[0] and "RANK is a rank or *, STEP a step from 1" in errors[0]


def test_every_rank_out_of_memory_with_no_lighter_plan_ends_at_once_with_one_reason(tmp_path):
    proc, took, out = _run_with_fault(tmp_path, "*:2:oom", 2, "--timeout", "60")
    assert proc.returncode != 0 and took < 30, (took, proc.stderr)
    assert "no lighter memory plan to fall back to" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def _oom_flags(rank: int, world: int, out_of_memory: tuple[int, ...]):
    from parallel.mesh import build_parallel_mesh
    from parallel.topology import Topology

    mesh = build_parallel_mesh(Topology(ulysses=world))
    start = time.monotonic()
    missing = mesh.flag_from_every_rank("out-of-memory", 3.0) if rank in out_of_memory else None
    took = time.monotonic() - start
    mesh.barrier()  # a rank that did not run out waits in a collective, as it would mid-step
    return missing, took


@pytest.mark.parametrize("world, out_of_memory", [(2, (1,)), (2, (0, 1)), (4, (0, 2)), (4, (0, 1, 2, 3))])
def test_ranks_that_ran_out_of_memory_learn_at_once_whether_every_rank_did(world, out_of_memory):
    """The agreement before an out-of-memory fallback goes through the store, not a collective:
    a rank blocked in a collective cannot answer, and the ranks that ran out learn it within the
    wait (3 s here), not at the collective timeout."""
    from mp_util import run_ranks

    results = run_ranks(_oom_flags, world_size=world, args=(out_of_memory,), timeout=60)
    everyone = len(out_of_memory) == world
    for rank, (missing, took) in enumerate(results):
        if rank not in out_of_memory:
            assert missing is None
            continue
        assert missing == ([] if everyone else sorted(set(range(world)) - set(out_of_memory)))
        assert took < 1.5 if everyone else 2.5 < took < 10


@pytest.mark.parametrize("nproc, flags", [(1, []), (2, []), (4, ["--ulysses", "2"])])
def test_an_attention_kernel_failing_at_run_time_falls_back_on_every_rank(tmp_path, nproc, flags):
    """--attention-kernel efficient on the CPU raises at its first call (no CPU implementation):
    every rank moves to math together, warns, records the switch, and the latents equal a run
    on math from the start."""
    from safetensors.torch import load_file

    runs = {}
    for kernel in ("efficient", "math"):
        out = tmp_path / kernel
        args = ["--attention-kernel", kernel, "--seed", "1", "--no-video", *flags]
        cmd = torchrun(out, *args, nproc=nproc) if nproc > 1 else one_process(out, "--steps", "2", *args)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads(next(out.glob("*.json")).read_text())
        runs[kernel] = (proc.stderr, record, load_file(str(next(out.glob("*.safetensors")))))
    stderr, record, latents = runs["efficient"]
    assert "attention kernel efficient gives way to math (NotImplementedError" in stderr
    assert record["attention"]["kernel"] == "math"
    assert [(f["from"], f["to"]) for f in record["attention"]["fallbacks"]] == [("efficient", "math")]
    assert runs["math"][1]["attention"]["fallbacks"] == []
    assert all(torch.equal(latents[k], runs["math"][2][k]) for k in latents)


def _one_rank_kernel_fails(rank: int, world: int):
    from parallel import kernels
    from parallel.attention import HybridAttention
    from parallel.backends import AttentionChoice
    from parallel.mesh import build_parallel_mesh
    from parallel.parallelize import SequenceShard
    from parallel.sequence import SequenceParallel
    from parallel.topology import Topology

    if rank == 0:  # here "efficient" works (math under its name); on rank 1 it raises, as on any CPU
        kernels.KERNELS["efficient"] = kernels.math_attention
    mesh = build_parallel_mesh(Topology(ulysses=world))
    sp = SequenceParallel.from_mesh(mesh)
    attn = HybridAttention(sp, num_valid_tokens=8 * world, kernel="efficient")
    q = torch.randn(1, 8, 2 * world, 16, generator=torch.Generator().manual_seed(rank))
    attn(q, q, q)
    before = attn.kernel_chains[0].name
    shard = SequenceShard(sp, 8 * world, AttentionChoice("native", "efficient"), attn)
    shard.agree_on_kernel(mesh)
    return before, shard.current_attention().kernel


def test_a_kernel_failing_on_one_rank_moves_every_rank_at_the_next_agreement():
    from mp_util import run_ranks

    results = run_ranks(_one_rank_kernel_fails, world_size=2, timeout=60)
    assert results == [("efficient", "math"), ("math", "math")]
