#!/usr/bin/env python
"""End-to-end simulation of SD-LoRA on ImageNet-R N=10 (official protocol): projected wall time and peak memory.

Runs the real engine (``sdlora.engine.run_experiment``) on the ``imagenet_r_n10_official`` preset with two
substitutions that need neither the dataset nor the pretrained weights: a random-init ViT-B/16 (same shapes and cost
as the pretrained one) and the ``synthetic`` dataset at the real split's size (200 classes, 24,000 training and 6,000
test images, 120 / 30 per class, fed at 224 px through the preset's transforms; the images are stored at 32 px and
resized by those transforms, so JPEG decoding of real ImageNet-R files is *not* part of the measurement). Everything
else is the preset: 10 tasks of 20 classes, batch 128, SGD lr 8e-3, evaluation on all seen classes after each task, a
checkpoint after each task; on top of it bf16 autocast (``train.amp=true``, which the preset leaves off; ``--no-amp``
for float32).

The preset's 20 epochs per task are shortened to ``--epochs`` (default 1) and extrapolated: per task, projected
training time = measured training time x 20 / epochs (an upper bound: the per-task fixed costs and the first
steps' warm-up are scaled too), evaluation and setup as measured. It reports the projected wall time, the
per-task training time relative to its median (flat within +-5% is the goal) and the peak GPU memory
(``torch.cuda.max_memory_allocated`` over the whole run; goal <= 13 GB at batch 128).

``--amp-check`` (default on) adds two short runs of the first tasks (``--check-tasks``, ``--check-epochs``), in
bf16 autocast and in float32, and compares their accuracy.

Usage::

    python benchmarks/sim_imagenet_r.py --device cuda --out runs/sim-imagenet-r      # the real sizes (GPU)
    python benchmarks/sim_imagenet_r.py --tiny                                         # CPU check, < 2 min

``--tiny`` shrinks everything (the 32-px test ViT, 20 classes, a few images, CPU) to verify the script itself; its
numbers say nothing about a GPU run. On CPU the engine refuses autocast (float32 with a warning), so the amp
check compares float32 with float32 there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from sdlora.methods import load_run_config
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdlora.methods import load_run_config
from sdlora.engine import run_experiment

PRESET = "imagenet_r_n10_official"
FULL_EPOCHS = 20  # the preset's epochs per task
GOAL_MINUTES = 35.0
GOAL_PEAK_GB = 13.0
GOAL_FLAT = 0.05


def overrides(args: argparse.Namespace, *, epochs: int, amp: bool, tasks: int | None = None) -> list[str]:
    o = [
        f"backbone.name={args.model}",
        "backbone.pretrained=false",
        "backbone.expected_tag=null",
        "data.name=synthetic",
        "data.root=null",
        "data.format=null",
        f"data.synthetic_classes={args.classes}",
        f"data.train_per_class={args.train_per_class}",
        f"data.test_per_class={args.test_per_class}",
        f"data.image_size={args.img_size}",
        f"data.num_workers={args.workers}",
        f"scenario.init_cls={args.classes // 10}",
        f"scenario.increment={args.classes // 10}",
        f"train.epochs={epochs}",
        f"train.batch_size={args.batch}",
        f"train.eval_batch_size={args.eval_batch}",
        f"train.amp={str(amp).lower()}",
        f"train.device={args.device}",
    ]
    if tasks is not None:
        o.append(f"scenario.num_tasks={tasks}")
    return o + list(args.set)


def run(args: argparse.Namespace, out: Path, ov: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    cfg, _ = load_run_config(PRESET, ov)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    results = run_experiment(cfg, out, overwrite=True)
    mem = {"wall_s": time.perf_counter() - t0}
    if cuda:
        mem["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        mem["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return results, mem


def project(results: dict[str, Any], wall: float, epochs: int) -> dict[str, Any]:
    log = results["task_log"]
    train = [float(e["train_time_s"]) for e in log]
    evals = [float(e["eval_time_s"]) for e in log]
    setup = max(0.0, wall - sum(train) - sum(evals))
    scale = FULL_EPOCHS / epochs
    proj_train = [t * scale for t in train]
    med = statistics.median(proj_train)
    return {
        "tasks": len(log),
        "steps_measured": sum(int(e.get("steps") or 0) for e in log),
        "train_s": train,
        "eval_s": evals,
        "setup_s": setup,
        "projected_train_s": proj_train,
        "projected_total_s": setup + sum(proj_train) + sum(evals),
        "task_time_vs_median": [t / med for t in proj_train],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default cuda when available)")
    p.add_argument("--out", type=Path, default=Path("runs/sim-imagenet-r"), help="directory for the run directories")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task actually run (extrapolated to 20)")
    p.add_argument("--model", default="vit_base_patch16_224", help="backbone (random init)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=200, help="classes (10 tasks of classes/10)")
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (the preset's 8)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="float32 instead of bf16 autocast")
    p.add_argument("--no-amp-check", dest="amp_check", action="store_false", help="skip the bf16-vs-fp32 runs")
    p.add_argument("--check-tasks", type=int, default=2, help="tasks of the amp check runs")
    p.add_argument("--check-epochs", type=int, default=2, help="epochs per task of the amp check runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--tiny", action="store_true", help="CPU self-check: 32-px test ViT, 20 classes, a few images")
    args = p.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.model, args.img_size, args.classes = "vit_test_tiny", 32, 20
        args.train_per_class, args.test_per_class, args.batch, args.eval_batch, args.workers = 12, 4, 8, 16, 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.classes % 10 or args.classes < 20:
        p.error("--classes must be a multiple of 10 (10 tasks), at least 20")
    if min(args.epochs, args.check_tasks, args.check_epochs, args.batch) < 1:
        p.error("--epochs, --check-tasks, --check-epochs and --batch must be >= 1")

    cuda = args.device.startswith("cuda")
    figures: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "device": args.device}
    if cuda:
        figures["gpu"] = torch.cuda.get_device_name(args.device)
    print(f"[sim] main run: {args.epochs} epoch(s) per task", file=sys.stderr, flush=True)
    results, mem = run(args, args.out / "main", overrides(args, epochs=args.epochs, amp=args.amp))
    proj = project(results, mem["wall_s"], args.epochs)
    figures.update({"main": {**mem, **proj, "acc": results["acc"]}})

    checks: dict[str, Any] = {}
    if args.amp_check:
        for amp in (True, False):
            label = "bf16" if amp else "fp32"
            print(f"[sim] amp check: {label}", file=sys.stderr, flush=True)
            ov = overrides(args, epochs=args.check_epochs, amp=amp, tasks=args.check_tasks)
            r, m = run(args, args.out / f"check-{label}", ov)
            checks[label] = {"acc": r["acc"], "acc_after_task": r["acc_after_task"], **m}
        figures["amp_check"] = checks

    w = print
    gpu = figures.get("gpu", "CPU")
    precision = ("bf16 autocast" if cuda else "fp32 (autocast is CUDA-only)") if args.amp else "fp32"
    w("# ImageNet-R N=10 simulation (official protocol, random-init backbone, synthetic data)")
    w("")
    w(f"- command: {figures['command']}")
    w(f"- device: {args.device} ({gpu}), torch {torch.__version__}")
    w(
        f"- run: {args.model} at {args.img_size} px, {args.classes} classes x {args.train_per_class} train / "
        f"{args.test_per_class} test images, 10 tasks, batch {args.batch}, {precision}, "
        f"{args.workers} workers, {args.epochs} of {FULL_EPOCHS} epochs per task run ({proj['steps_measured']} steps)"
    )
    w("")
    w("| task | train s (measured) | train s (projected, 20 epochs) | x median | eval s |")
    w("|---:|---:|---:|---:|---:|")
    for t in range(proj["tasks"]):
        w(
            f"| {t + 1} | {proj['train_s'][t]:.1f} | {proj['projected_train_s'][t]:.1f} | "
            f"{proj['task_time_vs_median'][t]:.3f} | {proj['eval_s'][t]:.1f} |"
        )
    total_min = proj["projected_total_s"] / 60
    spread = max(abs(v - 1) for v in proj["task_time_vs_median"])
    w("")
    w(f"- measured wall time: {mem['wall_s']:.0f} s (setup, data generation, checkpoints: {proj['setup_s']:.0f} s)")
    verdict = ("yes" if total_min <= GOAL_MINUTES else "no") if cuda else "n/a, not a GPU run"
    w(
        f"- projected full run: {total_min:.1f} min "
        f"(goal <= {GOAL_MINUTES:.0f} min on one H100/H200-class GPU: {verdict})"
    )
    w(
        f"- per-task training time: largest deviation from the median {100 * spread:.1f}% "
        f"(goal <= {100 * GOAL_FLAT:.0f}%: {'yes' if spread <= GOAL_FLAT else 'no'}; task 1 includes warm-up)"
    )
    if cuda:
        w(
            f"- peak GPU memory: {mem['peak_allocated_gb']:.2f} GB allocated, {mem['peak_reserved_gb']:.2f} GB "
            f"reserved (goal <= {GOAL_PEAK_GB:.0f} GB: {'yes' if mem['peak_allocated_gb'] <= GOAL_PEAK_GB else 'no'})"
        )
    w(f"- final accuracy of the shortened run (synthetic data, not comparable to the paper): {results['acc']:.2f}")
    if checks:
        d = checks["bf16"]["acc"] - checks["fp32"]["acc"]
        w(
            f"- bf16 vs fp32 ({args.check_tasks} tasks x {args.check_epochs} epochs): Acc {checks['bf16']['acc']:.2f} "
            f"vs {checks['fp32']['acc']:.2f} (difference {d:+.2f} points; wall {checks['bf16']['wall_s']:.0f} s vs "
            f"{checks['fp32']['wall_s']:.0f} s)"
            + ("" if cuda else " -- CPU: both float32, the engine refuses autocast")
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
