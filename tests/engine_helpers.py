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


def write_image_folder(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    """A pre-split ImageFolder ``root/{train,test}/<class>/<i>.png`` of 32 px images, distinct per class and index."""
    import numpy as np
    from PIL import Image

    for split, counts in (("train", train), ("test", test)):
        for ci, (cls, n) in enumerate(counts.items()):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((32, 32, 3), (40 * ci + 7 * i) % 256, dtype=np.uint8)
                pixels[: 8 * (ci + 1), :, ci % 3] = 255  # a class-specific stripe: the tiny ViT can tell them apart
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def folder_config(root: Path, **sections: Any) -> dict[str, Any]:
    """The tiny run on the image folder at ``root``: tasks of 2 + 1 + ... classes, one epoch each."""
    cfg = tiny_config(scenario={"init_cls": 2, "increment": 1}, train={"epochs": 1}, **sections)
    data = {"name": "imagefolder", "root": str(root), "image_size": 32, "augment": False}
    cfg["data"] = {**data, **sections.get("data", {})}
    return cfg
