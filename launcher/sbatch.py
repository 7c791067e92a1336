"""The sbatch file `python -m launcher slurm` writes: one template, filled by :func:`render_sbatch`.

The template lives here (not under scripts/) so an installed package renders it too;
``scripts/slurm/generate.sbatch`` is one rendering of it, kept equal by a test.

Shape of the job: one Slurm task per node (``srun --ntasks-per-node=1``), each a torchrun that
starts G processes on its node; the torchruns meet through c10d rendezvous on the first node's
address, so torchrun gives node n the ranks [n*G, (n+1)*G). The Ulysses degree divides G (checked
by ``launcher/slurm.py``), so with ``parallel/mesh.py``'s layout every Ulysses group is inside one
node and only ring passes, CFG and dp exchanges cross the network.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass

GENERATE_TEMPLATE = """\
#!/bin/bash
# {{model}} generation on {{nodes}} node(s) x {{nproc}} {{unit}}: {{world}} ranks.
# Rendered by: {{command}}
# Re-render rather than edit the degrees below for another shape.
# Submit from the folder the job should run in (outputs/ and logs/ are relative to it), with the
# Python environment that has the project active, or PYTHON=/path/to/python in the environment:
#     mkdir -p logs && sbatch {{file}}
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
{{sbatch_extra}}#SBATCH --cpus-per-task={{cpus}}
#SBATCH --time={{time}}
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
{{setup}}
# Topology: {{topology}}
{{reason}}
# Node n runs ranks [n*{{nproc}}, (n+1)*{{nproc}}) and rank = ((dp*cfg + c)*ring + r)*ulysses + u, so each
# Ulysses group is {{ulysses}} adjacent ranks inside one node (its all-to-alls stay on NVLink); ring
# passes, CFG and dp go across nodes. The degrees are for {{nodes}} node(s): `sbatch --nodes=...` with
# another count fails validation on every rank (exit 2) instead of running a cross-node Ulysses.

# NCCL across nodes: uncomment what your cluster needs.
# export NCCL_SOCKET_IFNAME=ib0    # interface for NCCL's bootstrap and socket traffic (not lo/docker0)
# export NCCL_IB_HCA=mlx5          # InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP sockets
# export NCCL_DEBUG=INFO           # logs the transport per peer (NET/IB vs NET/Socket) to the job log
# export NCCL_NVLS_ENABLE=0        # NVLink SHARP off where the nodes' fabric manager lacks it (init hangs)
# Timeouts: every collective waits at most --timeout seconds (a launcher flag, default 600); with
# TORCH_NCCL_ASYNC_ERROR_HANDLING (on by default in current torch) a rank that times out aborts,
# its torchrun exits non-zero and srun --kill-on-bad-exit ends the other nodes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-{{omp_threads}}}

PYTHON=${PYTHON:-python3}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
{{out_line}}
mkdir -p "$OUT"
echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s) x {{nproc}}, rendezvous $HEAD:$PORT, outputs in $OUT"

# srun is given --cpus-per-task itself: Slurm 22.05 steps do not inherit it from sbatch.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\
    "$PYTHON" -m torch.distributed.run \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={{nproc}} \\
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \\
    -m launcher generate --output-dir "$OUT" \\
    {{generate_args}}
"""


@dataclass(frozen=True, kw_only=True)
class SbatchJob:
    """Everything the generate template needs; ``generate_args`` are already validated."""

    job_name: str
    nodes: int
    procs_per_node: int  # GPUs per node, or processes per node on CPU
    gpus: bool  # request GPUs (GRES) from Slurm
    cpus_per_task: int
    time: str
    partition: str | None
    account: str | None
    output_dir: str
    generate_args: tuple[str, ...]  # flags and values, unquoted; --ulysses/--ring included
    topology: str
    reason: str
    ulysses: int
    command: str  # the `python -m launcher slurm ...` line that renders this file
    file: str = "FILE.sbatch"
    model: str = "Video"  # the preset, for the header
    mem: str | None = None  # #SBATCH --mem
    sbatch_args: tuple[str, ...] = ()  # more #SBATCH lines, as given
    setup: str | None = None  # the site's shell set-up (module loads, conda activate), run first


def _sbatch_extra(job: SbatchJob) -> str:
    lines = []
    if job.gpus:
        lines.append(f"#SBATCH --gpus-per-node={job.procs_per_node}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    if job.mem:
        lines.append(f"#SBATCH --mem={job.mem}")
    lines += [f"#SBATCH {arg}" for arg in job.sbatch_args]
    return "".join(line + "\n" for line in lines)


def _setup(job: SbatchJob) -> str:
    if not job.setup:
        return ""
    return "\n# Site set-up (--setup), before anything else runs:\n" + job.setup.rstrip("\n") + "\n"


def _arg_lines(args: tuple[str, ...]) -> str:
    """Shell-quoted flags, one flag (with its value) per continued line."""
    groups: list[list[str]] = []
    for a in args:
        if a.startswith("--") or not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in g) for g in groups)


def _out_line(job: SbatchJob) -> str:
    """Where the job writes: a folder per submission, or with --skip-existing one folder for all
    of them, so that a resubmitted (preempted, timed-out) job continues where it stopped."""
    folder = shlex.quote(job.output_dir)
    if "--skip-existing" in job.generate_args:
        return ("# --skip-existing: every submission writes here and skips the prompts already done, so\n"
                "# `sbatch` this file again after a preemption or a time limit and it continues.\n"
                f"OUT={folder}")
    return f'OUT={folder}/"$SLURM_JOB_ID"'


def render_sbatch(job: SbatchJob) -> str:
    """The batch file's text."""
    values = {
        "model": job.model,
        "nodes": job.nodes,
        "nproc": job.procs_per_node,
        "unit": "GPUs" if job.gpus else "CPU processes",
        "world": job.nodes * job.procs_per_node,
        "file": job.file,
        "job_name": job.job_name,
        "sbatch_extra": _sbatch_extra(job),
        "setup": _setup(job),
        "cpus": job.cpus_per_task,
        "time": job.time,
        "topology": job.topology,
        "reason": textwrap.fill(job.reason, 100, initial_indent="# ", subsequent_indent="# "),
        "command": re.sub(r"[\r\n]+", " ", job.command),  # one comment line, whatever the prompt holds
        "ulysses": job.ulysses,
        "omp_threads": max(1, job.cpus_per_task // job.procs_per_node),
        "out_line": _out_line(job),
        "generate_args": _arg_lines(job.generate_args),
    }
    # One pass: text filled in (a prompt holding "{{time}}", say) is never substituted again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), GENERATE_TEMPLATE)
