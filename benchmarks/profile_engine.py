#!/usr/bin/env python
"""Where a run's wall time goes: data loading and augmentation, model compute, evaluation, checkpoints, reports.

Runs an experiment through the real engine (``sdlora.engine.run_experiment``, unmodified) with timers wrapped
around its pieces from the outside, and prints the split of the process's wall time (imports included) into
exclusive buckets: a bucket's time does not include the buckets nested inside it (evaluation's data loading is
"eval: data", not "eval: other"). *Model compute* is the training forward, loss + backward and optimiser step,
and the evaluation forward; everything else is overhead.

Usage::

    .venv/bin/python benchmarks/profile_engine.py                     # the demo (sdlora demo), CPU
    .venv/bin/python benchmarks/profile_engine.py --config demo --set train.epochs=1 --runs 2
    .venv/bin/python benchmarks/profile_engine.py --json runs/profile.json

The wrappers are installed only in this process (monkeypatching, removed at the end); they time, and never
change what runs (the results are those of ``sdlora run``). On CUDA each bucket synchronises the device at its
edges, so the figures are exact but the run is slightly slower than without the profiler.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before the heavy imports: they are part of the wall time

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

T_IMPORT0 = time.perf_counter()
import torch  # noqa: E402
import torch.optim.optimizer as optim_mod  # noqa: E402
import torch.utils.data.dataloader as dl  # noqa: E402

try:
    import sdlora.engine as engine
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import sdlora.engine as engine
from sdlora.methods import load_run_config  # noqa: E402

T_IMPORT1 = time.perf_counter()

COMPUTE = ("train: forward", "train: loss + backward", "train: optimiser step", "eval: forward")
ORDER = (
    "imports (torch, timm, sdlora)",
    "build (backbone, dataset, method)",
    "train: data loading + augmentation",
    *COMPUTE[:3],
    "end_task (freeze, KD, ...)",
    "eval: data loading",
    COMPUTE[3],
    "eval: other",
    "checkpoint",
    "results.json, tables, plots",
    "rest (run dir, loop, logging)",
)


class Profiler:
    """Exclusive wall time per bucket: entering a bucket pauses the enclosing one."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.stack: list[tuple[str, float]] = []
        self.in_eval = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def push(self, name: str) -> None:
        now = self._now()
        if self.stack:
            parent, since = self.stack[-1]
            self.totals[parent] += now - since
        self.stack.append((name, now))
        self.counts[name] += 1

    def pop(self) -> None:
        now = self._now()
        name, since = self.stack.pop()
        self.totals[name] += now - since
        if self.stack:
            self.stack[-1] = (self.stack[-1][0], now)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, fn: Callable[..., Any], name: str | Callable[[], str]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(name() if callable(name) else name):
                return fn(*args, **kwargs)

        return timed


