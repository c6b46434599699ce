"""How far were a run's new directions from being absorbed by SD-LoRA-KD? (paper Eq. 7, ``kd_tau``)

For each run directory, the adapter of the checkpoint its ``results.json`` commits to is rebuilt and every kept
frozen direction ``j >= 1`` of every adapted projection is fitted by the directions kept before it
(:meth:`sdlora.lora.SDLoRAModel.direction_residuals`, the least squares SD-LoRA-KD solves at the end of task
``j``). Printed per direction: the smallest, median and largest residual over the projections, and how many of
them would pass ``--tau`` (default: the run's own ``adapter.kd_tau``). Works on any SD-LoRA-family run, KD or
not: a plain ``sdlora`` run shows what KD would have decided on the same directions (up to the directions KD
itself would have dropped earlier). In a projection that absorbed a direction or dropped one (a zero product),
the later directions shift: direction ``j`` is then no longer task ``j``'s.

Usage::

    PYTHONPATH=src python benchmarks/kd_residuals.py RUN_DIR [RUN_DIR ...] [--tau 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from sdlora.lora import SDLoRAModel
from sdlora.rundir import RunError, build_method_from_run


def summarise(run_dir: str, tau: float | None) -> str:
    """One table (markdown) for one run directory."""
    method, cfg, record = build_method_from_run(run_dir, device="cpu")
    adapter = getattr(method, "adapter", None)
    if not isinstance(adapter, SDLoRAModel):
        raise RunError(f"{run_dir}: method {cfg.method.name!r} has no SD-LoRA adapter to inspect")
    threshold = adapter.config.kd_tau if tau is None else tau
    kind = "squared residual" if adapter.config.kd_squared_residual else "residual"
    per_unit = adapter.direction_residuals()
    n_dirs = max((len(v) for v in per_unit.values()), default=0)
    lines = [
        f"{run_dir}: method {cfg.method.name}, {len(per_unit)} adapted projections, checkpoint after task "
        f"{record['task']}, {kind} vs tau = {threshold:g}",
        "",
        "| direction | projections | min | median | max | <= tau |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for j in range(n_dirs):
        values = [v[j] for v in per_unit.values() if len(v) > j]
        passed = sum(v <= threshold for v in values)
        lines.append(
            f"| {j + 1} | {len(values)} | {min(values):.4f} | {statistics.median(values):.4f} | {max(values):.4f} "
            f"| {passed} |"
        )
    if n_dirs == 0:
        lines.append("| (no direction after the first) | | | | | |")
    for entry in adapter.kd_log:
        lines.append("")
        lines.append(f"kd_log: {entry}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (sdlora run / compare outputs)")
    parser.add_argument("--tau", type=float, default=None, help="threshold to count against (default: the run's)")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.runs:
        try:  # build_method_from_run names what is missing (no run directory, no results.json, no checkpoint)
            print(summarise(run_dir, args.tau))
        except RunError as err:
            print(f"kd_residuals: {err}", file=sys.stderr)
            status = 2
        print()
    return status


if __name__ == "__main__":
    sys.exit(main())
