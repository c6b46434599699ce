"""The configurations ``bench_core.py`` measures: its command line (sizes, modes, tasks, devices) and the list of
jobs (one per training or inference configuration) it derives from them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from pathlib import Path
from typing import Any

import torch
from core_machine import CONTENDED, available_cores
from core_models import AMP

from sdlora.lora import COMPUTE_MODES


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """``bench_core.py``'s command line (``description``: its ``--help`` text), device defaults filled in."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (default: vit_small_patch16_224 on CPU,\n"
        "vit_base_patch16_224 on GPU, vit_tiny_patch16_224 with --quick)",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size (default 112 on CPU, 224 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="training batch size (default 32 on CPU, 128 on GPU)")
    p.add_argument(
        "--tasks", default=None, help="comma-separated task counts (default 1,5,10,20,40 on CPU, 1,10,20 on GPU)"
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"compute modes to measure, a subset of {','.join(COMPUTE_MODES)}\n"
        "(default: all on CPU, auto,stacked on GPU)",
    )
    p.add_argument("--rank", type=int, default=10, help="rank of every task's component (default 10)")
    p.add_argument(
        "--amp", choices=sorted(AMP), default=None, help="autocast dtype (default: bf16 on GPU, none on CPU)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed training rounds, each one step of the configuration and one of its reference\n"
        "(default 7 on CPU, 15 on GPU)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (forwards) first, of each model (default 2; GPU 5)"
    )
    p.add_argument(
        "--infer-reps",
        type=int,
        default=None,
        help="timed inference rounds, each one forward of the model and one of the bare backbone\n"
        "(default 11 on CPU, 20 on GPU)",
    )
    p.add_argument(
        "--infer-batch", default=None, help="comma-separated inference batch sizes (default: 1 and --batch)"
    )
    p.add_argument(
        "--infer-modes",
        default=None,
        help="compute modes of the unmerged inference rows (default: --modes; GPU: auto)",
    )
    p.add_argument("--infer-task", type=int, default=None, help="tasks before inference (default: last of --tasks)")
    p.add_argument("--skip-inference", action="store_true", help="time training only")
    p.add_argument(
        "--runs", type=int, default=1, help="measure every configuration this many times (run-to-run spread)"
    )
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        help="before each configuration wait up to this many seconds for other processes to use < 0.25 cores\n"
        "(default 10 on CPU, 0 on GPU and with --quick)",
    )
    p.add_argument(
        "--rerun-contended",
        type=int,
        default=None,
        help="after each run, rerun up to this many times each configuration during which other processes\n"
        f"used > {CONTENDED} cores, keeping the least contended run (default 1 on CPU, 0 on GPU and with --quick)",
    )
    p.add_argument("--num-classes", type=int, default=100, help="classes of the linear head (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--start-method",
        choices=["fork", "spawn"],
        default=None,
        help="how each configuration's process starts (default: fork on CPU/Linux, spawn on GPU)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every raw result to this JSON file")
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="print only the arithmetic table (flops counted on the meta device; no timing, any machine, seconds)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny at 32 px, batch 4, tasks 1,3, 1 round")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.quick:
        defaults: dict[str, Any] = {
            "model": "vit_tiny_patch16_224",
            "img_size": 32,
            "batch": 4,
            "tasks": "1,3",
            "modes": "auto,stacked",
            "reps": 1,
            "warmup": 1,
            "infer_reps": 1,
            "amp": "none",
        }
    elif gpu:
        defaults = {
            "model": "vit_base_patch16_224",
            "img_size": 224,
            "batch": 128,
            "tasks": "1,10,20",
            "modes": "auto,stacked",
            "reps": 15,
            "warmup": 5,
            "infer_reps": 20,
            "amp": "bf16",
        }
    else:
        defaults = {
            "model": "vit_small_patch16_224",
            "img_size": 112,
            "batch": 32,
            "tasks": "1,5,10,20,40",
            "modes": ",".join(COMPUTE_MODES),
            "reps": 7,
            "warmup": 2,
            "infer_reps": 11,
            "amp": "none",
        }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.tasks = sorted({int(t) for t in str(args.tasks).split(",") if t.strip()})
        batches = args.infer_batch or f"1,{args.batch}"
        args.infer_batch = sorted({int(b) for b in str(batches).split(",") if b.strip()})
    except ValueError:
        p.error("--tasks and --infer-batch take comma-separated integers")
    if not args.tasks or args.tasks[0] < 1:
        p.error("--tasks must be positive integers")
    if not args.infer_batch or args.infer_batch[0] < 1:
        p.error("--infer-batch must be positive integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.infer_modes is None:
        args.infer_modes = "auto" if gpu and not args.quick else ",".join(args.modes)
    args.infer_modes = [m.strip() for m in args.infer_modes.split(",") if m.strip()]
    for flag, modes in (("--modes", args.modes), ("--infer-modes", args.infer_modes)):
        if not modes or any(m not in COMPUTE_MODES for m in modes):
            p.error(f"{flag} must be a non-empty subset of {','.join(COMPUTE_MODES)}")
    if args.infer_task is None:
        args.infer_task = args.tasks[-1]
    if args.wait_idle is None:
        args.wait_idle = 0.0 if gpu or args.quick else 10.0
    if args.rerun_contended is None:
        args.rerun_contended = 0 if gpu or args.quick else 1
    if args.threads is None:
        args.threads = available_cores()
    if min(args.reps, args.infer_reps, args.batch, args.rank, args.runs) < 1 or args.warmup < 0:
        p.error("reps, infer-reps, batch, rank and runs must be >= 1, warmup >= 0")
    if args.start_method is None:
        args.start_method = "spawn" if gpu or "fork" not in mp.get_all_start_methods() else "fork"
    if gpu and args.start_method == "fork":
        p.error("CUDA cannot be used in forked processes: use --start-method spawn")
    return args


def make_jobs(args: argparse.Namespace) -> list[tuple[tuple, dict[str, Any]]]:
    jobs: list[tuple[tuple, dict[str, Any]]] = [
        (("train", "plain"), {"kind": "train", "variant": "plain"}),
        (("train", "library_plain"), {"kind": "train", "variant": "library_plain"}),
        (("train", "plain_slice"), {"kind": "train", "variant": "plain_slice"}),
    ]
    for mode in args.modes:
        for t in args.tasks:
            jobs.append((("train", mode, t), {"kind": "train", "variant": "sdlora", "mode": mode, "tasks": t}))
    if not args.skip_inference:
        it = args.infer_task
        for b in args.infer_batch:
            jobs.append((("infer", "bare", b), {"kind": "infer", "variant": "bare", "infer_batch": b}))
            merged = {"kind": "infer", "variant": "merged", "mode": "auto", "tasks": it, "infer_batch": b}
            jobs.append((("infer", "merged", b), merged))
            for mode in args.infer_modes:
                job = {"kind": "infer", "variant": "unmerged", "mode": mode, "tasks": it, "infer_batch": b}
                jobs.append((("infer", "unmerged", mode, b), job))
    return jobs
