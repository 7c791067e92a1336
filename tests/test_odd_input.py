"""Odd input a batch job meets: prompt files with a byte order mark, blank lines and non-ASCII
text, and an output folder on a disk that is full (refused before any step when even the least
the job writes cannot fit; a prompt whose files stop fitting midway leaves none of them and ends
the job with one line). CPU, fp32, one process (`--device cpu`)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from launcher.cli import build_parser, run_config_from_args
from launcher.config import ConfigError
from launcher.resolve import check_output_space, min_output_bytes
from models import get_family

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*argv):
    return run_config_from_args(build_parser().parse_args(["generate", "--device", "cpu", *argv]))


def _generate(out: Path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--device", "cpu", "--steps", "1",
           "--seed", "1", "--output-dir", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_prompts_file_with_bom_blank_lines_and_unicode(tmp_path):
    f = tmp_path / "prompts.txt"
    # An editor's UTF-8 byte order mark, Windows line ends, blank and whitespace-only lines.
    f.write_bytes("\ufeffune tasse de café\r\n\r\n   \r\n一只猫在草地上走\r\n# a comment\r\n".encode("utf-8"))
    cfg = _cfg("--preset", "tiny", "--prompts-file", str(f))
    assert cfg.prompts == ("une tasse de café", "一只猫在草地上走")
    out = tmp_path / "out"
    proc = _generate(out, "--prompts-file", str(f), "--no-video")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.glob("*.json"))
    # Distinct, ASCII file names: the slug of the French prompt, a hash for the Chinese one.
    assert names[0].startswith("prompt-") and names[0].endswith("_seed2.json"), names
    assert names[1] == "une-tasse-de-cafe_seed1.json", names


def test_the_least_a_job_writes_grows_with_what_it_writes():
    dit = get_family("tiny").config("tiny")
    base = _cfg("--preset", "tiny", "--prompt", "a")
    latents = _cfg("--preset", "tiny", "--prompt", "a", "--save-latents")
    assert min_output_bytes(latents, dit) - min_output_bytes(base, dit) == 4 * dit.in_channels * 3 * 8 * 12
    big = _cfg("--preset", "tiny", "--prompt", "a", "--size", "256x256", "--frames", "33")
    assert min_output_bytes(big, dit) > min_output_bytes(base, dit)


def test_a_full_disk_is_refused_before_any_step(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg = _cfg("--preset", "tiny", "--prompt", "a red fox", "--output-dir", str(tmp_path / "out"))
    dit = get_family("tiny").config("tiny")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"out: 1 KiB free on its disk; 1 prompt\(s\) at 64x96x9 write at least"):
        check_output_space(cfg, dit)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    check_output_space(cfg, dit)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_full_disk_exits_2_before_denoising(small_disk):
    _fill(small_disk, leave=2 * 1024)
    proc = _generate(small_disk / "out", "--prompt", "a red fox", "--save-grid")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "KiB free on its disk" in proc.stderr and "prompt 1/1" not in proc.stderr
    assert not (small_disk / "out").exists()


def test_disk_filling_up_midway_leaves_nothing_of_the_prompt(small_disk):
    # Enough for the mp4 and the check, not for the frame grid written after it.
    _fill(small_disk, leave=40 * 1024)
    out = small_disk / "out"
    proc = _generate(out, "--prompt", "a red fox", "--save-grid")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"error: [rank 0] writing prompt 1's outputs to {out} failed (No space left on device); "
                      "none of its files were kept"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []  # no mp4 without its grid and record, no temporary files