@contextlib.contextmanager
def instrumented(prof: Profiler) -> Iterator[None]:
    """Install the timers around the engine's pieces; remove them on exit."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    def phase(train: str, ev: str) -> Callable[[], str]:
        return lambda: ev if prof.in_eval else train

    build_run = engine.build_run

    def timed_build(*args: Any, **kwargs: Any) -> Any:
        with prof.section("build (backbone, dataset, method)"):
            backbone, data, scenario, method = build_run(*args, **kwargs)
        method.forward = prof.wrap(method.forward, phase("train: forward", "eval: forward"))
        method.training_loss = prof.wrap(method.training_loss, "train: loss + backward")
        method.end_task = prof.wrap(method.end_task, "end_task (freeze, KD, ...)")
        return backbone, data, scenario, method

    evaluate = engine.evaluate

    def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
        prof.in_eval = True
        try:
            with prof.section("eval: other"):
                return evaluate(*args, **kwargs)
        finally:
            prof.in_eval = False

    patch(engine, "build_run", timed_build)
    patch(engine, "evaluate", timed_evaluate)
    patch(engine, "save_checkpoint", prof.wrap(engine.save_checkpoint, "checkpoint"))
    patch(engine, "build_results", prof.wrap(engine.build_results, "results.json, tables, plots"))
    patch(engine, "atomic_write_json", prof.wrap(engine.atomic_write_json, "results.json, tables, plots"))
    patch(engine, "on_run_event", prof.wrap(engine.on_run_event, "results.json, tables, plots"))
    patch(
        dl._BaseDataLoaderIter,
        "__next__",
        prof.wrap(dl._BaseDataLoaderIter.__next__, phase("train: data loading + augmentation", "eval: data loading")),
    )
    patch(torch.Tensor, "backward", prof.wrap(torch.Tensor.backward, "train: loss + backward"))
    hooks = [
        optim_mod.register_optimizer_step_pre_hook(lambda *a: prof.push("train: optimiser step")),
        optim_mod.register_optimizer_step_post_hook(lambda *a: prof.pop()),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)


def profile_run(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg, _ = load_run_config(config, overrides)
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    prof = Profiler(cuda)
    t0 = time.perf_counter()
    with instrumented(prof):
        results = engine.run_experiment(cfg, out, overwrite=True)
    run_wall = time.perf_counter() - t0
    totals = dict(prof.totals)
    totals["rest (run dir, loop, logging)"] = run_wall - sum(totals.values())
    return {"run_wall_s": run_wall, "totals": totals, "counts": dict(prof.counts), "acc": results.get("acc")}


def table(buckets: dict[str, float], wall: float, runs: int) -> list[str]:
    lines = ["| bucket | seconds | % of wall | model compute |", "|---|---:|---:|:-:|"]
    for name in ORDER:
        v = buckets.get(name, 0.0)
        lines.append(f"| {name} | {v:.2f} | {100 * v / wall:.1f} | {'yes' if name in COMPUTE else ''} |")
    compute = sum(buckets.get(n, 0.0) for n in COMPUTE)
    lines.append(f"| **model compute** | {compute:.2f} | {100 * compute / wall:.1f} | |")
    lines.append(f"| **everything else** | {wall - compute:.2f} | {100 * (wall - compute) / wall:.1f} | |")
    lines.append(f"| **wall time** | {wall:.2f} | 100.0 | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo", help="preset name or YAML path (default: demo, as `sdlora demo`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one, removed)")
    p.add_argument("--runs", type=int, default=1, help="profile the run this many times (the first pays the imports)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures to this JSON file")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")

    imports = T_IMPORT1 - T_IMPORT0
    rows = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sdlora-profile-") as tmp:
            out = args.out or Path(tmp) / "run"
            t0 = time.perf_counter()
            r = profile_run(args.config, args.overrides, out)
            # The first run's wall time counts the process start and imports, as `sdlora demo` pays them.
            r["wall_s"] = time.perf_counter() - (T_PROCESS if i == 0 else t0)
            if i == 0:
                r["totals"]["imports (torch, timm, sdlora)"] = imports
                r["totals"]["rest (run dir, loop, logging)"] += r["wall_s"] - r["run_wall_s"] - imports
            else:
                r["totals"]["rest (run dir, loop, logging)"] += r["wall_s"] - r["run_wall_s"]
            rows.append(r)
            print(f"run {i + 1}/{args.runs}: {r['wall_s']:.1f} s, final acc {r['acc']}", file=sys.stderr, flush=True)

    print("# Engine wall-time split")
    print("")
    print(f"- command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"- config: {args.config} {' '.join('--set ' + o for o in args.overrides)}".rstrip())
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()}")
    for i, r in enumerate(rows):
        print("")
        print(f"## Run {i + 1}{' (includes process start and imports)' if i == 0 else ''}: {r['wall_s']:.1f} s")
        print("")
        print("\n".join(table(r["totals"], r["wall_s"], 1)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
