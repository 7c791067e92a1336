"""Summarise scripts/gpu_lowmem_bench.sh (one GPU, small budgets): per run, s/step from the second
step, the device-level peak (the allocator's reserved peak plus what lived outside it), whether it
held the budget, the cost against the plain run of the same size, what lived outside the
allocator (the one-process CUDA context, which the planner counts as SINGLE_CONTEXT), the
placement and its estimate, and the latents' error against plain; JSON lines, then the table."""

from __future__ import annotations

from gpu_memory_summary import measured_rows
from gpu_summary_util import cell, parse_args, print_table

REFERENCE = {"384x512": "plain_384", "720x1280": "plain_720"}


def _cells(row: dict, base: dict[str, float]) -> list[str]:
    budget = row["budget_gib"]
    held = "-" if budget is None else ("yes" if row["peak_gib"] <= budget else "NO")
    versus = f"{row['seconds'] / base[row['size']]:.3f}" if row["size"] in base else "-"
    return [row["run"], f"{row['size']}x{row['frames']}", cell(row, "budget_gib", ".0f"), str(row["placement"]),
            f"{row['seconds']:.3f}", versus, f"{row['peak_gib']:.2f}", held, f"{row['outside_gib']:.2f}",
            f"{row['estimate_gib']:.2f}", cell(row, "rel_err_vs_bf16", ".2e"), "yes" if row["fallback_after_oom"] else "no"]


def main() -> None:
    rows, base = measured_rows(parse_args(__doc__), REFERENCE)
    header = ["run", "size", "budget GiB", "placement", "s/step", "vs plain", "device peak GiB", "held",
              "outside allocator GiB", "estimate GiB", "rel err vs plain", "OOM fallback"]
    print_table(header, rows, lambda r: _cells(r, base))


if __name__ == "__main__":
    main()
