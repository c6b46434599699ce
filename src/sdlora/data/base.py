"""Data configuration, the dataset registry and :func:`build_dataset`.

A registered loader returns :class:`RawDataset`: labels plus in-memory uint8 images, file paths or texts, for the
train and test splits. :func:`build_dataset` then keeps the largest classes if asked, applies the deterministic
per-class subsets and wraps both splits in datasets that apply the official transforms (images, see
:mod:`sdlora.data.transforms`) or tokenises them with the backbone's tokenizer (texts, see :mod:`sdlora.data.text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import ArrayImageDataset, FileImageDataset, ImageRows, RowImageDataset
from .identity import data_identity, split_digest
from .text import TextDataset, encode_texts
from .transforms import ImageTransform

__all__ = [
    "DATASETS",
    "DataConfig",
    "DatasetBundle",
    "DatasetSpec",
    "RawDataset",
    "SplitData",
    "build_dataset",
    "load_raw_dataset",
    "keep_largest_classes",
    "per_class_subset",
    "register_dataset",
    "stratified_test_mask",
]


@dataclass
class SplitData:
    """One split before transforms: labels plus exactly one of ``images`` (uint8 [N, C, H, W]), ``paths``,
    ``texts`` or ``rows`` (images decoded on access from another source, e.g. a Hugging Face dataset)."""

    targets: np.ndarray
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    texts: list[str] | None = None
    rows: ImageRows | None = None

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        given = [v for v in (self.images, self.paths, self.texts, self.rows) if v is not None]
        if len(given) != 1:
            raise ValueError("SplitData needs exactly one of images, paths, texts or rows")
        if len(given[0]) != len(self.targets):
            raise ValueError(f"{len(given[0])} samples but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def is_text(self) -> bool:
        return self.texts is not None

    def select(self, idx: np.ndarray) -> SplitData:
        """Samples at ``idx`` (copied, so a small subset does not keep a large array alive)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.images is not None:
            return SplitData(self.targets[idx], images=self.images[torch.from_numpy(idx)].clone())
        if self.texts is not None:
            return SplitData(self.targets[idx], texts=[self.texts[i] for i in idx])
        if self.rows is not None:
            return SplitData(self.targets[idx], rows=self.rows.select(idx))
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
        name: Registered dataset (see :data:`DATASETS`): images ``fashion_mnist``, ``cifar100``, ``imagenet_r``,
            ``imagenet_a``, ``cub200``, ``domainnet``, ``imagefolder``, ``synthetic``; text ``wordnet``,
            ``text_csv``, ``text_jsonl`` (text datasets need a text backbone, e.g. ``minilm_l6``); images or text
            ``hf`` (a Hugging Face ``datasets`` dataset, :mod:`sdlora.data.hf`; needs ``pip install sdlora[hf]``).
        root: Dataset root directory (``docs/datasets.md`` describes each layout). ``None``: Fashion-MNIST looks in
            ``/usr/share/datasets/fashion-mnist``, then the user cache; CIFAR-100 uses the user cache; WordNet
            reads ``/usr/share/wordnet``. ``text_csv`` / ``text_jsonl``: one file (split here) or a directory
            holding ``train.<ext>`` and ``test.<ext>``. ``hf``: a ``save_to_disk`` directory, a data file or
            directory of data files (parquet, arrow, csv, json/jsonl), or a hub id (needs network or the cache).
        format: Split convention. ``imagenet_r``: ``"folders"`` (pre-split ``train/`` ``test/`` trees, default) or
            ``"coda_yaml"`` (CODA-Prompt ``imagenet-r_{train,test}.yaml``). ``domainnet``: ``"coda_yaml"``
            (default) or ``"txt"`` (official ``<domain>_{train,test}.txt``). ``imagefolder``: ``"presplit"`` or
            ``"single_tree"`` (default: ``presplit`` when ``root/train`` and ``root/test`` exist). ``text_csv``:
            ``"csv"`` or ``"tsv"`` (default: from the file extension, ``.tsv`` is tab-separated). ``hf``:
            ``"disk"`` (``save_to_disk``), ``"files"`` (data files) or ``"hub"`` (default: ``disk`` for a directory
            holding ``dataset_dict.json`` or ``state.json``, ``files`` for another existing path, else ``hub``).
        image_size: Side length of the model input (images).
        max_length: Text: tokens per text after tokenisation (longer texts are truncated).
        train_per_class: Keep this many training samples per class (chosen with the seed); ``None`` keeps all.
            For ``synthetic`` it is the number generated (default 16).
        test_per_class: Likewise for the test split (``synthetic`` default 8).
        test_fraction: Test share per class when the dataset is split here (``imagefolder`` single tree,
            ``wordnet``, a single ``text_csv`` / ``text_jsonl`` file, ``hf`` without a test split); the split is
            drawn with the run's seed.
        largest_classes: Keep only the N classes with the most samples (train + test; ties: lower label first),
            relabelled 0..N-1 in their original order; ``None`` keeps all.
        text_column: ``text_csv`` / ``text_jsonl`` / ``hf``: the column (key) holding the text.
        label_column: ``text_csv`` / ``text_jsonl`` / ``hf``: the column (key) holding the class label (a name or
            an int; ``hf``: also a ``ClassLabel``, whose names become the class names).
        image_column: ``hf``: the ``Image`` column; a dataset without it (or with ``image_column: null``) is read
            as text from ``text_column``.
        train_split: ``hf``: the split to train on (default ``train``, or the only split).
        test_split: ``hf``: the split to test on (default ``test`` when the dataset has it; otherwise the training
            split is split per class with ``test_fraction`` and the seed).
        subset: ``hf`` hub datasets: the configuration name (``load_dataset(root, subset)``), e.g. ``sst2``.
        augment: Official random-resized-crop + flip training transform; ``False`` uses the test transform.
            Text is not augmented.
        download: Let torchvision download CIFAR-100 / Fashion-MNIST when they are absent.
        synthetic_classes: Number of classes of the ``synthetic`` dataset.
        num_workers: DataLoader worker processes (used by the engine).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    format: str | None = None
    image_size: int = 224
    max_length: int = 64
    train_per_class: int | None = None
    test_per_class: int | None = None
    test_fraction: float = 0.2
    largest_classes: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    image_column: str | None = "image"
    train_split: str | None = None
    test_split: str | None = None
    subset: str | None = None
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
        if self.max_length < 2:
            raise ValueError(f"max_length: must be at least 2 (room for the special tokens), got {self.max_length}")
        if self.largest_classes is not None and self.largest_classes < 2:
            raise ValueError(f"largest_classes: must be at least 2 or null, got {self.largest_classes}")
        for name in ("text_column", "label_column"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty column name")
        if self.text_column == self.label_column:
            raise ValueError(f"text_column and label_column are both {self.text_column!r}")
        if self.image_column is not None and self.image_column in (self.label_column, ""):
            raise ValueError(f"image_column: must be a column name other than label_column, got {self.image_column!r}")
        for name in ("train_split", "test_split", "subset"):
            v = getattr(self, name)
            if v is not None and self.name != "hf":
                raise ValueError(f"{name}: applies to data.name hf only (this is {self.name!r}); leave it null")
            if v is not None and not v.strip():
                raise ValueError(f"{name}: must be a non-empty name or null")
        if self.test_split is not None and self.test_split == self.train_split:
            raise ValueError(
                f"test_split: {self.test_split!r} is also train_split; leave test_split null to split it here"
            )
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
        train: ``__getitem__ -> (float32 [3, H, W] normalised with the given mean/std, int original label)``; for
            text ``({name: int64 [max_length]}, int original label)``.
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


def stratified_test_mask(targets: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the test samples of a per-class random split.

    Every class with at least two samples gets ``round(test_fraction * n)`` test samples, at least one, and keeps
    at least one for training; a class with one sample keeps it for training.
    """
    targets = np.asarray(targets, dtype=np.int64)
    is_test = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        n_test = min(len(idx) - 1, max(1, int(round(test_fraction * len(idx))))) if len(idx) >= 2 else 0
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


def keep_largest_classes(raw: RawDataset, n: int) -> RawDataset:
    """The ``n`` classes with the most samples (train + test; ties: lower label first), relabelled ``0..n-1`` in
    their original order.

    Raises:
        ValueError: The dataset has fewer than ``n`` classes.
    """
    num = len(raw.class_names)
    if n > num:
        raise ValueError(f"data.largest_classes={n} but the dataset has only {num} classes")
    counts = np.bincount(raw.train.targets, minlength=num) + np.bincount(raw.test.targets, minlength=num)
    ranked = sorted(range(num), key=lambda c: (-int(counts[c]), c))
    kept = np.asarray(sorted(ranked[:n]), dtype=np.int64)
    remap = np.full(num, -1, dtype=np.int64)
    remap[kept] = np.arange(n, dtype=np.int64)

    def cut(split: SplitData) -> SplitData:
        idx = np.flatnonzero(remap[split.targets] >= 0)
        sub = split.select(idx)
        sub.targets = remap[sub.targets]
        return sub

    info = {**raw.info, "largest_classes": n, "classes_before": num}
    return RawDataset(cut(raw.train), cut(raw.test), [raw.class_names[c] for c in kept], info, raw.split_record)


def _base_info(cfg: DataConfig, raw: RawDataset, n_train: int, n_test: int) -> dict[str, Any]:
    """The dataset part of ``results.json`` (``DatasetBundle.info``) before the modality's own entries."""
    return {
        "name": cfg.name,
        "root": cfg.root,
        "format": cfg.resolved_format,
        **raw.info,
        # data.root as an absolute path: code that comes back to the run from another working directory (sdlora
        # learn, diagnose) reads the same data with a relative data.root.
        "resolved_root": None if cfg.root is None else str(Path(cfg.root).expanduser().resolve()),
        "num_classes": len(raw.class_names),
        "train_count": n_train,
        "test_count": n_test,
        "train_per_class": cfg.train_per_class,
        "test_per_class": cfg.test_per_class,
    }


def _digest(split: SplitData, root: str | None) -> str:
    return split_digest(
        split.targets, images=split.images, paths=split.paths, texts=split.texts, rows=split.rows, root=root
    )


def _wrap(split: SplitData, transform: ImageTransform, encodings: dict[str, torch.Tensor] | None) -> Dataset:
    if encodings is not None:
        return TextDataset(encodings, split.targets)
    if split.images is not None:
        return ArrayImageDataset(split.images, split.targets, transform)
    if split.rows is not None:
        return RowImageDataset(split.rows, split.targets, transform)
    assert split.paths is not None
    return FileImageDataset(split.paths, split.targets, transform)


def load_raw_dataset(cfg: DataConfig, seed: int) -> RawDataset:
    """Run the registered loader of ``cfg.name``: the file lists or arrays and labels, no transforms yet.

    Cheap for folder datasets (paths only), so the engine calls it before building the backbone: a wrong
    ``data.root`` is reported before any weights are downloaded or converted. Uses no global RNG.
    """
    return DATASETS[cfg.name].loader(cfg, seed)


def _token_stats(encodings: list[dict[str, torch.Tensor]], max_length: int) -> dict[str, Any]:
    lengths = torch.cat([e["attention_mask"].sum(1) for e in encodings if "attention_mask" in e])
    if not len(lengths):
        return {"max_length": max_length}
    return {
        "max_length": max_length,
        "mean_tokens": round(float(lengths.float().mean()), 2),
        "max_tokens": int(lengths.max()),
        # Texts that fill max_length exactly: truncated, or exactly as long (the tokenizer does not tell apart).
        "at_max_length": int((lengths >= max_length).sum()),
    }


def _subsets(cfg: DataConfig, raw: RawDataset, seed: int) -> tuple[SplitData, SplitData]:
    """The training and test samples a run uses: ``train_per_class``/``test_per_class`` drawn with ``seed``, labels
    checked against the class names."""
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
    return train, test


def _check_class_names(dataset: str, names: Sequence[str]) -> None:
    """Refuse class names that other tools cannot keep apart or keep whole.

    A line break or other control character splits a name in ``labels.txt`` (one name per line, the PEFT export)
    so the list no longer lines up with the classifier; two names that differ only in Unicode normalisation (NFC
    ``é`` and NFD ``e`` + combining accent, as macOS and Linux file systems may spell one folder) look the same
    everywhere and would be two classes.
    """
    import unicodedata

    bad = [n for n in names if any(unicodedata.category(ch) == "Cc" for ch in str(n))]
    if bad:
        raise ValueError(
            f"{dataset}: class name {bad[0]!r} holds a line break or another control character; rename the class "
            "(folder or label) to a name of printable characters"
        )
    spelled: dict[str, str] = {}
    for n in names:
        key = unicodedata.normalize("NFC", str(n))
        if key in spelled and spelled[key] != n:
            raise ValueError(
                f"{dataset}: class names {spelled[key]!r} and {n!r} are the same name in two Unicode spellings "
                "(NFC and NFD); rename one so each class has one spelling"
            )
        spelled[key] = str(n)


def build_dataset(
    cfg: DataConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    tokenizer: Any = None,
    raw: RawDataset | None = None,
) -> DatasetBundle:
    """Load the dataset named by ``cfg`` and wrap its splits with the official transforms (images) or tokenise
    them (texts).

    Args:
        cfg: Data configuration.
        mean: Per-channel normalisation mean (the backbone's :attr:`~sdlora.backbones.Backbone.mean`).
        std: Per-channel normalisation std.
        seed: Seeds the per-class subsets, the splits made here (``imagefolder`` single tree, ``wordnet``, single
            text files) and ``synthetic`` generation.
        tokenizer: The backbone's tokenizer (:attr:`~sdlora.backbones.Backbone.tokenizer`); required for text
            datasets, ``None`` for image ones.
        raw: The result of :func:`load_raw_dataset` for the same ``cfg`` and ``seed``, when the caller loaded it
            already.

    Returns:
        The :class:`DatasetBundle`.

    Raises:
        FileNotFoundError: Dataset files are missing; the message names the path and how to get the data.
        ValueError: Inconsistent split files or labels, bad rows (file and line named), or a dataset whose
            modality does not match the backbone's.
    """
    if raw is None:
        raw = load_raw_dataset(cfg, seed)
    if raw.train.is_text and tokenizer is None:
        raise ValueError(
            f"dataset {cfg.name!r} holds text, but the backbone is an image model; use a text backbone "
            "(backbone.name: minilm_l6, or hf:<text model id or directory>)"
        )
    if not raw.train.is_text and tokenizer is not None:
        raise ValueError(f"dataset {cfg.name!r} holds images, but the backbone is a text model")
    _check_class_names(cfg.name, raw.class_names)
    if cfg.largest_classes is not None:
        raw = keep_largest_classes(raw, cfg.largest_classes)
    train, test = _subsets(cfg, raw, seed)
    num_classes = len(raw.class_names)
    train_tf = ImageTransform(cfg.image_size, train=cfg.augment, mean=mean, std=std)
    test_tf = ImageTransform(cfg.image_size, train=False, mean=mean, std=std)
    info = _base_info(cfg, raw, len(train), len(test))
    enc_train = enc_test = None
    if train.is_text:
        assert train.texts is not None and test.texts is not None
        enc_train = encode_texts(tokenizer, train.texts, cfg.max_length)
        enc_test = encode_texts(tokenizer, test.texts, cfg.max_length)
        info.update(modality="text", tokens=_token_stats([enc_train, enc_test], cfg.max_length))
    else:
        info.update(
            modality="image",
            image_size=cfg.image_size,
            augment=cfg.augment,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
        )
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
        train=_wrap(train, train_tf, enc_train),
        test=_wrap(test, test_tf, enc_test),
        train_targets=train.targets.copy(),
        test_targets=test.targets.copy(),
        num_classes=num_classes,
        class_names=list(raw.class_names),
        info=info,
        split_record=raw.split_record,
        identity=identity,
    )
