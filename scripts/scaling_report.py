"""Predicted scaling tables for docs/SCALING.md (and its plot), from `plan --predict`'s model.

    python scripts/scaling_report.py --plot docs/img/scaling.png > /tmp/scaling.md

For each video, 1-64 GPUs at 8 per node, on two kinds of node: NVLink inside (the calibrated rate)
with 50 GB/s per GPU across (400 Gb/s IB/RoCE), and PCIe-only nodes (25 GB/s per GPU inside, the
same network across). Each row is the fastest topology generate accepts (Ulysses inside a node),
with the measured s/step beside it where the sweep records have that exact row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.predict import DEFAULT_RECORDS, fastest, load_calibration, predict_all, read_records  # noqa: E402
from models import get_family  # noqa: E402
from parallel.cost_model import Interconnect  # noqa: E402
from parallel.sequence import shard_length  # noqa: E402
from parallel.topology import factorisations  # noqa: E402

VIDEOS = (("hunyuan-video-13b", 544, 960, 129), ("hunyuan-video-13b", 720, 1280, 129), ("wan2.1-t2v-14b", 720, 1280, 81))
GPUS = (1, 2, 4, 8, 16, 32, 64)
PER_NODE = 8
SMALLEST = 0  # set in main: tokens per rank below every measured row's
NODES = {"nvlink": None, "pcie": 25.0}  # in-node GB/s per GPU (None: the calibrated NVLink rate)


def link(kind: str, gpus: int) -> Interconnect | None:
    intra = NODES[kind]
    if intra is None and gpus <= PER_NODE:
        return None
    return Interconnect(gpus_per_node=min(gpus, PER_NODE), intra_gbps=intra)


def cfg_degree(preset: str, gpus: int) -> int:
    """generate's default: the two passes of classic CFG on separate ranks when the GPUs split."""
    return 2 if get_family(preset).defaults[preset].cfg_scale != 1.0 and gpus % 2 == 0 else 1


def limiter(p, heads: int, sp: int) -> str:
    """What the step spends most on, and why the ring is there when it is."""
    s = p.step
    comm = {"all-to-all": s.a2a, "ring": s.ring, "CFG exchange": s.cfg_exchange}
    top = max(comm, key=comm.get)
    why = f"attention {s.attention / s.seconds:.0%}" + (f", {top} {comm[top] / s.seconds:.0%}" if comm[top] else "")
    if p.topology.ring > 1:
        biggest = max(u for u in range(1, sp + 1) if sp % u == 0 and heads % u == 0 and PER_NODE % u == 0)
        if biggest > p.topology.ulysses:
            why += "; ring cheaper than a wider all-to-all"
        else:
            why += "; ulysses <= 8 per node" if sp > PER_NODE else f"; ulysses must divide {heads} heads"
    return why


def measured_rows() -> dict:
    out = {}
    for r in read_records(DEFAULT_RECORDS):
        if r["backend"] == "native":
            key = (r["model"], r["height"], r["width"], r["frames"], r["gpus"], r["ulysses"], r["ring"])
            out[key] = min(r["seconds"], out.get(key, math.inf))
    return out


def smallest_measured_shard() -> int:
    """The fewest image tokens per rank of any measured row: below it the rates are extrapolated."""
    out = math.inf
    for r in read_records(DEFAULT_RECORDS):
        cfg = get_family(r["model"]).config(r["model"])
        out = min(out, shard_length(math.prod(cfg.token_grid(r["height"], r["width"], r["frames"])),
                                    r["ulysses"] * r["ring"]))
    return out


def rows_for(preset, h, w, f, kind, cal, measured):
    family = get_family(preset)
    heads = family.config(preset).num_heads
    tokens = math.prod(family.config(preset).token_grid(h, w, f))
    out = []
    for g in GPUS:
        cfg = cfg_degree(preset, g)
        topologies = factorisations(g, heads, cfg=cfg)
        best = fastest(predict_all(preset, h, w, f, topologies, cal, link(kind, g)))
        t = best.topology
        m = measured.get((preset, h, w, f, g, t.ulysses, t.ring)) if cfg == 1 and kind == "nvlink" else None
        out.append({"gpus": g, "topology": f"cfg{t.cfg} {t.sp_label}" if t.cfg > 1 else t.sp_label,
                    "tokens_per_rank": shard_length(tokens, t.sp), "seconds": best.step.seconds,
                    "comm_share": best.step.comm_share, "efficiency": best.efficiency, "measured": m,
                    "limit": limiter(best, heads, t.sp)})
    return out


def table(rows) -> list[str]:
    lines = ["| GPUs | topology | tokens/rank | s/step | measured | comm share | efficiency | where the time goes |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        m = f"{r['measured']:.2f}" if r["measured"] else "-"
        small = " (extrapolated)" if r["tokens_per_rank"] < SMALLEST else ""
        lines.append(f"| {r['gpus']} | {r['topology']} | {r['tokens_per_rank']:,}{small} | {r['seconds']:.2f} | {m} | "
                     f"{r['comm_share']:.0%} | {r['efficiency']:.0%} | {r['limit']} |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (video, kind), rows in results.items():
        style = "-" if kind == "nvlink" else "--"
        g = [r["gpus"] for r in rows]
        ax1.plot(g, [r["seconds"] for r in rows], style, marker="o", label=f"{video}, {kind}")
        ax2.plot(g, [r["efficiency"] for r in rows], style, marker="o", label=f"{video}, {kind}")
    for ax, title in ((ax1, "predicted s/step"), (ax2, "predicted efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(GPUS, [str(x) for x in GPUS])
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=7)
    fig.suptitle("plan --predict, H200 calibration; NVLink or PCIe in a node, 50 GB/s per GPU across nodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", type=Path, help="also write the plot here (PNG)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    global SMALLEST
    cal, measured, SMALLEST = load_calibration(), measured_rows(), smallest_measured_shard()
    results = {}
    for preset, h, w, f in VIDEOS:
        for kind in NODES:
            results[(f"{preset} {h}x{w}x{f}", kind)] = rows_for(preset, h, w, f, kind, cal, measured)
    for (video, kind), rows in results.items():
        node = "NVLink nodes (calibrated)" if kind == "nvlink" else f"PCIe-only nodes ({NODES[kind]:g} GB/s per GPU)"
        print(f"#### {video}, {node}\n")
        print("\n".join(table(rows)) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps({f"{v} {k}": rows for (v, k), rows in results.items()}, indent=1))


if __name__ == "__main__":
    main()
