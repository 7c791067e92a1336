"""`generate --attention/--topology/--no-video`: the backends' limits are refused before any
collective with the flag named; the 1-GPU CUDA path (native kernel, no process group) computes
the model's own attention; --no-video writes latents and a record only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.__main__ import main
from models.attention import sdpa_joint_attention
from parallel.attention import HybridAttention
from parallel.backends import BACKENDS, anchor_kernel, backend_problem, text_problem
from parallel.sequence import SequenceParallel

ROOT = Path(__file__).resolve().parents[1]


def _generate(tmp_path, capsys, *argv):
    rc = main(["generate", "--preset", "tiny", "--prompt", "a cat walks", "--seed", "1", "--device", "cpu",
               "--output-dir", str(tmp_path / "o"), *argv])
    return rc, capsys.readouterr().err


def test_xfuser_is_refused_on_the_cpu_with_the_flag_named(tmp_path, capsys):
    for backend in ("xfuser", "xfuser-cudnn"):
        rc, err = _generate(tmp_path, capsys, "--device", "cpu", "--attention", backend)
        assert rc == 2 and f"error: --attention {backend}: {backend} runs on CUDA only" in err
    assert not (tmp_path / "o").exists()


def test_an_anchor_backend_needs_a_split_sequence(tmp_path, capsys):
    rc, err = _generate(tmp_path, capsys, "--device", "cpu", "--attention", "yunchang")
    assert rc == 2 and "sequence-parallel size is 1" in err and "use native" in err


def test_uneven_tokens_are_refused_before_any_collective(tmp_path, capsys, monkeypatch):
    # WORLD_SIZE 2 without a process group: validation must fail before one would be needed.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, err = _generate(tmp_path, capsys, "--device", "cpu", "--attention", "yunchang", "--size", "48x48", "--frames", "1")
    assert rc == 2 and "cannot pad uneven tokens: 9 image tokens do not divide over 2" in err


def test_unknown_backend_and_bad_topology_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--preset", "tiny", "--prompt", "a", "--attention", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err
    rc, err = _generate(tmp_path, capsys, "--topology", str(tmp_path / "none.yaml"))
    assert rc == 2 and "--topology" in err and "no such file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: hunyuan_video\nheads: 8\nentries:\n  - {size: 64x96, frames: 9, gpus: {2: {default: 3x1, published: [3x1]}}}\n")
    rc, err = _generate(tmp_path, capsys, "--topology", str(bad))
    assert rc == 2 and f"--topology {bad}: entries[0].gpus.2: 3x1 uses 3 GPUs, not 2" in err
    other_heads = Path(ROOT / "configs" / "topology" / "hunyuan_video.yaml")
    rc, err = _generate(tmp_path, capsys, "--topology", str(other_heads))
    assert rc == 2 and "a table for 24 heads; preset tiny has 8" in err
    rc, err = _generate(tmp_path, capsys, "--no-video", "--save-grid")
    assert rc == 2 and "--save-grid" in err and "--no-video" in err


def test_backend_problems(monkeypatch):
    assert backend_problem("native", device_type="cpu", sp_size=3, num_tokens=10) is None
    assert "unknown backend" in backend_problem("fa", device_type="cuda", sp_size=2, num_tokens=8)
    import importlib

    real = importlib.import_module

    def no_xfuser(name, *a, **k):
        if name.startswith("xfuser"):
            raise ModuleNotFoundError("No module named 'xfuser'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_xfuser)
    why = backend_problem("xfuser", device_type="cuda", sp_size=2, num_tokens=8)
    assert "needs the xfuser package" in why and "No module named 'xfuser'" in why
    pytest.importorskip("yunchang")
    assert backend_problem("yunchang", device_type="cpu", sp_size=4, num_tokens=8) is None
    assert "8 image tokens do not divide over 3" in backend_problem("yunchang", device_type="cpu", sp_size=3, num_tokens=8)
    assert text_problem("yunchang", [8, 6], 4) is not None and text_problem("yunchang", [8], 4) is None
    assert text_problem("native", [7], 4) is None


def test_anchor_kernels():
    fa = "fa" if anchor_kernel("xfuser", 1)[0] == "fa" else "torch_flash"  # flash-attn installed or not
    assert anchor_kernel("xfuser", 2)[0] == fa
    assert anchor_kernel("xfuser-cudnn", 1)[0] == "torch_cudnn"
    assert anchor_kernel("xfuser-cudnn", 2)[0] == fa  # xfuser's cuDNN LSE is zero: no ring with it
    assert anchor_kernel("yunchang", 2, "cpu")[0] == "lse:math"
    assert set(BACKENDS) == {"native", "xfuser", "xfuser-cudnn", "yunchang"}


def test_single_process_native_attention_equals_the_models_sdpa():
    """What a 1-GPU CUDA job now runs (HybridAttention with no process group, fold path), checked
    on the CPU with the math kernel: uneven text lengths, padded text rows zero."""
    gen = torch.Generator().manual_seed(0)
    img = [torch.randn(2, 37, 4, 16, generator=gen) for _ in range(3)]
    txt = [torch.randn(2, 6, 4, 16, generator=gen) for _ in range(3)]
    lens = torch.tensor([6, 3])
    ref_img, ref_txt = sdpa_joint_attention(*img, *txt, lens)
    out_img, out_txt = HybridAttention(SequenceParallel.single(), num_valid_tokens=37, kernel="math")(*img, *txt, lens)
    assert torch.allclose(out_img, ref_img, atol=1e-5) and torch.allclose(out_txt, ref_txt, atol=1e-5)
    assert out_txt[1, 3:].abs().max() == 0


@pytest.mark.slow
def test_no_video_writes_latents_and_a_record_only(tmp_path):
    cmd = [sys.executable, "-m", "launcher", "generate", "--preset", "tiny", "--prompt", "a cat", "--steps", "2",
           "--seed", "4", "--no-video", "--device", "cpu", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cat_seed4.json", "a-cat_seed4.latents.safetensors"]
    record = json.loads((tmp_path / "a-cat_seed4.json").read_text())
    assert record["outputs"]["video"] is None and "vae_decode" not in record["timings_s"]
    assert record["attention"] == {"backend": "model", "kernel": "sdpa", "note": None, "fallbacks": []}
    assert record["topology_table"].endswith("configs/topology/hunyuan_video.yaml")
