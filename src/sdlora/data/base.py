"""Data configuration, the dataset registry and :func:`build_dataset`.

A registered loader returns :class:`RawDataset`: labels plus either in-memory uint8 images or file paths, for the
official train and test splits. :func:`build_dataset` then applies the deterministic per-class subsets and wraps
both splits in datasets that apply the official transforms (see :mod:`sdlora.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import ArrayImageDataset, FileImageDataset
from .identity import data_identity, split_digest
from .transforms import ImageTransform

__all__ = [
    "DATASETS",
    "DataConfig",
    "DatasetBundle",
    "DatasetSpec",
    "RawDataset",
    "SplitData",
    "build_dataset",
    "per_class_subset",
    "register_dataset",
]


@dataclass
class SplitData:
    """One split before transforms: labels plus either ``images`` (uint8 [N, C, H, W]) or ``paths``."""

    targets: np.ndarray
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError("SplitData needs exactly one of images or paths")
        n = len(self.images) if self.images is not None else len(self.paths)  # type: ignore[arg-type]
        if n != len(self.targets):
            raise ValueError(f"{n} samples but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, idx: np.ndarray) -> SplitData:
        """Samples at ``idx`` (copied, so a small subset does not keep a large array alive)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.images is not None:
            return SplitData(self.targets[idx], images=self.images[torch.from_numpy(idx)].clone())
        assert self.paths is not None
        return SplitData(self.targets[idx], paths=[self.paths[i] for i in idx])


@dataclass
class RawDataset:
    """What a registered loader returns."""

    train: SplitData
    test: SplitData
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # root, format, split description ...
    split_record: dict[str, Any] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the loader ``(cfg, seed) -> RawDataset`` and the ``format`` values it accepts."""

    loader: Callable[[DataConfig, int], RawDataset]
    formats: tuple[str, ...] = ()
    default_format: str | None = None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, formats: Sequence[str] = (), default_format: str | None = None
) -> Callable[[Callable[[DataConfig, int], RawDataset]], Callable[[DataConfig, int], RawDataset]]:
    """Register a loader under ``name``; ``formats`` lists the accepted ``DataConfig.format`` values."""

    def deco(fn: Callable[[DataConfig, int], RawDataset]) -> Callable[[DataConfig, int], RawDataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        if default_format is not None and default_format not in formats:
            raise ValueError(f"default_format {default_format!r} not in formats {formats}")
        DATASETS[name] = DatasetSpec(fn, tuple(formats), default_format)
        return fn

    return deco


@dataclass
class DataConfig:
    """Which dataset to load and how to preprocess it.

    Attributes:
        name: Registered dataset (see :data:`DATASETS`): ``fashion_mnist``, ``cifar100``, ``imagenet_r``,
            ``imagenet_a``, ``cub200``, ``domainnet``, ``imagefolder``, ``synthetic``.
        root: Dataset root directory (``docs/datasets.md`` describes each layout). ``None``: Fashion-MNIST looks in
            ``/usr/share/datasets/fashion-mnist``, then the user cache; CIFAR-100 uses the user cache.
        format: Split convention. ``imagenet_r``: ``"folders"`` (pre-split ``train/`` ``test/`` trees, default) or
            ``"coda_yaml"`` (CODA-Prompt ``imagenet-r_{train,test}.yaml``). ``domainnet``: ``"coda_yaml"``
            (default) or ``"txt"`` (official ``<domain>_{train,test}.txt``). ``imagefolder``: ``"presplit"`` or
            ``"single_tree"`` (default: ``presplit`` when ``root/train`` and ``root/test`` exist).
        image_size: Side length of the model input.
        train_per_class: Keep this many training images per class (chosen with the seed); ``None`` keeps all.
            For ``synthetic`` it is the number generated (default 16).
        test_per_class: Likewise for the test split (``synthetic`` default 8).
        test_fraction: Test share per class when ``imagefolder`` splits a single tree.
        augment: Official random-resized-crop + flip training transform; ``False`` uses the test transform.
        download: Let torchvision download CIFAR-100 / Fashion-MNIST when they are absent.
        synthetic_classes: Number of classes of the ``synthetic`` dataset.
        num_workers: DataLoader worker processes (used by the engine).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    format: str | None = None
    image_size: int = 224
    train_per_class: int | None = None
    test_per_class: int | None = None
    test_fraction: float = 0.2
    augment: bool = True
    download: bool = True
    synthetic_classes: int = 10
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"name: unknown dataset {self.name!r}; known: {', '.join(sorted(DATASETS))}")
        spec = DATASETS[self.name]
        if self.format is not None and self.format not in spec.formats:
            allowed = ", ".join(spec.formats) if spec.formats else "none (leave it null)"
            raise ValueError(f"format: {self.format!r} is not a format of dataset {self.name!r}; allowed: {allowed}")
        if self.image_size <= 0:
            raise ValueError(f"image_size: must be positive, got {self.image_size}")
        for name in ("train_per_class", "test_per_class"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}: must be positive or null, got {v}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.synthetic_classes < 2:
            raise ValueError(f"synthetic_classes: must be at least 2, got {self.synthetic_classes}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")

    @property
    def resolved_format(self) -> str | None:
        """``format``, or the dataset's default when it is ``None``."""
        return self.format if self.format is not None else DATASETS[self.name].default_format


