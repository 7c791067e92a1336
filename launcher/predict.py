"""Predicted seconds per step (`plan --predict`) and the calibration behind them (`calibrate`).

The model is ``parallel/cost_model.py``; its rates per GPU kind are fitted to measured steps (the
sweep records, ``docs/benchmarks/sweep.jsonl`` in the repository) and kept in
``configs/calibration/<gpu>.yaml``, written only by

    python -m launcher calibrate --records docs/benchmarks/sweep.jsonl

so a prediction never rests on a hand-set constant, and a new sweep is one command away from a
new calibration.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from models import get_family
from parallel.cost_model import Calibration, Interconnect, Job, StepTime, efficiency, fit, predict
from parallel.topology import Topology

from .config import ConfigError

from models.configs import config_file

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_DIR = config_file("calibration")
# The measured rows ship with the checkout (docs/), not with an installed wheel: there, --records.
DEFAULT_RECORDS = tuple(p for p in (ROOT / "docs" / "benchmarks" / "sweep.jsonl",) if p.is_file())
DEFAULT_GPU = "NVIDIA H200"


def gpu_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200" (the calibration file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def job_for(preset: str, height: int, width: int, frames: int, topology: Topology, kernel: str = "cudnn",
            cfg_scale: float | None = None) -> Job:
    """The cost model's view of one generate job. ``cfg_scale`` None: the preset's default."""
    family = get_family(preset)
    if family.forward_work is None:
        raise ConfigError(f"--predict: the {family.name} family does not declare its forward's FLOPs")
    config = family.config(preset)
    tokens = math.prod(config.token_grid(height, width, frames))
    scale = family.defaults[preset].cfg_scale if cfg_scale is None else cfg_scale
    return Job(family=family.name, work=family.forward_work(config, tokens, family.text.max_tokens),
               topology=topology, kernel=kernel, classic_cfg=family.guidance == "cfg" and scale != 1.0)


def record_job(row: dict) -> Job:
    """A measured row (a sweep record) as a Job; rows from before cfg was recorded ran cfg 1."""
    topo = Topology(dp=1, cfg=row.get("cfg") or 1, ring=row["ring"], ulysses=row["ulysses"])
    return job_for(row["model"], row["height"], row["width"], row["frames"], topo, kernel=row["kernel"],
                   cfg_scale=row.get("cfg_scale"))


def read_records(paths) -> list[dict]:
    """The measured steps of ``paths`` (JSON lines): successful runs with a kernel, GPUs only."""
    rows = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{n}: not JSON ({err.msg})") from None
            if row.get("status") == "ok" and row.get("kernel") and row.get("device") not in (None, "cpu"):
                rows.append(row)
    return rows


def calibrate(paths, gpu: str | None = None) -> Calibration:
    """Fit the rates to every measured step of one GPU kind in ``paths``."""
    rows = read_records(paths)
    kinds = sorted({r["device"] for r in rows})
    if gpu is None and len(kinds) > 1:
        raise ConfigError(f"records of several GPU kinds ({', '.join(kinds)}): pick one with --gpu")
    gpu = gpu or (kinds[0] if kinds else DEFAULT_GPU)
    rows = [r for r in rows if r["device"] == gpu]
    if not rows:
        raise ConfigError(f"no successful GPU rows for {gpu} in {', '.join(map(str, paths))}")
    source = tuple(_display(p) for p in paths)
    return fit([record_job(r) for r in rows], [r["seconds"] for r in rows], gpu=gpu, source=source)


def _display(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def calibration_yaml(cal: Calibration) -> str:
    """The calibration file's text (rates in seconds per FLOP / byte; the comments say them as rates)."""
    rates = [f"#   matmuls: {1 / cal.matmul_s_per_flop / 1e12:.0f} TFLOP/s"] if cal.matmul_s_per_flop else []
    rates += [f"#   elementwise work of {f}: {v * 1e12:.0f} ps per token x channel x block"
              for f, v in cal.elementwise_s.items()]
    rates += [f"#   attention, {k}: {1 / v / 1e12:.0f} TFLOP/s" for k, v in cal.attention_s_per_flop.items() if v]
    if cal.a2a_s_per_byte:
        rates.append(f"#   Ulysses all-to-all: {1 / cal.a2a_s_per_byte / 1e9:.0f} GB/s per GPU (bytes that leave the rank)")
    head = [
        f"# Step-time calibration for {cal.gpu}: written by `python -m launcher calibrate` ({date.today().isoformat()})",
        f"# from {cal.rows} measured steps; re-run it rather than editing. Effective rates:", *rates,
    ]
    def sig(v: float) -> float:  # 6 significant digits: the fit's last ones are solver noise
        return float(f"{v:.6g}")

    body = {
        "gpu": cal.gpu, "source": list(cal.source), "rows": cal.rows, "max_rel_err": round(cal.max_rel_err, 6),
        "matmul_s_per_flop": sig(cal.matmul_s_per_flop), "elementwise_s": {k: sig(v) for k, v in cal.elementwise_s.items()},
        "attention_s_per_flop": {k: sig(v) for k, v in cal.attention_s_per_flop.items()},
        "a2a_s_per_byte": sig(cal.a2a_s_per_byte), "ring_s_per_flop": sig(cal.ring_s_per_flop),
    }
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def calibration_path(gpu: str) -> Path:
    return CALIBRATION_DIR / f"{gpu_slug(gpu)}.yaml"


