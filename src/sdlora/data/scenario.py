"""Class order and task split of a class-incremental scenario.

The class order reproduces the peers (PyCIL/PILOT/SD-LoRA ``data_manager``): ``np.random.seed(seed);
np.random.permutation(n)`` with numpy's legacy MT19937 ``RandomState``. A private ``RandomState(seed)`` yields the
identical permutation without touching numpy's global state. Known orders (also checked by the tests): seed 1993 on
200 classes starts [168, 136, 51, 9, 183], seed 1995/200 [146, 198, 169, 126, 142], seed 1994/100
[72, 6, 33, 96, 60], seed 1993/100 [68, 56, 78, 8, 23].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["Scenario", "TaskSubset", "make_scenario", "peer_class_order"]


def peer_class_order(num_classes: int, seed: int) -> list[int]:
    """The shuffled class order PyCIL/PILOT/SD-LoRA use for ``seed`` (legacy ``RandomState`` permutation)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


class TaskSubset(Dataset):
    """Samples of some classes, with labels mapped to class-order positions.

    Attributes:
        indices: Indices into the wrapped dataset.
        targets: Position labels of those samples (aligned with ``indices``).
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, label_map: np.ndarray, original: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        self.targets = label_map[np.asarray(original, dtype=np.int64)[self.indices]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[int(self.indices[i])]
        return x, int(self.label_map[int(y)])


@dataclass
class Scenario:
    """A class-incremental scenario.

    Attributes:
        class_order: All original class ids in order (a permutation of ``range(len(class_order))``).
        tasks: Original class ids per task, in order. May cover only a prefix of ``class_order`` when the scenario
            was truncated with ``num_tasks``.
        label_map: ``label_map[original id]`` = position of that class in ``class_order``.
    """

    class_order: list[int]
    tasks: list[list[int]]
    label_map: np.ndarray

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Number of classes in the scenario's tasks (positions ``0 .. num_classes - 1``)."""
        return sum(len(t) for t in self.tasks)

    def _check_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range: the scenario has {self.num_tasks} tasks")

    def classes_up_to(self, t: int) -> int:
        """Number of class positions seen after task ``t`` (0-based), i.e. the end of its range."""
        self._check_task(t)
        return sum(len(x) for x in self.tasks[: t + 1])

    def task_range(self, t: int) -> tuple[int, int]:
        """``[start, end)`` class positions of task ``t``."""
        end = self.classes_up_to(t)
        return end - len(self.tasks[t]), end

    def task_of_position(self, position: int) -> int:
        """Task that introduces the class at ``position``."""
        for t in range(self.num_tasks):
            start, end = self.task_range(t)
            if start <= position < end:
                return t
        raise IndexError(f"position {position} not in the scenario's {self.num_classes} classes")

    def subset(self, dataset: Dataset, targets: np.ndarray, tasks: Sequence[int]) -> TaskSubset:
        """Samples of ``dataset`` whose class belongs to one of ``tasks``; labels become class positions.

        Args:
            dataset: Yields ``(x, original label)``.
            targets: Original labels aligned with ``dataset``.
            tasks: 0-based task indices.
        """
        for t in tasks:
            self._check_task(t)
        targets = np.asarray(targets, dtype=np.int64)
        if len(targets) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(targets)} targets for a dataset of {len(dataset)} samples")  # type: ignore[arg-type]
        classes = [c for t in tasks for c in self.tasks[t]]
        idx = np.flatnonzero(np.isin(targets, classes))
        return TaskSubset(dataset, idx, self.label_map, targets)

    def to_dict(self) -> dict:
        """JSON-able record of the order and tasks."""
        return {"class_order": list(self.class_order), "tasks": [list(t) for t in self.tasks]}


def make_scenario(
    num_classes: int,
    init_cls: int,
    increment: int,
    *,
    seed: int,
    shuffle: bool = True,
    class_order: Sequence[int] | None = None,
    num_tasks: int | None = None,
) -> Scenario:
    """Build the class order and the task split.

    Args:
        num_classes: Classes in the dataset.
        init_cls: Classes in the first task.
        increment: Classes in every later task; ``num_classes - init_cls`` must be a multiple of it.
        seed: Seed of the shuffled order (peer-compatible, see :func:`peer_class_order`).
        shuffle: Shuffle with ``seed``; ``False`` keeps the natural order ``0 .. n-1``.
        class_order: Explicit order (a permutation of ``range(num_classes)``); overrides ``shuffle``.
        num_tasks: Keep only the first ``num_tasks`` tasks (e.g. short demos); must not exceed the task count.

    Raises:
        ValueError: Invalid sizes or class order.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if init_cls <= 0:
        raise ValueError(f"init_cls must be positive, got {init_cls}")
    if increment <= 0:
        raise ValueError(f"increment must be positive, got {increment}")
    if init_cls > num_classes:
        raise ValueError(f"init_cls={init_cls} is larger than the number of classes ({num_classes})")
    if (num_classes - init_cls) % increment != 0:
        raise ValueError(
            f"num_classes - init_cls = {num_classes - init_cls} is not divisible by increment={increment}; "
            "choose init_cls/increment that tile the classes exactly"
        )
    total = 1 + (num_classes - init_cls) // increment
    if num_tasks is not None:
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        if num_tasks > total:
            raise ValueError(
                f"num_tasks={num_tasks} but init_cls={init_cls}, increment={increment} on {num_classes} classes "
                f"give only {total} tasks"
            )
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1} (got {len(order)} entries)")
    elif shuffle:
        order = peer_class_order(num_classes, seed)
    else:
        order = list(range(num_classes))
    sizes = [init_cls] + [increment] * (total - 1)
    if num_tasks is not None:
        sizes = sizes[:num_tasks]
    tasks, start = [], 0
    for s in sizes:
        tasks.append(order[start : start + s])
        start += s
    label_map = np.empty(num_classes, dtype=np.int64)
    label_map[np.asarray(order, dtype=np.int64)] = np.arange(num_classes, dtype=np.int64)
    return Scenario(class_order=order, tasks=tasks, label_map=label_map)
