"""Tiny end-to-end configurations shared by the engine, CLI and method tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A run that finishes in a second or two: random-init tiny ViT, synthetic 32 px data, 3 tasks x 2 classes."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 7,
        "method": {"name": "sdlora", "adapter": {"rank": 2}},
        "backbone": {"name": "vit_test_tiny", "pretrained": False},
        "data": {
            "name": "synthetic",
            "image_size": 32,
            "synthetic_classes": 6,
            "train_per_class": 16,
            "test_per_class": 6,
            "augment": False,
        },
        "scenario": {"init_cls": 2, "increment": 2},
        "train": {
            "epochs": 6,
            "batch_size": 8,
            "eval_batch_size": 16,
            "optimizer": "adam",
            "lr": 0.01,
            "device": "cpu",
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            merged = dict(cfg[key])
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            cfg[key] = merged
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
