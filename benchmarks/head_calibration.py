"""Which calibrated head and which drift compensation? Every combination from one training run per seed.

The method (default ``sdlora``; ``--method seq_lora`` for sequential LoRA) trains exactly as in ``sdlora run``
(``engine.run_task``, same seeds; the extra passes below restore the global RNG). Around each task this script
passes the task's training data (evaluation transforms) through the model before the task (before the
protocol's transition) and after it, keeps per-class statistics with each drift compensation of
``sdlora.calibration`` (``none``, ``linear``, ``sdc``) and scores the test data of all seen tasks with each
head: the trained linear head (what the run reports), ``ncm``, ``ridge`` on the features for several relative
ridges, ``ridge`` on a random projection (RanPAC-style, Gram from Gaussian samples). ``oracle`` recomputes every
class's statistics from its training data with the current model: it uses old data, which the method may not,
and is only the bound that drift compensation approaches.

Usage::

    PYTHONPATH=src python benchmarks/head_calibration.py demo --seeds 1993 1994 1995 [--method seq_lora]
        [--json OUT.json] [--set key=value ...]

Prints final Acc (and AAA) per head x drift, per seed and the mean; ``--json`` writes the per-task curves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdlora.alignment import FeatureStatistics
from sdlora.calibration import (
    CalibConfig,
    compensate_statistics,
    gaussian_ridge_statistics,
    moment_ridge_statistics,
    relative_ridge_solve,
)
from sdlora.data import batch_to
from sdlora.engine import build_run, run_task, task_data
from sdlora.methods import load_run_config
from sdlora.runstate import RunState
from sdlora.training import Runtime

RIDGES = [1e-3, 1e-2, 1e-1, 1.0]
PROJECTION = 2048


@torch.no_grad()
def embed(method: Any, dataset: Any, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    was = method.training
    method.eval()
    feats, labels = [], []
    with torch.random.fork_rng(devices=[]):
        for x, y in DataLoader(dataset, batch_size=batch, shuffle=False):
            feats.append(method.features(batch_to(x, device)).double().cpu())
            labels.append(y)
    method.train(was)
    return torch.cat(feats), torch.cat(labels)


def _batches(f: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield f, y


def head_scores(stats: FeatureStatistics, ft: torch.Tensor, seed: int, task: int) -> dict[str, torch.Tensor]:
    """Predictions of every head on test features ``ft`` from the class statistics ``stats``."""
    out: dict[str, torch.Tensor] = {}
    means = torch.nn.functional.normalize(stats.means.double(), dim=-1)
    out["ncm"] = (torch.nn.functional.normalize(ft, dim=-1) @ means.t()).argmax(1)
    g, c = moment_ridge_statistics(stats)
    fa = torch.cat([ft, torch.ones(len(ft), 1, dtype=ft.dtype)], 1)
    for r in RIDGES:
        out[f"ridge{r:g}"] = (fa @ relative_ridge_solve(g, c, r)).argmax(1)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 101)
    proj = torch.randn(stats.d, PROJECTION, generator=gen, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task * 7_919 + 29)
    g, c = gaussian_ridge_statistics(stats, proj, 256, 0.0, gen)
    h = torch.relu(ft @ proj)
    for r in RIDGES:
        out[f"rp{r:g}"] = (h @ relative_ridge_solve(g, c, r)).argmax(1)
    return out


def run_seed(config: str, method_name: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    cfg, _ = load_run_config(config, [*overrides, f"seed={seed}", f"method.name={method_name}"])
    device = torch.device("cpu")
    _backbone, data, scenario, method = build_run(cfg, device)
    rt = Runtime(train=cfg.train, seed=cfg.seed, device=device, workers=cfg.data.num_workers)
    state = RunState(session_start=time.time())
    n = scenario.num_tasks
    # drift variants: name -> CalibConfig; "linear" is the default drift_ridge, the others bracket it
    drifts = {
        "none": CalibConfig(),
        "linear": CalibConfig(drift="linear"),
        "linear_r1e-3": CalibConfig(drift="linear", drift_ridge=1e-3),
        "linear_r1e-1": CalibConfig(drift="linear", drift_ridge=1e-1),
        "sdc": CalibConfig(drift="sdc"),
    }
    stores = {k: FeatureStatistics(method.num_features, "full") for k in drifts}
    curves: dict[str, list[float]] = {}
    for t in range(n):
        td = task_data(scenario, data, t)
        before = embed(method, td.statistics, device)[0] if t else None
        run_task(method, state, td, rt, num_tasks=n)
        after, y = embed(method, td.statistics, device)
        for k, dcfg in drifts.items():
            if before is not None:
                compensate_statistics([stores[k]], dcfg, before, after)
            stores[k].add_classes(_batches(after, y), lambda f: f, td.class_start, td.class_end)
        oracle = FeatureStatistics(method.num_features, "full")
        for j in range(t + 1):
            tj = task_data(scenario, data, j)
            fj, yj = embed(method, tj.statistics, device)
            oracle.add_classes(_batches(fj, yj), lambda f: f, tj.class_start, tj.class_end)
        ft, yt = embed(method, td.test, device)
        for k, store in [*stores.items(), ("oracle", oracle)]:
            for head, pred in head_scores(store, ft, seed, t).items():
                curves.setdefault(f"{head}/{k}", []).append(100.0 * float((pred == yt).float().mean()))
    curves["linear/trained"] = [float(v) for v in state.metrics()["acc_after_task"]]
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--method", default="sdlora")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1993])
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    results: dict[int, dict[str, list[float]]] = {}
    t0 = time.time()
    for seed in args.seeds:
        results[seed] = run_seed(args.config, args.method, seed, args.overrides)
        print(f"seed {seed} done after {time.time() - t0:.0f} s", flush=True)
    keys = list(results[args.seeds[0]])
    print(f"{args.config} | {args.method} | seeds {args.seeds} | final Acc per seed, mean | AAA mean")
    for k in sorted(keys):
        finals = [results[s][k][-1] for s in args.seeds]
        aaa = sum(sum(results[s][k]) / len(results[s][k]) for s in args.seeds) / len(args.seeds)
        per = " ".join(f"{v:6.2f}" for v in finals)
        print(f"{k:<22} {per} | {sum(finals) / len(finals):6.2f} | {aaa:6.2f}")
    print(f"wall {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({str(s): r for s, r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
