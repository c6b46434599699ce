"""The reports of ``bench_core.py``: the markdown tables against the goals, and the arithmetic (flops per route)
that ``--flops-only`` prints without running anything.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from core_models import TARGETS, add_plain_lora, build_backbone, build_sdlora, tokens_per_image
from core_timing import count_flops, train_step

from sdlora.lora import SDLoRAModel, route_costs
from sdlora.lora.layer import FACTORED_EFFICIENCY

GOAL_PLAIN = 1.05  # step time / plain LoRA step, at every task count
GOAL_TIME = 1.05  # step time at a task / task 1, same mode
GOAL_MEM = 1.10  # peak memory at a task / task 1, same mode
GOAL_MERGED = 1.02  # merged inference / bare backbone


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}"


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(v: float | None, goal: float) -> str:
    return "-" if v is None else ("yes" if v <= goal else "**no**")


class Results:
    """Every run of every configuration: ``runs[key]`` is a list (one entry per ``--runs``)."""

    def __init__(self) -> None:
        self.runs: dict[tuple, list[dict[str, Any]]] = {}

    def ok(self, key: tuple) -> list[dict[str, Any]]:
        return [r for r in self.runs.get(key, []) if "error" not in r]

    def get(self, key: tuple, field: str) -> float | None:
        """Median over the runs (the value itself with one run)."""
        vals = [r[field] for r in self.ok(key) if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    def span(self, key: tuple, field: str) -> str:
        vals = [r[field] for r in self.ok(key) if r.get(field) is not None]
        return f"{min(vals):.3f}-{max(vals):.3f}" if len(vals) > 1 else "-"

    def first(self, key: tuple, field: str) -> Any:
        return next((r[field] for r in self.ok(key) if field in r), None)

    def errors(self) -> list[tuple[tuple, str]]:
        return [(k, r["error"]) for k, rs in self.runs.items() for r in rs if "error" in r]


def report(args: argparse.Namespace, res: Results, header: dict[str, str]) -> str:
    """The whole markdown report: the header, then one section per table."""
    lines: list[str] = []
    w = lines.append
    w("# sdlora core benchmark")
    w("")
    for k, v in header.items():
        w(f"- {k}: {v}")
    w("")
    step_time_section(args, res, w)
    memory_section(args, res, w)
    arithmetic(args, res, w)
    fastest_section(args, res, w)
    if not args.skip_inference:
        inference_section(args, res, w)
    goals_section(args, res, w)
    return "\n".join(lines)


def vs_first(res: Results, first: int, mode: str, t: int, field: str) -> float | None:
    """Ratio to the first task count of the same mode (time: quotient of the paired ratios)."""
    return div(res.get(("train", mode, t), field), res.get(("train", mode, first), field))


def quart(res: Results, key: tuple) -> str:
    """The quartiles of a configuration's per-round ratios, as text."""
    q1, q3 = res.get(key, "ratio_q1"), res.get(key, "ratio_q3")
    return "-" if q1 is None or q3 is None else f"{q1:.3f}-{q3:.3f}"


