"""How good are a frozen backbone's features for a scenario's data? (docs/method.md, "When SD-LoRA helps")

For a run config (default: the ``demo`` preset), the pretrained backbone embeds every training and test image
(evaluation transforms), and three classifiers are fitted on all classes at once (no continual learning: an
upper bound for what a frozen backbone offers):

* ``linear probe``: multinomial logistic regression on the features (full-batch L-BFGS, weight decay 1e-4);
* ``nearest class mean``: cosine similarity to per-class mean features (SimpleCIL's classifier, joint);
* ``pixels``: the same logistic regression on the raw (standardised) input pixels.

Usage::

    PYTHONPATH=src python benchmarks/feature_probe.py [CONFIG] [--set key=value ...]

Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sdlora.backbones import create_backbone
from sdlora.data import build_dataset
from sdlora.methods import load_run_config


@torch.no_grad()
def embed(model: torch.nn.Module, dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, pixels, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats.append(model(x).float())
        pixels.append(x.flatten(1))
        labels.append(y)
    return torch.cat(feats), torch.cat(pixels), torch.cat(labels)


def logistic_regression(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, wd: float = 1e-4
) -> float:
    """Test accuracy (%) of a multinomial logistic regression fitted with full-batch L-BFGS on standardised inputs."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    n_cls = int(y_train.max()) + 1
    w = torch.zeros(xtr.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y_train) + wd * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float(((xte @ w + b).argmax(1) == y_test).float().mean())


def nearest_class_mean(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> float:
    n_cls = int(y_train.max()) + 1
    protos = torch.stack([x_train[y_train == c].mean(0) for c in range(n_cls)])
    sims = F.normalize(x_test, dim=1) @ F.normalize(protos, dim=1).t()
    return 100.0 * float((sims.argmax(1) == y_test).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cfg, _ = load_run_config(args.config, args.set + ["data.augment=false"])
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    backbone.model.eval()
    data = build_dataset(cfg.data, mean=backbone.mean, std=backbone.std, seed=cfg.seed)
    ftr, ptr, ytr = embed(backbone.model, data.train)
    fte, pte, yte = embed(backbone.model, data.test)
    rows = [
        ("linear probe on features", logistic_regression(ftr, ytr, fte, yte)),
        ("nearest class mean on features (cosine)", nearest_class_mean(ftr, ytr, fte, yte)),
        ("linear probe on pixels", logistic_regression(ptr, ytr, pte, yte)),
    ]
    print(
        f"{cfg.backbone.name} on {cfg.data.name} at {cfg.data.image_size}px: {len(ytr)} train / {len(yte)} test "
        f"images, {data.num_classes} classes, all classes at once (joint, frozen backbone); "
        f"feature norm {ftr.norm(dim=1).mean():.1f}, {time.time() - t0:.0f}s"
    )
    for name, acc in rows:
        print(f"  {name:<42} {acc:6.2f}")


if __name__ == "__main__":
    main()