def load_calibration(gpu: str = DEFAULT_GPU, path: Path | None = None) -> Calibration:
    path = path or calibration_path(gpu)
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in CALIBRATION_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"--predict: no calibration for {gpu} ({path}); calibrated: {have}")
    d = yaml.safe_load(path.read_text())
    return Calibration(gpu=d["gpu"], matmul_s_per_flop=d["matmul_s_per_flop"], elementwise_s=d["elementwise_s"],
                       attention_s_per_flop=d["attention_s_per_flop"], a2a_s_per_byte=d["a2a_s_per_byte"],
                       ring_s_per_flop=d["ring_s_per_flop"], source=tuple(d["source"]), rows=d["rows"],
                       max_rel_err=d["max_rel_err"], info={"path": _display(path)})


# --------------------------------------------------------------------------------------------
# Predictions for a plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Predicted:
    topology: Topology
    step: StepTime
    efficiency: float
    spans_nodes: bool  # a Ulysses group across nodes (generate refuses it; shown for comparison)


def predict_all(preset: str, height: int, width: int, frames: int, topologies, cal: Calibration,
                link: Interconnect | None, kernel: str = "cudnn", cfg_scale: float | None = None) -> list[Predicted]:
    """Every topology's predicted step, in the order given."""
    single = predict(job_for(preset, height, width, frames, Topology(), kernel, cfg_scale), cal)
    out = []
    for t in topologies:
        step = predict(job_for(preset, height, width, frames, t, kernel, cfg_scale), cal, link)
        spans = link is not None and link.gpus_per_node % t.ulysses != 0
        out.append(Predicted(topology=t, step=step, efficiency=efficiency(step, single, t), spans_nodes=spans))
    return out


def fastest(predicted: list[Predicted]) -> Predicted:
    """The fastest topology generate would accept (Ulysses groups inside a node)."""
    allowed = [p for p in predicted if not p.spans_nodes] or predicted
    return min(allowed, key=lambda p: p.step.seconds)


def link_of(args: argparse.Namespace, gpus: int) -> Interconnect | None:
    """The interconnect the flags describe; None: one node as calibrated."""
    per_node = args.gpus_per_node or gpus
    if per_node >= gpus and args.intra_node_gbps is None:
        return None
    return Interconnect(gpus_per_node=per_node, intra_gbps=args.intra_node_gbps, inter_gbps=args.inter_node_gbps,
                        inter_latency_us=args.inter_node_latency_us)


def assumptions(cal: Calibration, link: Interconnect | None, nodes: int, kernel: str) -> list[str]:
    """What a prediction assumes, in words (printed with it)."""
    lines = [f"calibration {cal.info.get('path', cal.gpu)}: {cal.rows} measured steps on {cal.gpu}, "
             f"max error {cal.max_rel_err:.1%}; attention kernel {kernel}; bf16"]
    if link is None or link.intra_gbps is None:
        lines.append("inside a node: the measured NVLink all-to-all rate, ring transfers hidden as measured")
    else:
        lines.append(f"inside a node: {link.intra_gbps:g} GB/s per GPU, {link.intra_latency_us:g} us per message "
                     "(ring transfers overlap their step's attention)")
    if nodes > 1:
        lines.append(f"across {nodes} nodes: {link.inter_gbps:g} GB/s per GPU (one NIC each), "
                     f"{link.inter_latency_us:g} us per message; a ring step's K/V transfer overlaps its "
                     "partial attention, only the excess shows; not measured here: a prediction")
    return lines


def format_predictions(predicted: list[Predicted], chosen: Topology, lines_before: list[str]) -> list[str]:
    best = fastest(predicted)
    out = ["predicted seconds per step (* = the topology generate runs, < = fastest predicted):", *(
        f"  {line}" for line in lines_before),
        "      ulysses x ring   s/step   compute   comm   comm share   efficiency"]
    for p in predicted:
        mark = ("*" if p.topology == chosen else " ") + ("<" if p is best else " ")
        note = "   Ulysses across nodes: refused by generate" if p.spans_nodes else ""
        out.append(f"  {mark} {p.topology.sp_label:>7}  {p.step.seconds:14.3f} {p.step.compute:9.3f} "
                   f"{p.step.comm:6.3f} {p.step.comm_share:10.1%} {p.efficiency:12.1%}{note}")
    if best.topology != chosen:
        mine = next(p for p in predicted if p.topology == chosen)
        gain = 1 - best.step.seconds / mine.step.seconds
        out.append(f"  predicted {gain:.1%} faster: --ulysses {best.topology.ulysses} --ring {best.topology.ring}")
    return out


def prediction_dict(predicted: list[Predicted], chosen: Topology, notes: list[str]) -> dict:
    best = fastest(predicted)
    return {"assumptions": notes, "fastest": best.topology.sp_label, "chosen": chosen.sp_label, "topologies": [
        {"label": p.topology.sp_label, "ulysses": p.topology.ulysses, "ring": p.topology.ring,
         "seconds": p.step.seconds, "compute": p.step.compute, "a2a": p.step.a2a, "ring_s": p.step.ring,
         "cfg_exchange": p.step.cfg_exchange, "comm_share": p.step.comm_share, "efficiency": p.efficiency,
         "spans_nodes": p.spans_nodes} for p in predicted]}


# --------------------------------------------------------------------------------------------
# `python -m launcher calibrate`
# --------------------------------------------------------------------------------------------


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", nargs="+", type=Path, default=list(DEFAULT_RECORDS),
                   help="JSON-lines files of measured steps (default: docs/benchmarks/sweep.jsonl)")
    p.add_argument("--gpu", help="the GPU kind to calibrate when the records hold several (e.g. 'NVIDIA H200')")
    p.add_argument("--out", type=Path, help="where to write (default: configs/calibration/<gpu>.yaml)")


def run_calibrate(args: argparse.Namespace) -> int:
    try:
        cal = calibrate(args.records, args.gpu)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or calibration_path(cal.gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(calibration_yaml(cal))
    print(f"{out}: {cal.rows} rows of {cal.gpu}, max relative error {cal.max_rel_err:.1%}")
    return 0
