"""Helpers for method tests: tiny two-task runs and hand-made task contexts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine_helpers import tiny_config
from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.config import MethodConfig, RunConfig
from sdlora.configtools import from_dict
from sdlora.engine import run_experiment
from sdlora.methods import Method, TaskContext, create_method


def two_task_config(method: str, **sections: Any) -> dict[str, Any]:
    """The tiny config, two tasks of two classes, few images, two epochs."""
    base = {
        "method": {"name": method},
        "scenario": {"num_tasks": 2},
        "data": {"train_per_class": 8, "test_per_class": 4},
        "train": {"epochs": 2, "threads": 1},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(**base)


def run_tiny(out: Path, cfg_dict: dict[str, Any], **kw: Any) -> dict[str, Any]:
    cfg = from_dict(RunConfig, cfg_dict)
    return run_experiment(cfg, out, **kw)


def tiny_method(name: str, seed: int = 0, **method_fields: Any) -> Method:
    """A method over the random-init tiny ViT (embed 32, two blocks), built without the engine."""
    torch.manual_seed(seed)
    backbone = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32)
    cfg = from_dict(MethodConfig, {"name": name, **method_fields})
    return create_method(cfg, backbone)


def make_ctx(
    task: int, class_start: int, class_end: int, batches: list[tuple[Tensor, Tensor]], num_tasks: int = 2
) -> TaskContext:
    def stats() -> Iterator[tuple[Tensor, Tensor]]:
        yield from batches

    return TaskContext(
        task=task,
        num_tasks=num_tasks,
        class_start=class_start,
        class_end=class_end,
        device=torch.device("cpu"),
        epochs=1,
        statistics_batches=stats,
    )


def random_batches(class_start: int, class_end: int, n_batches: int = 2, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 3, 32, 32, generator=g)
        y = torch.randint(class_start, class_end, (size,), generator=g)
        out.append((x, y))
    return out
