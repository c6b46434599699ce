"""Class-incremental metrics from an integer-indexed accuracy matrix (pure numpy, no I/O).

Setting: tasks ``0..T-1`` arrive in order; after training task ``i`` the model is evaluated on the test samples of
every task ``j <= i``, predicting by argmax over *all* classes seen so far (no task id). The raw input is a count
matrix ``correct[i][j]`` (correctly classified test samples of task ``j`` after training task ``i``) and the test
set sizes ``total[j]``. From these:

``R[i][j] = 100 * correct[i][j] / total[j]``, the accuracy (percent) on task ``j`` after training task ``i``.

An earlier task's test data may be unavailable when a later row is computed (``sdlora learn`` on a machine
where an old test set is gone): ``correct[i][j] = None`` for ``j < i`` marks "not evaluated". Such entries are
``None`` in the matrix and left out of the pooled accuracy, the mean task accuracy, forgetting and BWT; the
diagonal (a task right after its own training) is always required.

Everything is indexed by integer task position. The official SD-LoRA code rebuilt this matrix from string keys such
as ``'20-29'`` sorted as strings, so with 100 classes or more ``'100-109'`` sorted before ``'20-29'`` and the
reported forgetting mixed up tasks; storing counts by integer index makes that impossible here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_matrix", "compute_metrics"]


def _as_count(value: Any, where: str) -> int:
    # Counts may come back from JSON as 3.0 or from numpy as np.int64; anything non-integral is a caller bug.
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where} must be an integer count, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    raise ValueError(f"{where} must be an integer count, got {value!r}")


def _validate(correct: Sequence[Sequence[Any]], total: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the inputs and return ``(counts, totals, evaluated)``: int64 counts of shape ``(T, T)`` (0 above the
    diagonal and where not evaluated), int64 totals, and the boolean mask of evaluated entries (lower triangle
    minus the ``None`` entries below the diagonal)."""
    if isinstance(correct, np.ndarray) and correct.ndim != 2:
        raise ValueError(f"correct must be 2-D (rows = after task i), got an array of shape {correct.shape}")
    n = len(correct)
    if n == 0:
        raise ValueError("correct is empty: no completed task to compute metrics for")
    if len(total) < n:
        raise ValueError(f"total has {len(total)} entries but correct has {n} rows; need one total per task")
    totals = np.array([_as_count(total[j], f"total[{j}]") for j in range(n)], dtype=np.int64)
    bad = np.flatnonzero(totals <= 0)
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"total[{j}] = {totals[j]}: every task needs at least one test sample")
    counts = np.zeros((n, n), dtype=np.int64)
    evaluated = np.tril(np.ones((n, n), dtype=bool))
    for i in range(n):
        row = correct[i]
        # Entries above the diagonal (j > i) are undefined (task j not trained yet) and are ignored if present.
        if len(row) < i + 1:
            raise ValueError(
                f"correct[{i}] has {len(row)} entries; after task {i} it needs tasks 0..{i} (lower-triangular)"
            )
        for j in range(i + 1):
            if row[j] is None and j < i:  # an earlier task whose test data was not available for this row
                evaluated[i, j] = False
                continue
            c = _as_count(row[j], f"correct[{i}][{j}]")
            if c < 0:
                raise ValueError(f"correct[{i}][{j}] = {c} is negative")
            if c > totals[j]:
                raise ValueError(f"correct[{i}][{j}] = {c} exceeds total[{j}] = {totals[j]}")
            counts[i, j] = c
    return counts, totals, evaluated


def accuracy_matrix(correct: Sequence[Sequence[Any]], total: Sequence[Any]) -> np.ndarray:
    """Per-task accuracy matrix in percent.

    Args:
        correct: ``correct[i][j]`` = number of correctly classified test samples of task ``j`` after training task
            ``i``, for ``j <= i``; one row per completed task (rows may be ragged; entries with ``j > i`` are
            ignored).
        total: ``total[j]`` = number of test samples of task ``j``. May be longer than ``correct`` (planned tasks
            not run yet); only the first ``len(correct)`` entries are used.

    Returns:
        Float array ``R`` of shape ``(T, T)``, ``T = len(correct)``, with ``R[i, j] = 100 * correct[i][j] / total[j]``
        for ``j <= i`` and NaN above the diagonal.

    Raises:
        ValueError: If a row is shorter than ``i + 1``, a count is not an integer (``None`` is allowed below the
            diagonal: not evaluated, NaN here), negative or larger than its total, a total is not positive,
            ``total`` is shorter than ``correct``, or ``correct`` is empty.
    """
    counts, totals, evaluated = _validate(correct, total)
    acc: np.ndarray = 100.0 * counts / totals[None, :]
    acc[~evaluated] = np.nan
    return acc


