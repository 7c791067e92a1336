"""Seconds per denoising step for a family's forward on a (dp, cfg, ring, ulysses) topology.

Pure arithmetic (no process group, no device): ``launcher/predict.py`` calibrates it from the
sweep records and `plan --predict` prints it. One step on one rank costs

    forwards x [ c_mm * matmul FLOPs                     (the rank's tokens + the whole text)
               + c_elem[family] * tokens x hidden x blocks  (norms, modulation, activations: memory-bound)
               + c_attn[kernel] * attention FLOPs      (self-attention / P, cross-attention local)
               + c_a2a * Ulysses all-to-all bytes      (4 per block: q, k, v out and the output back)
               + c_ring * attention FLOPs * (r-1)/r    (ring steps: partial kernels + fp32 LSE merges)
               + what crosses a slower link than the calibration's ]

The c's are fitted (non-negative least squares on relative error) to measured steps on one node,
so they are effective rates: c_elem holds a family's elementwise passes (their count and dtype
differ by architecture), c_a2a the copies around the collective. Past the measured node the model adds, per block, what the slower link
cannot hide: a Ulysses group across nodes waits for its inter-node share, and a ring step whose
K/V transfer outlasts its partial attention exposes the difference (within a node the measured
ring hides its transfers). Classic CFG on one replica runs two forwards per step; split over
``cfg 2`` each half runs one and the halves exchange their output shards.

Rank layout (``parallel/mesh.py``): rank = ((dp*cfg + c)*ring + r)*ulysses + u, so a Ulysses group
is ``ulysses`` adjacent ranks, ring neighbours are ``ulysses`` ranks apart and CFG partners ``sp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .sequence import shard_length
from .topology import Topology

# Kernel names as records and backends spell them -> the class whose rate applies.
KERNEL_CLASSES = {"cudnn": "cudnn", "torch_cudnn": "cudnn", "lse:cudnn": "cudnn", "flash": "flash",
                  "torch_flash": "flash", "fa2": "flash", "fa3": "flash", "efficient": "efficient",
                  "torch_efficient": "efficient", "math": "math", "torch_math": "math"}
BYTES = 2  # bf16 activations on the wire
FIXED = ("matmul", "a2a", "ring")  # columns of the fit besides the per-family and per-kernel rates


def kernel_class(kernel: str) -> str:
    try:
        return KERNEL_CLASSES[kernel]
    except KeyError:
        raise ValueError(f"attention kernel {kernel!r}; known: {', '.join(sorted(KERNEL_CLASSES))}") from None


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """Per-GPU links. ``intra_gbps`` None: the calibration's fitted in-node rate (NVLink where it
    was measured); set it for other nodes (e.g. PCIe). Inter-node: GB/s per GPU (400 Gb/s IB/RoCE
    = 50 GB/s, one NIC per GPU) and a per-message latency."""

    gpus_per_node: int
    intra_gbps: float | None = None
    inter_gbps: float = 50.0
    inter_latency_us: float = 10.0
    intra_latency_us: float = 5.0  # only used with intra_gbps set (the fitted rate includes it)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Fitted seconds per unit for one GPU kind (see the module docstring)."""

    gpu: str
    matmul_s_per_flop: float
    elementwise_s: Mapping[str, float]  # per family: seconds per token x hidden channel x block
    attention_s_per_flop: Mapping[str, float]  # per kernel class
    a2a_s_per_byte: float
    ring_s_per_flop: float
    source: tuple[str, ...] = ()
    rows: int = 0
    max_rel_err: float = 0.0
    info: Mapping[str, str] = field(default_factory=dict)

    def rate(self, table: str, key: str) -> float:
        rates = self.elementwise_s if table == "elementwise" else self.attention_s_per_flop
        if key not in rates:
            raise ValueError(f"calibration for {self.gpu} has no {table} rate for {key!r}; "
                             f"measured: {', '.join(sorted(rates))} (run a sweep with it, then calibrate)")
        return rates[key]


@dataclass(frozen=True, kw_only=True)
class Job:
    """What the model needs of one job: its forward, topology, kernel and whether it runs classic CFG."""

    family: str
    work: object  # models.cost.ForwardWork
    topology: Topology
    kernel: str = "cudnn"
    classic_cfg: bool = False

    @property
    def forwards(self) -> int:
        """Forwards per step on one rank: two for classic CFG on one replica, else one."""
        return 2 if self.classic_cfg and self.topology.cfg == 1 else 1


