"""The step-time model of `plan --predict` against what was measured (no GPU, no process group).

The measured rows are the sweep records of the repository (docs/benchmarks/sweep.jsonl: H200s,
1/2/4 GPUs, HunyuanVideo 13B at two sizes in every factorisation and three backends, Wan2.1 and a
third HunyuanVideo size on one GPU); the calibration is configs/calibration/nvidia-h200.yaml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import models
from launcher.predict import (DEFAULT_RECORDS, calibrate, calibration_path, load_calibration, predict_all,
                              read_records, record_job)
from parallel.cost_model import Calibration, Interconnect, Job, fit, nnls, predict
from parallel.topology import Topology, factorisations

ROOT = Path(__file__).resolve().parents[1]
ROWS = read_records(DEFAULT_RECORDS)


def rel_err(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def test_the_records_cover_what_the_model_claims():
    hv = [r for r in ROWS if r["model"] == "hunyuan-video-13b" and r["frames"] == 129]
    assert {r["gpus"] for r in hv} == {1, 2, 4} and {r["size"] for r in hv} == {"720x1280", "544x960"}
    assert {(r["ulysses"], r["ring"]) for r in hv if r["gpus"] == 4} == {(4, 1), (2, 2), (1, 4)}
    assert {r["model"] for r in ROWS} >= {"wan2.1-t2v-14b", "wan2.1-t2v-1.3b"}


def test_committed_calibration_is_the_fit_of_the_records():
    """Not hand-tuned: the file is what `python -m launcher calibrate` computes from the records."""
    fitted, committed = calibrate(DEFAULT_RECORDS), load_calibration("NVIDIA H200")
    assert committed.rows == fitted.rows == len(ROWS)
    pairs = [(fitted.matmul_s_per_flop, committed.matmul_s_per_flop), (fitted.a2a_s_per_byte, committed.a2a_s_per_byte),
             (fitted.ring_s_per_flop, committed.ring_s_per_flop)]
    pairs += [(fitted.elementwise_s[k], committed.elementwise_s[k]) for k in fitted.elementwise_s]
    pairs += [(fitted.attention_s_per_flop[k], committed.attention_s_per_flop[k]) for k in fitted.attention_s_per_flop]
    for a, b in pairs:
        assert a == pytest.approx(b, rel=1e-5)  # the file keeps 6 digits


def test_every_measured_row_is_reproduced_within_10_percent():
    cal = load_calibration("NVIDIA H200")
    errors = {r["name"] + f"@{r['commit']}": rel_err(predict(record_job(r), cal).seconds, r["seconds"]) for r in ROWS}
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.10, (worst, errors[worst])
    assert cal.max_rel_err == pytest.approx(abs(errors[worst]), abs=1e-6)


@pytest.mark.parametrize("left_out", [1, 2, 4])
def test_a_gpu_count_left_out_of_the_fit_is_predicted_within_15_percent(left_out):
    """Fit on the other GPU counts only, predict the rows of the left-out one (of the families the
    fit saw: Wan was measured on one GPU only, so leaving 1 out leaves it without a rate)."""
    kept = [r for r in ROWS if r["gpus"] != left_out]
    cal = fit([record_job(r) for r in kept], [r["seconds"] for r in kept], gpu="NVIDIA H200")
    held = [r for r in ROWS if r["gpus"] == left_out and record_job(r).family in cal.elementwise_s]
    assert held
    errors = [rel_err(predict(record_job(r), cal).seconds, r["seconds"]) for r in held]
    assert max(map(abs, errors)) <= 0.15, errors


def test_a_size_left_out_of_the_fit_is_predicted_within_10_percent():
    """HunyuanVideo at 544x960x65 (34,680 tokens) was measured to check the model, not to fit it."""
    kept = [r for r in ROWS if not (r["model"] == "hunyuan-video-13b" and r["frames"] == 65)]
    held = [r for r in ROWS if r["model"] == "hunyuan-video-13b" and r["frames"] == 65]
    cal = fit([record_job(r) for r in kept], [r["seconds"] for r in kept], gpu="NVIDIA H200")
    assert held and all(abs(rel_err(predict(record_job(r), cal).seconds, r["seconds"])) <= 0.10 for r in held)


# Two runs of one row differ by up to ~0.1% here (720x1280 2x1 on 2 GPUs: 11.771 and 11.776 s), and
# there 1x2 measured 11.760 s: a tie. A choice "matches" when its measured time is within this of the best.
TIE = 0.005


def measured_native() -> dict[tuple, dict[str, float]]:
    best: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in ROWS:
        if r["backend"] == "native":
            by = best[(r["model"], r["height"], r["width"], r["frames"], r["gpus"])]
            label = f"{r['ulysses']}x{r['ring']}"
            by[label] = min(r["seconds"], by.get(label, float("inf")))
    return {k: v for k, v in best.items() if len(v) > 1}


def test_the_predicted_and_the_planned_choice_match_the_measured_best():
    from launcher.plan import make_plan

    cal = load_calibration("NVIDIA H200")
    groups = measured_native()
    assert len(groups) >= 4
    for (model, h, w, f, gpus), times in groups.items():
        plan = make_plan(preset=model, height=h, width=w, frames=f, gpus=gpus)
        predicted = predict_all(model, h, w, f, plan.topologies, cal, None)
        fastest = min(predicted, key=lambda p: p.step.seconds).topology.sp_label
        best = min(times.values())
        for label in (fastest, plan.topology.sp_label):
            assert times[label] <= best * (1 + TIE), (model, h, w, f, gpus, label, times)


def test_family_flops_match_the_models_linear_layers():
    """The per-token matmul FLOPs of each family's formula are its DiT's token-wise weights x 2."""
    token_wise = {
        "hunyuan-video-13b": r"img_in\.proj|double_blocks\.\d+\.img_(attn_qkv|attn_proj|mlp\.fc[12])|"
                             r"single_blocks\.\d+\.linear[12]|final_layer\.linear",
        "wan2.1-t2v-14b": r"patch_embedding|blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.[02])|head\.head",
        "wan2.1-t2v-1.3b": r"patch_embedding|blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.[02])|head\.head",
    }
    for preset, pattern in token_wise.items():
        family = models.get_family(preset)
        dit = models.build_model(preset, device="meta")
        weights = sum(m.weight.numel() for n, m in dit.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and re.fullmatch(pattern, n))
        work = family.forward_work(family.config(preset), 1000, family.text.max_tokens)
        assert work.token_flops == 2 * weights, preset
        assert work.heads * work.head_dim == family.config(preset).hidden_size


def test_nnls_keeps_coefficients_non_negative_and_solves_exact_systems():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(nnls(a, a @ torch.tensor([2.0, 3.0], dtype=torch.float64)),
                          torch.tensor([2.0, 3.0], dtype=torch.float64))
    x = nnls(a, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))  # unconstrained optimum has x2 < 0
    assert (x >= 0).all() and x[1] == 0


def _job(topo: Topology, preset="hunyuan-video-13b") -> Job:
    from launcher.predict import job_for

    return job_for(preset, 720, 1280, 129, topo)


def test_slower_links_cost_more_and_ulysses_across_nodes_costs_most():
    cal = load_calibration("NVIDIA H200")
    u8r2, u16 = Topology(ulysses=8, ring=2), Topology(ulysses=16, ring=1)
    node = Interconnect(gpus_per_node=16)
    two_nodes = Interconnect(gpus_per_node=8)
    slow = Interconnect(gpus_per_node=8, inter_gbps=5.0)
    assert predict(_job(u8r2), cal, node).seconds == pytest.approx(predict(_job(u8r2), cal).seconds)
    assert predict(_job(u8r2), cal, slow).seconds > predict(_job(u8r2), cal, two_nodes).seconds
    # (16 does not divide 24 heads: this Ulysses degree is only priced, not a valid job.)
    assert predict(_job(u16), cal, two_nodes).a2a > predict(_job(u16), cal).a2a
    pcie = Interconnect(gpus_per_node=8, intra_gbps=25.0)
    u8 = Topology(ulysses=8)
    assert predict(_job(u8), cal, pcie).a2a > predict(_job(u8), cal).a2a


def test_classic_cfg_costs_two_forwards_unless_split():
    cal = load_calibration("NVIDIA H200")
    one = predict(_job(Topology(ulysses=4), "wan2.1-t2v-14b"), cal)
    split = predict(_job(Topology(cfg=2, ulysses=4), "wan2.1-t2v-14b"), cal, Interconnect(gpus_per_node=8))
    assert one.compute == pytest.approx(2 * split.compute)
    assert split.cfg_exchange > 0


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # plan needs no GPU
    return subprocess.run([sys.executable, "-m", "launcher", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_plan_predict_prints_every_topology_and_marks_the_choice():
    out = run_plan("--gpus", "4", "--size", "720x1280", "--frames", "129", "--predict")
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("predicted seconds per step")[1]
    rows = [m.groups() for m in re.finditer(r"^  ([* ])([< ])\s+(\d+x\d+)\s+([\d.]+)", text, re.M)]
    assert [r[2] for r in rows] == ["4x1", "2x2", "1x4"]
    assert rows[0][:2] == ("*", "<") and all(r[:2] == (" ", " ") for r in rows[1:])
    assert f"{len(ROWS)} measured steps on NVIDIA H200" in text


@pytest.mark.slow
def test_plan_predict_json_across_nodes_states_its_assumptions():
    out = run_plan("--nodes", "2", "--gpus-per-node", "8", "--predict", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["gpus"] == 16 and d["chosen"]["label"] == d["prediction"]["chosen"] == "8x2"
    assert any("across 2 nodes" in a and "50 GB/s" in a for a in d["prediction"]["assumptions"])
    labels = [t["label"] for t in d["prediction"]["topologies"]]
    assert labels == [t.sp_label for t in factorisations(16, 24)]
    assert all(0 < t["efficiency"] <= 1 for t in d["prediction"]["topologies"])


@pytest.mark.parametrize("args, message", [
    (("--nodes", "2", "--predict"), "--gpus-per-node"),
    (("--gpus", "8", "--nodes", "2", "--gpus-per-node", "2"), "= 4"),
    (("--gpus", "2", "--predict", "--gpu-kind", "Tesla K80"), "no calibration for Tesla K80"),
])
@pytest.mark.slow
def test_plan_predict_bad_input_is_one_message(args, message):
    out = run_plan(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_calibrate_command_writes_the_committed_rates(tmp_path):
    out = tmp_path / "cal.yaml"
    proc = subprocess.run([sys.executable, "-m", "launcher", "calibrate", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import yaml

    written, committed = (yaml.safe_load(p.read_text()) for p in (out, calibration_path("NVIDIA H200")))
    assert written.keys() == committed.keys()
    for key, value in committed.items():
        if isinstance(value, float):
            assert written[key] == pytest.approx(value, rel=1e-5), key
        elif isinstance(value, dict):
            assert written[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert written[key] == value, key


@pytest.mark.slow
def test_sweep_fills_unmeasured_gpu_counts_from_predictions_marked_as_such(tmp_path):
    from parallel.topology import load_topology_table

    out = subprocess.run([sys.executable, "-m", "launcher", "sweep", "--report-from",
                          str(ROOT / "docs/benchmarks/sweep/runs.jsonl"), "--output-dir", str(tmp_path),
                          "--predict-missing", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = load_topology_table(tmp_path / "topology.yaml")
    rows = {(e.key, e.gpus): e for e in table.entries.values()}
    entry8, entry4 = rows[("720x1280x129", 8)], rows[("720x1280x129", 4)]
    assert entry8.predicted and not entry4.predicted and entry4.default == (4, 1)
    plan = run_plan("--gpus", "8", "--topology", str(tmp_path / "topology.yaml"), "--json")
    assert "predicted (not measured) fastest" in json.loads(plan.stdout)["chosen"]["reason"]


@pytest.mark.slow
def test_scaling_doc_holds_the_tables_the_script_prints():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/scaling_report.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc = (ROOT / "docs/SCALING.md").read_text()
    missing = [ln for ln in out.stdout.splitlines() if ln.strip() and ln not in doc]
    assert not missing, missing[:3]