def step_time_section(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """Training step time of every configuration, paired against the plain-LoRA reference."""
    tasks, modes, first, plain = args.tasks, args.modes, args.tasks[0], ("train", "plain")
    w(
        f"## Training step time (forward + backward + SGD step; {args.warmup} warm-up, {args.reps} timed rounds"
        f"{f', {args.runs} runs' if args.runs > 1 else ''})"
    )
    w("")
    w(
        f"Each configuration is timed interleaved (ABBA) with a plain rank-{args.rank} LoRA step built in the same "
        "process: *x plain LoRA* is the median of the per-round ratios, *round quartiles* their spread, "
        f"*x task {first}* the quotient of two such ratios"
        + (
            f"; with {args.runs} runs every figure is the median over runs and *runs* the range of x plain LoRA"
            if args.runs > 1
            else ""
        )
        + ". *flops x plain*: matmul/attention flops of one step (``torch.utils.flop_counter``) over the "
        "reference's. *route*: how the frozen magnitudes' gradients were computed."
    )
    w("")
    w(
        f"| configuration | task | route | step ms | x plain LoRA | round quartiles | runs | x task {first} | "
        "flops x plain | other load |"
    )
    w("|---|---:|---|---:|---:|---|---|---:|---:|---:|")
    if res.ok(plain):
        w(
            f"| plain LoRA (reference) | - | - | {fmt(res.get(plain, 'ms'))} | 1.000 | - | - | - | 1.000 | "
            f"{fmt(res.get(plain, 'other_load'), '.2f')} |"
        )
    for key, label in (
        (("train", "library_plain"), "library plain LoRA (`seq_lora` config)"),
        (("train", "plain_slice"), "plain LoRA, in-place slice add (previous reference)"),
    ):
        if res.ok(key):
            w(
                f"| {label} | - | - | {fmt(res.get(key, 'ms'))} | "
                f"{fmt(res.get(key, 'ratio'), '.3f')} | {quart(res, key)} | {res.span(key, 'ratio')} | - | "
                f"{fmt(div(res.get(key, 'flops'), res.get(key, 'ref_flops')), '.3f')} | "
                f"{fmt(res.get(key, 'other_load'), '.2f')} |"
            )
    for mode in modes:
        for t in tasks:
            key = ("train", mode, t)
            if key not in res.runs:
                continue
            if not res.ok(key):
                w(f"| {mode} | {t} | error | | | | | | | |")
                continue
            w(
                f"| {mode} | {t} | {res.first(key, 'route') or '-'} | {fmt(res.get(key, 'ms'))} | "
                f"{fmt(res.get(key, 'ratio'), '.3f')} | {quart(res, key)} | {res.span(key, 'ratio')} | "
                f"{fmt(vs_first(res, first, mode, t, 'ratio'), '.3f')} | "
                f"{fmt(div(res.get(key, 'flops'), res.get(key, 'ref_flops')), '.3f')} | "
                f"{fmt(res.get(key, 'other_load'), '.2f')} |"
            )
    w("")


def memory_section(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """Peak memory and bytes saved for backward per configuration."""
    tasks, modes, first, plain, lib = (
        args.tasks,
        args.modes,
        args.tasks[0],
        ("train", "plain"),
        ("train", "library_plain"),
    )
    w("## Training memory")
    w("")
    w(
        "peak MiB: high-water mark above the bare backbone over the warm-up steps (adapter state, optimiser, "
        "activations, gradients), before the reference is built; saved MiB: distinct tensors autograd keeps for "
        "backward in one step (parameters and buffers excluded; exact, independent of the allocator)."
    )
    w("")
    w(
        f"| configuration | task | peak MiB | x task {first} | x plain LoRA | saved MiB | saved x task {first} | "
        "saved x plain LoRA |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    pk, sv = res.get(plain, "peak_mib"), res.get(plain, "saved_mib")
    if res.ok(plain):
        w(f"| plain LoRA (reference) | - | {fmt(pk, '.0f')} | - | 1.000 | {fmt(sv)} | - | 1.000 |")
    if res.ok(lib):
        lp, ls = res.get(lib, "peak_mib"), res.get(lib, "saved_mib")
        w(
            f"| library plain LoRA | - | {fmt(lp, '.0f')} | - | {fmt(div(lp, pk), '.3f')} | {fmt(ls)} | - | "
            f"{fmt(div(ls, sv), '.3f')} |"
        )
    for mode in modes:
        for t in tasks:
            key = ("train", mode, t)
            if not res.ok(key):
                continue
            p, s = res.get(key, "peak_mib"), res.get(key, "saved_mib")
            w(
                f"| {mode} | {t} | {fmt(p, '.0f')} | {fmt(vs_first(res, first, mode, t, 'peak_mib'), '.3f')} | "
                f"{fmt(div(p, pk), '.3f')} | {fmt(s)} | {fmt(vs_first(res, first, mode, t, 'saved_mib'), '.3f')} | "
                f"{fmt(div(s, sv), '.3f')} |"
            )
    w("")


def fastest_section(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """The fastest compute mode at each task count."""
    tasks, modes = args.tasks, args.modes
    w("## Fastest compute mode per task count (training step, x plain LoRA)")
    w("")
    w("| task | " + " | ".join(modes) + " | fastest |")
    w("|---:|" + "---:|" * len(modes) + "---|")
    for t in tasks:
        got = {m: v for m in modes if (v := res.get(("train", m, t), "ratio")) is not None}
        best = min(got, key=lambda m: got[m]) if got else None
        w(f"| {t} | " + " | ".join(fmt(got.get(m), ".3f") for m in modes) + f" | {best or '-'} |")
    w("")


def inference_section(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """Inference after the last task: bare, merged and unmerged models, paired against the bare backbone."""
    w(
        f"## Inference after {args.infer_task} tasks (no_grad forward, eval mode; {args.warmup} warm-up, "
        f"{args.infer_reps} timed rounds)"
    )
    w("")
    w(
        "Each row is timed interleaved with a bare backbone built in the same process (*x bare*, paired). The "
        "unmerged model folds its components into a cached weight at the first call and reuses it until a "
        "tensor it depends on changes; `stacked` and `loop` never fold (references)."
    )
    w("")
    w("| model | batch | forward ms | bare ms (same process) | x bare | round quartiles | other load |")
    w("|---|---:|---:|---:|---:|---|---:|")
    for bsz in args.infer_batch:
        rows = [("bare backbone", ("infer", "bare", bsz)), ("merge_and_unload()", ("infer", "merged", bsz))]
        rows += [(f"unmerged, compute={m}", ("infer", "unmerged", m, bsz)) for m in args.infer_modes]
        for label, key in rows:
            if key not in res.runs:
                continue
            if not res.ok(key):
                w(f"| {label} | {bsz} | error | | | | |")
                continue
            bare = label == "bare backbone"
            w(
                f"| {label} | {bsz} | {fmt(res.get(key, 'ms'), '.2f')} | {fmt(res.get(key, 'ref_ms'), '.2f')} | "
                f"{'1.000' if bare else fmt(res.get(key, 'ratio'), '.3f')} | {'-' if bare else quart(res, key)} | "
                f"{fmt(res.get(key, 'other_load'), '.2f')} |"
            )
    diffs = [res.get(("infer", "merged", b), "max_abs_diff") for b in args.infer_batch]
    diffs = [d for d in diffs if d is not None]
    if diffs:
        w("")
        w(f"max |merged - unmerged| over the batch's features: {max(diffs):.2e}")
    w("")


def goals_section(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """Every figure against its goal, then the configurations that failed."""
    tasks, modes, first = args.tasks, args.modes, args.tasks[0]
    w("## Goals")
    w("")
    w("| check | goal | task | " + " | ".join(modes) + " |")
    w("|---|---:|---:|" + "---:|" * len(modes))
    checks: list[tuple[str, float, Callable[[str, int], float | None], list[int]]] = [
        ("step time x plain LoRA", GOAL_PLAIN, lambda m, t: res.get(("train", m, t), "ratio"), tasks),
        (f"step time x task {first}", GOAL_TIME, lambda m, t: vs_first(res, first, m, t, "ratio"), tasks[1:]),
        (f"peak memory x task {first}", GOAL_MEM, lambda m, t: vs_first(res, first, m, t, "peak_mib"), tasks[1:]),
        (
            f"saved for backward x task {first}",
            GOAL_MEM,
            lambda m, t: vs_first(res, first, m, t, "saved_mib"),
            tasks[1:],
        ),
    ]
    for label, goal, fn, ts in checks:
        for t in ts:
            cells = [f"{fmt(v, '.3f')} ({verdict(v, goal)})" for v in (fn(m, t) for m in modes)]
            w(f"| {label} | <= {goal:.2f} | {t} | " + " | ".join(cells) + " |")
    if not args.skip_inference:
        for bsz in args.infer_batch:
            v = res.get(("infer", "merged", bsz), "ratio")
            w("")
            w(
                f"merged inference x bare backbone, batch {bsz} (paired): {fmt(v, '.3f')} "
                f"(goal <= {GOAL_MERGED:.2f}: {verdict(v, GOAL_MERGED)})"
            )
    err = res.errors()
    if err:
        w("")
        w("## Errors")
        w("")
        for k, e in err:
            w(f"- {' '.join(map(str, k))}: {e}")


def arithmetic(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """What exact magnitude gradients must cost on top of the plain step, from ``route_costs``, next to the flops
    counted in the step that ran."""
    plain_flops = res.get(("train", "plain"), "flops")
    macs = {t: res.first(("train", m, t), "route_macs") for m in args.modes for t in args.tasks}
    macs = {t: v for t, v in macs.items() if v}
    if not plain_flops or not macs:
        return
    counted = {t: res.get(("train", "auto", t), "flops") for t in args.tasks}
    arithmetic_table(
        args,
        plain_flops,
        res.get(("train", "auto", args.tasks[0]), "flops"),
        res.first(("train", "plain"), "tokens"),
        macs,
        counted,
        w,
    )


def arithmetic_table(
    args: argparse.Namespace,
    plain_flops: float,
    auto1_flops: float | None,
    tokens: int | None,
    macs: dict[int, dict[str, int]],
    counted: dict[int, float | None],
    w: Callable[[str], None],
) -> None:
    w("## Arithmetic: the extra work of exact magnitude gradients")
    w("")
    w(
        "Flops of the plain-LoRA reference step (counted): "
        f"{plain_flops / 1e9:.1f} GFLOP; tokens per step T = {tokens}. At task t every adapted projection stores "
        f"R = {args.rank}(t-1) frozen ranks. On top of the plain step, exact gradients of the frozen magnitudes cost "
        "(in flops, 2 per multiply-add, summed over the adapted layers): the fold ``W0 + B diag(s) A`` "
        "(d_out d_in R per projection) plus either the `fold` route (adapted rows' weight gradient: "
        "T d_in d_out + d_out d_in R) or the `factored` route (rank-R projections: T R (d_in + d_out)); `auto` takes "
        "the one it expects to be faster (*auto's route*; the factored route's skinny GEMMs are weighted as running "
        f"at {FACTORED_EFFICIENCY}x the fold route's multiply-add rate). *predicted* adds that route to the counted "
        "flops of `auto` at task 1; *counted* is what the step that ran did."
    )
    w("")
    w(
        "| task | R per projection | fold route x plain | factored route x plain | auto's route | predicted x plain | "
        "counted x plain (auto) |"
    )
    w("|---:|---:|---:|---:|---|---:|---:|")
    for t, m in sorted(macs.items()):
        fold = 2 * (m["fold"] + m["fold_weight"]) / plain_flops
        fact = 2 * (m["factored"] + m["fold_weight"]) / plain_flops
        route = "fold" if m["fold"] < m["factored"] / FACTORED_EFFICIENCY else "factored"
        pred = div((auto1_flops or 0) + 2 * (m[route] + m["fold_weight"]), plain_flops)
        w(
            f"| {t} | {args.rank * (t - 1)} | +{fold:.3f} | +{fact:.3f} | {route} | {fmt(pred, '.3f')} | "
            f"{fmt(div(counted.get(t), plain_flops), '.3f')} |"
        )
    w("")


def route_macs(model: SDLoRAModel, tokens: int, stored_rank: int) -> dict[str, int]:
    """``route_costs`` summed over the model's adapted layers if every unit stored ``stored_rank`` frozen ranks,
    plus the fold's own multiply-adds (``fold_weight``)."""
    macs = {"fold": 0, "factored": 0, "fold_weight": 0}
    for layer in model.layers():
        shapes = [(u.out_features, stored_rank) for u in layer.units]
        for k, v in route_costs(tokens, layer.in_features, shapes).items():
            macs[k] += v
        macs["fold_weight"] += sum(d_out * layer.in_features * r for d_out, r in shapes)
    return macs


def flops_only(args: argparse.Namespace) -> str:
    """The arithmetic table without running anything: flops counted on the meta device (no memory, no compute)
    for the plain-LoRA step and the library's task-1 step, the rest from ``route_costs``."""
    cfg = {
        "model": args.model,
        "img_size": args.img_size,
        "seed": args.seed,
        "device": "meta",
        "num_classes": args.num_classes,
        "amp": "none",
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to("meta")
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to("meta")
    backbone = build_backbone(cfg)
    tokens = args.batch * tokens_per_image(backbone)
    plain = add_plain_lora(backbone, args.rank)
    step, _, _ = train_step(plain, [p for p in plain.parameters() if p.requires_grad], cfg, x, y)
    plain_flops = count_flops(step)
    sd = build_sdlora(build_backbone(cfg), "auto", 1, args.rank, end_last=False)
    step, _, _ = train_step(sd, sd.trainable_parameters(), cfg, x, y)
    auto1 = count_flops(step)
    lines: list[str] = [
        "# sdlora core benchmark: arithmetic only (flops counted on the meta device, nothing timed)",
        "",
        f"- command: {shlex.join([sys.executable, *sys.argv])}",
        f"- setup: {args.model}, img {args.img_size}, batch {args.batch}, rank {args.rank}, official protocol, "
        f"targets {TARGETS[0]} (q,v)",
        "",
    ]
    macs = {t: route_macs(sd, tokens, args.rank * (t - 1)) for t in args.tasks}
    arithmetic_table(args, plain_flops, auto1, tokens, macs, {args.tasks[0]: auto1}, lines.append)
    return "\n".join(lines)