def features(job: Job) -> dict[str, float]:
    """The per-step quantities the rates multiply, on one rank: matmul FLOPs, elementwise work
    (tokens x hidden x blocks), attention FLOPs, all-to-all bytes, ring FLOPs (the attention that
    ring steps do in parts)."""
    w, t = job.work, job.topology
    local = shard_length(w.image_tokens, t.sp)
    attention = w.self_attention_flops(local * t.sp) / t.sp + w.cross_attention_flops(local)
    # Each of the 4 all-to-alls moves the rank's [local, heads, head_dim] less the part it keeps.
    a2a = 4 * local * w.hidden * BYTES * (t.ulysses - 1) / t.ulysses * w.blocks
    n = job.forwards
    return {"matmul": n * (w.token_flops * local + w.shared_flops), "elementwise": n * local * w.hidden * w.blocks,
            "attention": n * attention,
            "a2a": n * a2a, "ring": n * attention * (t.ring - 1) / t.ring}


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """Predicted seconds of one step on one rank, by part."""

    compute: float  # token-wise work and attention kernels
    attention: float  # the attention kernels' part of compute
    a2a: float
    ring: float  # ring overhead, plus transfers a slower link exposes
    cfg_exchange: float
    seconds: float

    @property
    def comm(self) -> float:
        return self.a2a + self.ring + self.cfg_exchange

    @property
    def comm_share(self) -> float:
        return self.comm / self.seconds if self.seconds else 0.0


def predict(job: Job, cal: Calibration, link: Interconnect | None = None) -> StepTime:
    """Seconds per step of ``job``; ``link`` None: one node like the calibration's."""
    f, t, w = features(job), job.topology, job.work
    attn_rate = cal.rate("attention", kernel_class(job.kernel))
    compute = (cal.matmul_s_per_flop * f["matmul"] + cal.rate("elementwise", job.family) * f["elementwise"]
               + attn_rate * f["attention"])
    a2a, ring = cal.a2a_s_per_byte * f["a2a"], cal.ring_s_per_flop * f["ring"]
    cfg = 0.0
    if link is not None:
        a2a = _a2a_seconds(job, f["a2a"], a2a, cal, link)
        ring += _ring_exposed(job, attn_rate * f["attention"], cal, link)
        cfg = _cfg_exchange(job, cal, link)
    return StepTime(compute=compute, attention=attn_rate * f["attention"], a2a=a2a, ring=ring, cfg_exchange=cfg,
                    seconds=compute + a2a + ring + cfg)


def _intra_s_per_byte(cal: Calibration, link: Interconnect) -> float:
    return cal.a2a_s_per_byte if link.intra_gbps is None else 1.0 / (link.intra_gbps * 1e9)


def _a2a_seconds(job: Job, nbytes: float, fitted: float, cal: Calibration, link: Interconnect) -> float:
    """A Ulysses group inside a node: the fitted (or given) in-node rate. Across nodes the share
    to peers on other nodes goes at the inter-node rate, in parallel with the in-node share."""
    u, g = job.topology.ulysses, link.gpus_per_node
    if u == 1:
        return 0.0
    intra = _intra_s_per_byte(cal, link)
    messages = 4 * job.work.blocks * job.forwards
    if u <= g and g % u == 0:
        latency = 0.0 if link.intra_gbps is None else messages * link.intra_latency_us * 1e-6
        return (fitted if link.intra_gbps is None else nbytes * intra) + latency
    per_peer = nbytes / (u - 1)
    local_peers = g - 1 if g < u else u - 1
    inside = local_peers * per_peer * intra
    outside = (u - 1 - local_peers) * per_peer / (link.inter_gbps * 1e9)
    return max(inside, outside) + messages * link.inter_latency_us * 1e-6


