"""`python -m launcher sweep`: configurations, the report made from rows, and tiny real sweeps on
1 and 2 CPU processes (each configuration its own torchrun, as on GPUs)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import build_parser
from launcher.sweep_spec import SweepError, enumerate_configs, spec_from_args
from launcher.sweep_report import format_table, topology_yaml, with_efficiency
from parallel.topology import load_topology_table

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
REQUIRED = {"kind", "date", "device", "gpus", "model", "size", "frames", "backend", "ulysses", "ring", "seconds",
            "peak_gib", "command", "step_seconds", "efficiency", "speedup", "phases"}


def _spec(*argv, tmp=Path("out")):
    return spec_from_args(build_parser().parse_args(["sweep", "--output-dir", str(tmp), *argv]))


def _labels(configs):
    return [(c.gpus, f"{c.ulysses}x{c.ring}", c.backend) for c in configs]


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def test_all_factorisations_with_ulysses_dividing_the_heads():
    spec = _spec("--sizes", "720x1280x129", "--gpus", "4,1,2,5", "--backends", "native,xfuser,xfuser-cudnn",
                 "--device", "cuda")
    got = _labels(enumerate_configs(spec, heads=24))
    assert got == [
        (1, "1x1", "native"),  # once per size: the baseline of every backend
        (2, "2x1", "native"), (2, "2x1", "xfuser"), (2, "2x1", "xfuser-cudnn"),
        (2, "1x2", "native"), (2, "1x2", "xfuser"),  # xfuser-cudnn at ring 2 = xfuser's kernel: not run twice
        (4, "4x1", "native"), (4, "4x1", "xfuser"), (4, "4x1", "xfuser-cudnn"),
        (4, "2x2", "native"), (4, "2x2", "xfuser"),
        (4, "1x4", "native"), (4, "1x4", "xfuser"),
        (5, "1x5", "native"), (5, "1x5", "xfuser"),  # 5 does not divide 24 heads: ring only
    ]


def test_listed_topologies_and_the_tiny_presets_heads():
    spec = _spec("--preset", "tiny", "--gpus", "1,2,8", "--topologies", "8x1,1x2", "--device", "cpu")
    assert _labels(enumerate_configs(spec, heads=8)) == [(1, "1x1", "native"), (2, "1x2", "native"), (8, "8x1", "native")]
    assert spec.sizes == ((64, 96, 9),) and spec.steps == 3 and spec.warmup == 1  # the preset's size, defaults
    spec = _spec("--preset", "tiny", "--gpus", "8", "--device", "cpu")
    assert [lbl for _, lbl, _ in _labels(enumerate_configs(spec, heads=8))] == ["8x1", "4x2", "2x4", "1x8"]


@pytest.mark.parametrize("argv, message", [
    (["--topologies", "3x1"], "--topologies 3x1: ulysses 3 does not divide the preset's 8 heads"),
    (["--backends", "native,flash"], "--backends flash: unknown; valid: native, xfuser, xfuser-cudnn, yunchang"),
    (["--sizes", "64x96x10"], "--sizes 64x96x10: --frames 10: the VAE needs 4n+1 frames"),
    (["--sizes", "64x96"], "expected HEIGHTxWIDTHxFRAMES"),
    (["--steps", "2", "--warmup", "2"], "need 0 <= warmup < steps"),
    (["--gpus", "two"], "--gpus 'two'"),
])
def test_bad_sweep_input_is_explained(argv, message):
    with pytest.raises(SweepError, match=message.replace("+", r"\+")):
        _spec("--preset", "tiny", "--device", "cpu", *argv)


def test_sweep_file_with_flags_over_it(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("preset: tiny\nsizes: [64x96x9, 48x48x1]\ngpus: [1, 2]\nbackends: [native, yunchang]\nsteps: 4\n"
                 "device: cpu\nconcurrent: true\nextra_args: --guidance 5\n")
    spec = _spec("--sweep", str(f), "--steps", "2")
    assert spec.sizes == ((64, 96, 9), (48, 48, 1)) and spec.gpus == (1, 2) and spec.steps == 2
    assert spec.backends == ("native", "yunchang") and spec.concurrent and spec.extra_args == ("--guidance", "5")
    f.write_text("preset: tiny\nsize: 64x96x9\n")
    with pytest.raises(SweepError, match=r"unknown key\(s\) \['size'\]; valid: preset, sizes"):
        _spec("--sweep", str(f))
    for name in ("hunyuan_video_4gpu.yaml", "tiny_cpu.yaml"):  # the shipped sweep files are valid
        assert _spec("--sweep", str(ROOT / "configs" / "sweeps" / name)).steps >= 2


# --------------------------------------------------------------------------------------------
# Report from rows
# --------------------------------------------------------------------------------------------


def _row(gpus, u, r, seconds, backend="native", status="ok"):
    return {"kind": "sweep", "model": "hunyuan-video-13b", "size": "720x1280", "height": 720, "width": 1280,
            "frames": 129, "gpus": gpus, "ulysses": u, "ring": r, "backend": backend, "kernel": "cudnn",
            "status": status, "error": None if status == "ok" else "boom", "seconds": seconds if status == "ok" else None,
            "peak_gib": 30.0, "device": "NVIDIA H200", "warmup": 1}


def test_efficiency_and_speedup_against_the_1_gpu_native_run():
    rows = with_efficiency([_row(1, 1, 1, 24.0), _row(4, 4, 1, 6.25), _row(4, 4, 1, 8.0, backend="xfuser"),
                            _row(2, 2, 1, None, status="failed")])
    assert rows[1]["speedup"] == pytest.approx(24 / 6.25) and rows[1]["efficiency"] == pytest.approx(24 / (4 * 6.25))
    assert rows[2]["efficiency"] == pytest.approx(0.75) and rows[2]["baseline_seconds"] == 24.0
    assert rows[3]["efficiency"] is None and rows[0]["efficiency"] == 1.0
    table = format_table(rows)
    assert "| 720x1280 | 129 | 4 | 4x1 | native | cudnn | 6.250 | 3.84 | 96.0% | 30.0 | ok |" in table
    assert "| 2 | 2x1 | native | cudnn | - | - | - | 30.0 | failed: boom |" in table


def test_topology_yaml_takes_the_fastest_native_factorisation(tmp_path):
    rows = [_row(1, 1, 1, 24.0), _row(4, 4, 1, 6.3), _row(4, 2, 2, 6.2), _row(4, 1, 4, 6.4),
            _row(4, 4, 1, 5.0, backend="xfuser"),  # anchors never choose the table's topology
            _row(2, 2, 1, 12.1), _row(2, 1, 2, 1.0, status="failed")]
    path = tmp_path / "topology.yaml"
    path.write_text(topology_yaml(rows))
    table = load_topology_table(path)
    entry = table.lookup(height=720, width=1280, frames=129, gpus=4)
    assert entry.default == (2, 2) and entry.published == ((2, 2), (4, 1), (1, 4))
    assert table.lookup(height=720, width=1280, frames=129, gpus=2).published == ((2, 1),)
    assert table.heads == 24 and table.lookup(height=720, width=1280, frames=129, gpus=1) is None
    assert yaml.safe_load(topology_yaml([_row(1, 1, 1, 24.0)]))["entries"] == []  # nothing to choose: still valid


# --------------------------------------------------------------------------------------------
# Real sweeps (1 and 2 processes, tiny preset)
# --------------------------------------------------------------------------------------------


def _sweep(out: Path, *argv, timeout=400):
    cmd = [sys.executable, "-m", "launcher", "sweep", "--preset", "tiny", "--device", "cpu", "--steps", "2",
           "--warmup", "1", "--no-video", "--output-dir", str(out), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = _sweep(out / "s", "--sizes", "64x96x9", "--gpus", "1,2", "--topologies", "2x1,1x2", "--timeout", "240",
                  "--concurrent", "--slots", "3", "--append-jsonl", str(out / "bench.jsonl"))
    return out, proc


@pytest.mark.multiprocess
def test_tiny_sweep_outputs(tiny_sweep):
    out, proc = tiny_sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(ln) for ln in (out / "s" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["gpus"], f"{r['ulysses']}x{r['ring']}") for r in rows) == [(1, "1x1"), (2, "1x2"), (2, "2x1")]
    t1 = next(r for r in rows if r["gpus"] == 1)["seconds"]
    for r in rows:
        assert r["status"] == "ok" and r["kind"] == "sweep" and r["model"] == "tiny" and r["device"] == "cpu"
        assert len(r["step_seconds"]) == 2 and r["seconds"] == statistics.median(r["step_seconds"][1:])
        assert r["speedup"] == pytest.approx(t1 / r["seconds"])
        assert r["efficiency"] == pytest.approx(t1 / (r["gpus"] * r["seconds"]))
        assert len(r["peak_gib_per_rank"]) == r["gpus"] and r["peak_gib"] == max(r["peak_gib_per_rank"])
        assert "denoise" in r["phases"] and "vae_decode" not in r["phases"]  # --no-video passed through
        assert r["kernel"] == ("sdpa" if r["gpus"] == 1 else "math")
        assert ("torch.distributed.run" in r["command"]) == (r["gpus"] > 1) and "--attention native" in r["command"]
    table = (out / "s" / "table.md").read_text()
    assert table.count("| 64x96 | 9 |") == 3 and "| 64x96 | 9 | 2 | 1x2 | native | math |" in table
    for name in ("step_time.png", "efficiency.png"):
        assert (out / "s" / name).read_bytes()[:8] == PNG
    published = [json.loads(ln) for ln in (out / "bench.jsonl").read_text().splitlines()]
    assert len(published) == 3 and all(REQUIRED <= p.keys() for p in published)


@pytest.mark.multiprocess
def test_generate_uses_the_sweeps_topology_file(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    topo = out / "s" / "topology.yaml"
    rows = [json.loads(ln) for ln in (out / "s" / "runs.jsonl").read_text().splitlines()]
    fastest = min((r for r in rows if r["gpus"] == 2), key=lambda r: r["seconds"])
    label = f"{fastest['ulysses']}x{fastest['ring']}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launcher",
           "generate", "--preset", "tiny", "--prompt", "a cat", "--steps", "1", "--seed", "2", "--no-video", "--device", "cpu",
           "--topology", str(topo), "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert f"topology {label} (table {topo})" in proc.stderr
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["topology_table"] == str(topo) and record["topology"]["source"] == "table"
    assert f"{record['topology']['ulysses']}x{record['topology']['ring']}" == label


@pytest.mark.multiprocess
def test_report_from_merges_split_sweeps(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    lines = (out / "s" / "runs.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:1]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[1:]) + "\n")
    cmd = [sys.executable, "-m", "launcher", "sweep", "--report-from", str(tmp_path / "a.jsonl"),
           str(tmp_path / "b.jsonl"), "--output-dir", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "table.md").read_text() == (out / "s" / "table.md").read_text()
    assert (tmp_path / "merged" / "topology.yaml").read_text() == (out / "s" / "topology.yaml").read_text()


@pytest.mark.multiprocess
def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(tmp_path):
    """xfuser cannot run on the CPU: its row says why (exit 2, log tail) and yunchang still runs;
    the sweep exits 1 (some configuration failed) with every output written."""
    proc = _sweep(tmp_path, "--sizes", "64x96x9", "--gpus", "2", "--topologies", "2x1",
                  "--backends", "xfuser,yunchang", "--timeout", "240")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["backend"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    bad, good = rows["xfuser"], rows["yunchang"]
    assert bad["status"] == "failed" and bad["exit_code"] not in (0, None) and "runs on CUDA only" in bad["error"]
    assert bad["error"].startswith("error: --attention xfuser") and bad["log_tail"] and bad["seconds"] is None
    assert good["status"] == "ok" and good["kernel"] == "lse:math" and good["efficiency"] is None  # no 1-GPU run
    assert "failed: error: --attention xfuser" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "topology.yaml").exists()


@pytest.mark.multiprocess
def test_a_configuration_past_its_timeout_is_killed_and_recorded(tmp_path):
    proc = _sweep(tmp_path, "--gpus", "1", "--timeout", "0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())
    assert row["status"] == "timeout" and row["exit_code"] is not None and "killed after" in row["error"]


@pytest.mark.slow
def test_dry_run_lists_the_commands(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher", "sweep", "--sweep", "configs/sweeps/hunyuan_video_4gpu.yaml",
                           "--dry-run", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * 13 and not (tmp_path / "runs.jsonl").exists()
    assert any("--nproc_per_node=4" in ln and "--ulysses 2 --ring 2" in ln and "--attention xfuser " in ln for ln in lines)
