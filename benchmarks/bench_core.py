#!/usr/bin/env python
"""Cost of the SD-LoRA core (``sdlora.lora``) as tasks accumulate: training step time, memory, flops, inference.

For every compute mode of ``AdapterConfig.compute`` and every task count t, the adapter state of task t is built
on a timm ViT (t-1 tasks begun, their B filled with small random values as after training, ended; then task t
begun; rank 10, official protocol, q and v of every ``qkv``) and one training step (forward, cross-entropy on a
linear head over the features, backward, SGD step over ``trainable_parameters()`` and the head) is measured:

* **time**, paired: after its memory is measured, each configuration builds its reference (a plain rank-r LoRA
  step on the same model, below) in the same process and the two are timed interleaved (ABBA); *x plain LoRA*
  is the median of the per-round ratios, its spread the quartiles of those ratios, *x task 1* the quotient of
  two such ratios. Timing each configuration alone and dividing across processes was tried first: on a shared
  2-core VM two identical models timed that way differed by 12%, far above the 2-5% the goals need.
* **peak memory** above the bare backbone over the warm-up steps (adapter state, optimiser, activations,
  gradients): on CPU the RSS high-water mark (``ru_maxrss``, reset through ``/proc/self/clear_refs`` after the
  backbone is built), on GPU ``torch.cuda.max_memory_allocated``; plus the exact bytes autograd **saves for
  backward** (allocator-independent).
* **flops**: every matmul/convolution/attention flop of one step, counted by ``torch.utils.flop_counter``
  (elementwise work is not counted; attention through the math backend for that one step, which the counter
  knows): the arithmetic the step cannot avoid, next to the time it took. ``--flops-only`` prints that
  arithmetic for any model and batch without running anything (meta device), e.g. the GPU configuration on a
  laptop.

Every configuration runs in its own child process (forked from a parent that imported torch and timm but ran
nothing; spawned on GPU), so no allocator cache or high-water mark leaks from one into the next.

References. Training: a plain rank-r LoRA on the q and v slices of every ``qkv`` (``PlainLoRAQKV``: no
magnitudes, no normaliser, plain autograd, written here independently of the library): the physical limit of a
step with one trainable low-rank adapter. The library's own plain-LoRA configuration (``components: single``,
fixed magnitude 1, no normalisation; the ``seq_lora`` baseline) is timed against it as a check that the library's
layer adds nothing of its own. Inference: the bare backbone, against ``merge_and_unload()`` and the unmerged
model after the last task, at each ``--infer-batch``.

Usage::

    .venv/bin/python benchmarks/bench_core.py                  # CPU: ViT-S/16 at 112 px, batch 32, tasks 1-40
    .venv/bin/python benchmarks/bench_core.py --quick          # smoke run: vit_tiny at 32 px, < 1 min
    .venv/bin/python benchmarks/bench_core.py --device cuda    # GPU: ViT-B/16 at 224 px, batch 128, bf16 autocast

This is a script, not a test: it prints markdown tables to stdout (progress goes to stderr).

Its parts are the modules next to it: ``core_config`` (command line, jobs), ``core_machine`` (cores, load,
RSS), ``core_models`` (backbone, adapter state, plain-LoRA references), ``core_timing`` (the harness and the child
processes) and ``core_report`` (tables, ``--flops-only`` arithmetic).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

try:
    import sdlora  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The parts, next to this file (the script's directory is first on sys.path). Importing them imports torch and
# timm here, in the parent: forked configurations then start without paying for it.
import timm  # noqa: E402
import torch  # noqa: E402
from core_config import make_jobs, parse_args  # noqa: E402
from core_machine import CONTENDED, available_cores, cpu_name, load_average, total_ram_gib, wait_until_idle  # noqa: E402
from core_models import TARGETS  # noqa: E402
from core_report import Results, flops_only, fmt, report  # noqa: E402
from core_timing import run_isolated  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    if args.flops_only:
        print(flops_only(args), flush=True)
        return 0
    ctx = mp.get_context(args.start_method)
    base = {
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "rank": args.rank,
        "warmup": args.warmup,
        "reps": args.reps,
        "infer_reps": args.infer_reps,
        "device": args.device,
        "threads": args.threads,
        "num_classes": args.num_classes,
        "seed": args.seed,
        "amp": args.amp,
    }
    jobs = make_jobs(args)
    load_before = load_average()
    t_start = time.perf_counter()
    res = Results()

    def run(i: int, key: tuple, job: dict[str, Any], label: str) -> dict[str, Any]:
        waited, _ = wait_until_idle(args.wait_idle)
        t0 = time.perf_counter()
        r = run_isolated({**base, **job}, ctx)
        r["waited_s"] = waited
        msg = r.get("error") or f"{r['ms']:.1f} ms" + (f", {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "")
        if "ratio" in r:
            msg += f", x reference {r['ratio']:.3f}"
        msg += f", other load {fmt(r.get('other_load'), '.2f')} cores"
        print(
            f"[{label}{i}/{len(jobs)}] {' '.join(map(str, key))}: {msg} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return r

    for n in range(args.runs):
        tag = f"run {n + 1}/{args.runs} " if args.runs > 1 else ""
        this: dict[tuple, dict[str, Any]] = {}
        for i, (key, job) in enumerate(jobs, 1):
            this[key] = run(i, key, job, tag)
        for attempt in range(args.rerun_contended):
            todo = [(i, k, j) for i, (k, j) in enumerate(jobs, 1) if this[k].get("other_load", 0.0) > CONTENDED]
            for i, key, job in todo:
                r = run(i, key, job, f"{tag}rerun {attempt + 1}: ")
                if "error" not in r and r.get("other_load", 0.0) < this[key].get("other_load", math.inf):
                    this[key] = r
        for key, r in this.items():
            res.runs.setdefault(key, []).append(r)
    elapsed = time.perf_counter() - t_start

    first_ok = next((r for rs in res.runs.values() for r in rs if "error" not in r), {})
    exe = sys.executable
    with contextlib.suppress(ValueError):  # show the interpreter relative to the working directory when inside it
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    gpu = args.device.startswith("cuda")
    header = {
        "machine": first_ok.get("gpu") if gpu else f"{cpu_name()}",
        "cores available": f"{available_cores()} (host {os.cpu_count()})"
        + (f", RAM {total_ram_gib():.1f} GiB" if total_ram_gib() else ""),
        "torch / timm / python": f"{torch.__version__} / {timm.__version__} / {platform.python_version()}",
        "device / torch threads": f"{args.device} / {first_ok.get('threads', args.threads)}",
        "command": shlex.join([exe, *sys.argv]),
        "setup": (
            f"{args.model}, img {args.img_size} ({first_ok.get('tokens_per_image', '?')} tokens/image), batch "
            f"{args.batch}, rank {args.rank}, official protocol, targets {TARGETS[0]} (q,v), "
            f"{'autocast ' + args.amp if args.amp != 'none' else 'fp32'}, SGD(momentum 0.9) on "
            f"trainable_parameters() + linear head ({args.num_classes} classes), one process per configuration "
            f"({args.start_method})"
        ),
        "memory": (
            "torch.cuda.max_memory_allocated above the bare backbone"
            if gpu
            else "RSS high-water (ru_maxrss) above the bare backbone, "
            + ("high-water reset after the build" if first_ok.get("hwm_reset") else "no reset (clear_refs refused)")
        ),
        "load average before / after": f"{load_before} / {load_average()}",
        "other load": (
            "CPU cores used by other processes while a configuration ran (from /proc/stat); above ~0.2 on a "
            f"{available_cores()}-core machine the figure is contended. Waited up to {args.wait_idle:.0f} s "
            f"for an idle machine before each configuration; contended ones rerun up to {args.rerun_contended} "
            "time(s), least contended run kept"
        ),
        "wall time": f"{elapsed:.0f} s",
    }
    text = report(args, res, header)
    print(text, flush=True)
    if args.json:
        rows = [{"key": list(k), "run": i, **r} for k, rs in res.runs.items() for i, r in enumerate(rs)]
        args.json.write_text(json.dumps({"header": header, "results": rows}, indent=1, default=str))
    return 1 if res.errors() else 0


if __name__ == "__main__":
    sys.exit(main())