def _ring_exposed(job: Job, attention_s: float, cal: Calibration, link: Interconnect) -> float:
    """Per block and ring step: the K/V transfer to the next rank against that step's partial
    attention; what the transfer takes longer is exposed. Inside a measured node: nothing (the
    fitted ring rate holds its cost); a slower link (across nodes, or a given in-node rate) can."""
    t, w = job.topology, job.work
    if t.ring == 1:
        return 0.0
    across = t.sp > link.gpus_per_node
    if not across and link.intra_gbps is None:
        return 0.0
    s_per_byte = 1.0 / ((link.inter_gbps if across else link.intra_gbps) * 1e9)
    latency = (link.inter_latency_us if across else link.intra_latency_us) * 1e-6
    kv = 2 * shard_length(w.image_tokens, t.ring) * (w.heads // t.ulysses) * w.head_dim * BYTES
    steps = (t.ring - 1) * w.blocks * job.forwards
    per_step_attention = attention_s / (t.ring * w.blocks * job.forwards)
    return steps * max(0.0, kv * s_per_byte + 2 * latency - per_step_attention)


def _cfg_exchange(job: Job, cal: Calibration, link: Interconnect) -> float:
    """CFG split over two rank sets: once per step each rank swaps its output shard (fp32) with its
    partner ``sp`` ranks away, on another node when the pair does not fit in one."""
    t, w = job.topology, job.work
    if t.cfg == 1:
        return 0.0
    nbytes = shard_length(w.image_tokens, t.sp) * w.out_features * 4
    if 2 * t.sp <= link.gpus_per_node:
        return nbytes * _intra_s_per_byte(cal, link)
    return nbytes / (link.inter_gbps * 1e9) + link.inter_latency_us * 1e-6


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def columns(jobs: list[Job]) -> list[str]:
    """Fit columns: an elementwise rate per family and an attention rate per kernel class seen, then FIXED."""
    fams = sorted({j.family for j in jobs})
    kernels = sorted({kernel_class(j.kernel) for j in jobs})
    return [f"elementwise:{f}" for f in fams] + [f"attention:{k}" for k in kernels] + list(FIXED)


def design_row(job: Job, cols: list[str]) -> list[float]:
    f = features(job)
    values = {f"elementwise:{job.family}": f["elementwise"], f"attention:{kernel_class(job.kernel)}": f["attention"],
              "matmul": f["matmul"], "a2a": f["a2a"], "ring": f["ring"]}
    return [values.get(c, 0.0) for c in cols]


def fit(jobs: list[Job], seconds: list[float], gpu: str, source: tuple[str, ...] = ()) -> Calibration:
    """The rates that minimise the squared relative error of every measured step, all >= 0."""
    if not jobs:
        raise ValueError("no measured rows to calibrate from")
    cols = columns(jobs)
    a = torch.tensor([design_row(j, cols) for j in jobs], dtype=torch.float64)
    t = torch.tensor(seconds, dtype=torch.float64)
    rel = a / t[:, None]
    scale = rel.norm(dim=0).clamp_min(1e-300)  # unit columns: FLOPs and bytes differ by 10^4
    x = nnls(rel / scale, torch.ones(len(jobs), dtype=torch.float64)) / scale
    coef = dict(zip(cols, x.tolist()))
    err = ((a @ x) / t - 1).abs().max().item()
    return Calibration(
        gpu=gpu, matmul_s_per_flop=coef["matmul"],
        elementwise_s={c.split(":")[1]: v for c, v in coef.items() if c.startswith("elementwise:")},
        attention_s_per_flop={c.split(":")[1]: v for c, v in coef.items() if c.startswith("attention:")},
        a2a_s_per_byte=coef["a2a"], ring_s_per_flop=coef["ring"], source=source, rows=len(jobs), max_rel_err=err,
    )


def nnls(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lawson-Hanson non-negative least squares: argmin ||a x - b|| over x >= 0."""
    n = a.shape[1]
    x, passive = torch.zeros(n, dtype=a.dtype), []
    for _ in range(3 * n):
        grad = a.T @ (b - a @ x)
        free = [j for j in range(n) if j not in passive]
        if not free or max(grad[j].item() for j in free) <= 1e-12:
            break
        passive.append(max(free, key=lambda j: grad[j].item()))
        while True:
            z = torch.zeros(n, dtype=a.dtype)
            z[passive] = torch.linalg.lstsq(a[:, passive], b[:, None]).solution[:, 0]
            if all(z[j] > 0 for j in passive):
                x = z
                break
            # Step back to the boundary and drop the variables that reached zero.
            alpha = min(x[j] / (x[j] - z[j]) for j in passive if z[j] <= 0)
            x = x + alpha * (z - x)
            passive = [j for j in passive if x[j] > 1e-300]
    return x


def efficiency(step: StepTime, single: StepTime, topology: Topology) -> float:
    """Speedup over one GPU per GPU of the replica (sp x cfg GPUs make one video)."""
    gpus = topology.sp * topology.cfg
    return single.seconds / (step.seconds * gpus) if step.seconds else math.nan