def compute_metrics(correct: Sequence[Sequence[Any]], total: Sequence[Any]) -> dict[str, Any]:
    """Class-incremental metrics for the ``T`` completed tasks (see :func:`accuracy_matrix` for the inputs).

    With ``R`` the accuracy matrix (percent) and ``T`` the number of completed tasks (fewer than planned for a
    partial run):

    * ``acc_after_task[i] = 100 * sum_{j<=i} correct[i][j] / sum_{j<=i} total[j]``: top-1 accuracy on the pooled
      test samples of all classes seen after task ``i``. This is the sample-weighted quantity the SD-LoRA code
      logs as the "CNN top1 curve"; it differs from the mean of ``R[i][:i+1]`` when test sets are unbalanced
      (ImageNet-R/A).
    * ``acc = acc_after_task[T-1]``: the paper's "Acc", accuracy on all tasks after the last one
      (Wu et al., SD-LoRA, ICLR 2025, §4.1).
    * ``aaa = mean_i acc_after_task[i]``: the paper's AAA, "average anytime accuracy" (SD-LoRA §4.1); the same as
      the average incremental accuracy of iCaRL (Rebuffi et al., CVPR 2017).
    * ``mean_task_acc = mean_j R[T-1][j]``: unweighted mean of the per-task accuracies after the last task.
    * ``forgetting = mean_{j<T-1} ( max_{i in [j, T-2]} R[i][j] - R[T-1][j] )``: average forgetting of Chaudhry et
      al., "Riemannian Walk for Incremental Learning" (ECCV 2018): the best accuracy ever reached on an
      old task minus its final accuracy. ``None`` when ``T == 1``.
    * ``bwt = mean_{j<T-1} ( R[T-1][j] - R[j][j] )``: backward transfer of Lopez-Paz & Ranzato, "Gradient Episodic
      Memory for Continual Learning" (NeurIPS 2017); negative values mean forgetting. ``None`` when ``T == 1``.
    * ``test_samples_per_task``: ``total[:T]``.

    Args:
        correct: Counts ``correct[i][j]`` for ``j <= i``, one row per completed task.
        total: Test samples per task (at least ``T`` entries).

    Returns:
        A JSON-able dict with keys ``accuracy_matrix`` (list of lists, ``None`` above the diagonal and where not
        evaluated),
        ``acc_after_task``, ``acc``, ``aaa``, ``mean_task_acc``, ``forgetting``, ``bwt`` and
        ``test_samples_per_task``. All numbers are plain Python floats/ints, accuracies in percent.

    Raises:
        ValueError: For invalid inputs (see :func:`accuracy_matrix`).
    """
    counts, totals, evaluated = _validate(correct, total)
    n = len(totals)
    R = 100.0 * counts / totals[None, :]  # (T, T); entries not evaluated are 0 and never read below

    # Pooled over the samples of all seen (and evaluated) tasks: row sums of counts over the matching totals.
    acc_after_task = 100.0 * counts.sum(axis=1) / (evaluated * totals[None, :]).sum(axis=1)
    last = R[n - 1]
    last_ok = evaluated[n - 1]
    forgetting: float | None = None
    bwt: float | None = None
    if n > 1:
        # best[j] = max over rows j..T-2 of column j; rows above j (task j not learned yet) and entries not
        # evaluated are masked out. Old tasks not evaluated in the last row have no forgetting to report.
        best = np.where(evaluated[: n - 1, : n - 1], R[: n - 1, : n - 1], -np.inf).max(axis=0)
        old = last_ok[: n - 1]
        forgetting = float(np.mean((best - last[: n - 1])[old])) if old.any() else None
        bwt = float(np.mean((last[: n - 1] - np.diag(R)[: n - 1])[old])) if old.any() else None

    return {
        "accuracy_matrix": [[float(R[i, j]) if evaluated[i, j] else None for j in range(n)] for i in range(n)],
        "acc_after_task": [float(a) for a in acc_after_task],
        "acc": float(acc_after_task[-1]),
        "aaa": float(acc_after_task.mean()),
        "mean_task_acc": float(last[last_ok].mean()),
        "forgetting": forgetting,
        "bwt": bwt,
        "test_samples_per_task": [int(t) for t in totals],
    }
