"""Checks of a dataset before anything is trained: every image file decoded once, every class trainable and tested.

``sdlora check-data CONFIG`` runs :func:`check_dataset`; the engine runs :func:`coverage_problems` on every run
(it is cheap: labels only). A corrupt image is otherwise found only when a batch first reads it, possibly hours
into a run, and a class without test images silently drops out of the accuracy matrix.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import DataConfig, build_dataset, load_raw_dataset
from .datasets import FileImageDataset, RowImageDataset, read_image_file

__all__ = ["DataCheck", "check_dataset", "check_image_files", "coverage_problems"]


def _check_one(path: str) -> str | None:
    """The reason ``path`` cannot be read (the decoder's message, which names the file), or None."""
    try:
        read_image_file(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def check_image_files(
    paths: Sequence[str], workers: int = 0, progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None
) -> list[tuple[str, str]]:
    """Decode every file in ``paths`` (as training would) and return ``(path, reason)`` for each one that fails.

    Args:
        paths: Image files.
        workers: Decoding processes; 0 decodes in this process.
        progress: Optional wrapper ``(iterable, total) -> iterable`` (a progress bar).

    Returns:
        The unreadable files in the order of ``paths``.
    """
    if workers > 0 and len(paths) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(256, len(paths) // (workers * 8) or 1))
            results: Iterable[str | None] = pool.map(_check_one, paths, chunksize=chunk)
            if progress is not None:
                results = progress(results, len(paths))
            reasons = list(results)
    else:
        it: Iterable[str] = paths if progress is None else progress(paths, len(paths))
        reasons = [_check_one(p) for p in it]
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def coverage_problems(
    class_names: Sequence[str],
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    tasks: Sequence[Sequence[int]],
) -> list[str]:
    """Classes of ``tasks`` that have no training or no test images, one line each.

    A class without training images is never learned; one without test images is missing from the accuracy matrix
    (and a task whose classes all lack test images has no column at all), so either makes the reported numbers
    describe another experiment than the one configured.
    """
    n = len(class_names)
    train = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=n)
    test = np.bincount(np.asarray(test_targets, dtype=np.int64), minlength=n)
    problems = []
    for t, classes in enumerate(tasks):
        for c in classes:
            missing = [s for s, counts in (("training", train), ("test", test)) if counts[c] == 0]
            if missing:
                problems.append(
                    f"class {class_names[c]!r} (label {c}, task {t + 1}) has no {' and no '.join(missing)} images"
                )
    return problems


@dataclass
class DataCheck:
    """What :func:`check_dataset` found.

    Attributes:
        info: The dataset's description (``DatasetBundle.info``).
        class_names: Name of each label.
        train_counts: Training images per label (after ``train_per_class``).
        test_counts: Test images per label (after ``test_per_class``).
        files_checked: Image files (or dataset rows, ``hf``) decoded (0 for in-memory datasets, decoded when loaded).
        bad_files: ``(path or row, reason)`` of every image that cannot be decoded.
        problems: Classes of the scenario without training or test images (:func:`coverage_problems`).
    """

    info: dict[str, Any]
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    files_checked: int = 0
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.problems

    def format(self) -> str:
        """A plain-text report: the dataset, every bad file and every problem, one per line."""
        info = self.info
        text = info.get("modality") == "text"
        unit = "texts" if text else "images"
        lines = [
            f"dataset {info.get('name')} ({info.get('root') or 'no root'}, {info.get('split', 'split n/a')}): "
            f"{len(self.class_names)} classes, {sum(self.train_counts)} train / {sum(self.test_counts)} test {unit}"
        ]
        for split, counts in (("train", self.train_counts), ("test", self.test_counts)):
            if counts:
                lo, hi = int(np.argmin(counts)), int(np.argmax(counts))
                lines.append(
                    f"  {split} {unit} per class: min {counts[lo]} ({self.class_names[lo]!r}), "
                    f"max {counts[hi]} ({self.class_names[hi]!r})"
                )
        if text:
            tok = info.get("tokens", {})
            lines.append(
                f"every row read and tokenised: {tok.get('mean_tokens')} tokens on average, longest "
                f"{tok.get('max_tokens')}; {tok.get('at_max_length')} text(s) fill data.max_length = "
                f"{tok.get('max_length')} (truncated, or exactly that long)"
            )
        elif self.files_checked:
            what = "dataset images" if self.info.get("name") == "hf" else "image files"
            lines.append(f"decoded {self.files_checked} {what}: {len(self.bad_files)} unreadable")
        else:
            lines.append("images are held in memory (decoded when the dataset was loaded)")
        lines += [f"  {reason}" for _, reason in self.bad_files]
        if self.problems:
            lines.append(f"{len(self.problems)} class(es) of the scenario cannot be trained or evaluated:")
            lines += [f"  {p}" for p in self.problems]
        lines.append("ok" if self.ok else "problems found")
        return "\n".join(lines)


def _tqdm_progress(desc: str) -> Callable[[Iterable[Any], int], Iterable[Any]] | None:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda it, total: tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


def check_dataset(
    cfg: DataConfig,
    seed: int,
    make_tasks: Callable[[int], Sequence[Sequence[int]]] | None = None,
    *,
    workers: int | None = None,
    all_files: bool = False,
    tokenizer: Callable[[], Any] | None = None,
) -> DataCheck:
    """Load the dataset of ``cfg`` and decode every image file a run would read (text datasets: read and tokenise
    every row, so bad rows are named and the token statistics, truncation included, are in ``info``).

    Args:
        cfg: Data configuration.
        seed: The run's seed (per-class subsets and single-tree splits depend on it).
        make_tasks: ``num_classes -> original class ids per task`` (the scenario's ``tasks``), for
            :func:`coverage_problems`; None: all classes as one task.
        workers: Decoding processes (None: ``cfg.num_workers``).
        all_files: Decode every file of the dataset, not only the per-class subsets the config selects.
        tokenizer: Returns the backbone's tokenizer; called only for a text dataset (which needs it).

    Raises:
        FileNotFoundError, ValueError: The dataset itself cannot be listed (missing root, bad split files, bad
            rows ...), or it is a text dataset and no ``tokenizer`` was given.
    """
    if all_files:
        cfg = dataclasses.replace(cfg, train_per_class=None, test_per_class=None)
    raw = load_raw_dataset(cfg, seed)
    tok = None
    if raw.train.is_text:
        if tokenizer is None:
            raise ValueError(f"dataset {cfg.name!r} holds text: checking it needs the backbone's tokenizer")
        tok = tokenizer()
    bundle = build_dataset(cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed=seed, tokenizer=tok, raw=raw)
    n = bundle.num_classes
    check = DataCheck(
        info=bundle.info,
        class_names=list(bundle.class_names),
        train_counts=np.bincount(bundle.train_targets, minlength=n).tolist(),
        test_counts=np.bincount(bundle.test_targets, minlength=n).tolist(),
    )
    paths = [p for ds in (bundle.train, bundle.test) if isinstance(ds, FileImageDataset) for p in ds.paths]
    rows = [ds.rows for ds in (bundle.train, bundle.test) if isinstance(ds, RowImageDataset)]
    if rows:  # images inside a dataset (hf): decoded here, one at a time
        check.files_checked = sum(len(r) for r in rows)
        for r in rows:
            for i in range(len(r)):
                try:
                    r.read(i)
                except (OSError, ValueError) as e:
                    check.bad_files.append((r.name(i), str(e)))
    if paths:
        check.files_checked = len(paths)
        nw = cfg.num_workers if workers is None else workers
        check.bad_files = check_image_files(
            paths, workers=min(nw, os.cpu_count() or 1), progress=_tqdm_progress("decode")
        )
    check.problems = coverage_problems(
        bundle.class_names,
        bundle.train_targets,
        bundle.test_targets,
        make_tasks(n) if make_tasks is not None else [list(range(n))],
    )
    return check
