"""How far does one optimiser step at the start of a task move the features, per adapter protocol?

Under ``protocol: paper`` the current component is normalised while it trains (paper Eq. 4): with B = 0 at the
start of a task, the first step makes ``B A / ||B A||`` a unit-Frobenius-norm update whatever the step size, so
the layer jumps by ``alpha_t`` (1.0) times a direction set by the first gradient. Under ``protocol: official`` the
current component is ``alpha_t B A`` and moves by about the learning rate. This script measures it on a run
config (default: the ``demo`` preset): the first task's first batch, one step of the config's optimiser on the
cross-entropy of the fresh head, then the change of the pooled features on that batch and the relative size of
each adapted layer's weight update. (docs/method.md, "When SD-LoRA helps and when it does not")

Usage::

    PYTHONPATH=src python benchmarks/first_step_drift.py [CONFIG] [--set key=value ...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sdlora.engine import build_run
from sdlora.methods import TaskContext, load_run_config


def drift(config: str, overrides: list[str], protocol: str) -> dict[str, float]:
    cfg, _ = load_run_config(config, [*overrides, f"method.adapter.protocol={protocol}", "data.augment=false"])
    if cfg.method.name not in ("sdlora", "sdlora_rr", "sdlora_kd", "sdlora_ca"):
        raise SystemExit(f"first_step_drift measures SD-LoRA's protocols; method.name is {cfg.method.name!r}")
    device = torch.device("cpu")
    _backbone, data, scenario, method = build_run(cfg, device)
    start, end = scenario.task_range(0)
    subset = scenario.subset(data.train, data.train_targets, [0])
    batches = DataLoader(
        subset, batch_size=cfg.train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    x, y = next(iter(batches))
    ctx = TaskContext(0, scenario.num_tasks, start, end, device, 1, statistics_batches=lambda: iter([]))
    method.begin_task(ctx)
    method.eval()  # no dropout: only the parameters change between the two feature passes
    with torch.no_grad():
        before = method.features(x)
    params = method.trainable_parameters()
    t = cfg.train
    if t.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=t.lr_for(0), momentum=t.momentum)
    else:
        opt = torch.optim.Adam(params, lr=t.lr_for(0), betas=(t.betas[0], t.betas[1]))
    loss = method.training_loss(method(x), y, ctx)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = method.features(x)
        adapter = method.adapter  # type: ignore[attr-defined]
        alphas = adapter.alphas()
        rel_w = [float(layer.delta_weight(alphas).norm() / layer.base.weight.norm()) for layer in adapter.layers()]
    return {
        "feature_change": float(((after - before).norm(dim=1) / before.norm(dim=1)).mean()),
        "cosine": float(F.cosine_similarity(after, before, dim=1).mean()),
        "dw_mean": sum(rel_w) / len(rel_w),
        "dw_max": max(rel_w),
        "lr": t.lr_for(0),
        "optimizer": t.optimizer,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    print("protocol  optimiser  lr       feature change  cosine  ||dW||/||W0|| mean (max) over adapted layers")
    for protocol in ("official", "paper"):
        torch.manual_seed(0)
        r = drift(args.config, args.set, protocol)
        print(
            f"{protocol:<9} {r['optimizer']:<10} {r['lr']:<8.1e} {r['feature_change']:>14.4f} {r['cosine']:>7.4f}  "
            f"{r['dw_mean']:.4f} ({r['dw_max']:.4f})"
        )


if __name__ == "__main__":
    main()