@dataclass
class DatasetBundle:
    """Both splits of a dataset, ready for a DataLoader.

    Attributes:
        train: ``__getitem__ -> (float32 [3, H, W] normalised with the given mean/std, int original label)``.
        test: Same for the test split (deterministic transform).
        train_targets: int64 original labels aligned with ``train``.
        test_targets: int64 original labels aligned with ``test``.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        class_names: Name of each original label.
        info: JSON-able description: name, root, format, counts, split description.
        split_record: For splits made here (``imagefolder`` single tree): the file lists, for the run directory.
        identity: What data this is, after subsetting (:func:`sdlora.data.identity.data_identity`): counts per
            class and sha256 digests, recorded in ``results.json`` to recognise the same data later.
    """

    train: Dataset
    test: Dataset
    train_targets: np.ndarray
    test_targets: np.ndarray
    num_classes: int
    class_names: list[str]
    info: dict[str, Any]
    split_record: dict[str, Any] | None = None
    identity: dict[str, Any] = field(default_factory=dict)


def per_class_subset(targets: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``k`` random samples of every class, in ascending order (classes keep all if fewer)."""
    targets = np.asarray(targets)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) > k:
            idx = rng.choice(idx, size=k, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _digest(split: SplitData, root: str | None) -> str:
    return split_digest(split.targets, images=split.images, paths=split.paths, root=root)


def _wrap(split: SplitData, transform: ImageTransform) -> Dataset:
    if split.images is not None:
        return ArrayImageDataset(split.images, split.targets, transform)
    assert split.paths is not None
    return FileImageDataset(split.paths, split.targets, transform)


def build_dataset(cfg: DataConfig, *, mean: Sequence[float], std: Sequence[float], seed: int) -> DatasetBundle:
    """Load the dataset named by ``cfg`` and wrap its splits with the official transforms.

    Args:
        cfg: Data configuration.
        mean: Per-channel normalisation mean (the backbone's :attr:`~sdlora.backbones.Backbone.mean`).
        std: Per-channel normalisation std.
        seed: Seeds the per-class subsets, the ``imagefolder`` single-tree split and ``synthetic`` generation.

    Returns:
        The :class:`DatasetBundle`.

    Raises:
        FileNotFoundError: Dataset files are missing; the message names the path and how to get the data.
        ValueError: Inconsistent split files or labels.
    """
    spec = DATASETS[cfg.name]
    raw = spec.loader(cfg, seed)
    train, test = raw.train, raw.test
    # Separate streams, so changing test_per_class never changes which training images are used.
    if cfg.train_per_class is not None:
        train = train.select(per_class_subset(train.targets, cfg.train_per_class, np.random.default_rng([seed, 1])))
    if cfg.test_per_class is not None:
        test = test.select(per_class_subset(test.targets, cfg.test_per_class, np.random.default_rng([seed, 2])))
    num_classes = len(raw.class_names)
    for split_name, split in (("train", train), ("test", test)):
        if len(split) and (split.targets.min() < 0 or split.targets.max() >= num_classes):
            raise ValueError(f"{cfg.name}: {split_name} labels outside 0..{num_classes - 1}")
    train_tf = ImageTransform(cfg.image_size, train=cfg.augment, mean=mean, std=std)
    test_tf = ImageTransform(cfg.image_size, train=False, mean=mean, std=std)
    info = {
        "name": cfg.name,
        "root": cfg.root,
        "format": cfg.resolved_format,
        **raw.info,
        "num_classes": num_classes,
        "train_count": len(train),
        "test_count": len(test),
        "train_per_class": cfg.train_per_class,
        "test_per_class": cfg.test_per_class,
        "image_size": cfg.image_size,
        "augment": cfg.augment,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    root = raw.info.get("root", cfg.root)
    identity = data_identity(
        name=cfg.name,
        root=None if root is None else str(root),
        format=cfg.resolved_format,
        class_names=raw.class_names,
        train_targets=train.targets,
        test_targets=test.targets,
        train_digest=_digest(train, root),
        test_digest=_digest(test, root),
    )
    return DatasetBundle(
        train=_wrap(train, train_tf),
        test=_wrap(test, test_tf),
        train_targets=train.targets.copy(),
        test_targets=test.targets.copy(),
        num_classes=num_classes,
        class_names=list(raw.class_names),
        info=info,
        split_record=raw.split_record,
        identity=identity,
    )
