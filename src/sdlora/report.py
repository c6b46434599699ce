"""Tables and plots from run directories.

A run directory holds ``results.json`` (written by the engine; its keys are defined once, by
:class:`sdlora.results.RunResults`). This module turns one run into CSV tables and plots next to it, several runs
into a markdown overview, and several seeds of several methods into a comparison (mean and sample standard deviation
over seeds).

This module owns the derived files of a run directory (``metrics.csv``, ``accuracy_matrix.csv``, ``plots/``): the
engine sends its progress to :func:`on_run_event`, which writes the tables after every task and the plots at the
end; ``sdlora report`` rewrites them from ``results.json`` at any time.

Task numbers in every table and plot are 1-based ("after task 1" is after the first task), as in the paper;
``results.json`` itself stores plain lists indexed from 0.

matplotlib is imported lazily inside the plotting functions and used through its object-oriented API with the Agg
canvas, so importing sdlora never pulls in matplotlib and no global pyplot state or backend is touched.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np

from .environment import short_environment
from .fileio import atomic_write_bytes, atomic_write_text
from .results import RunEvent, load_results

__all__ = [
    "compare_tables",
    "format_task_table",
    "load_compare_runs",
    "load_results",
    "on_run_event",
    "plot_compare",
    "plot_run",
    "report",
    "report_table",
    "write_compare",
    "write_run_tables",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# small formatting helpers
# --------------------------------------------------------------------------------------------------------------------


def _is_num(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _f(x: Any, digits: int = 2) -> str:
    """Number with fixed decimals; ``n/a`` for None/NaN (forgetting of a one-task run)."""
    return f"{x:.{digits}f}" if _is_num(x) else "n/a"


def _csv_num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _is_num(x) else ""


def _int_or_blank(x: Any) -> str:
    return str(int(x)) if _is_num(x) else ""


def _params(x: Any) -> str:
    return f"{int(x):,}" if _is_num(x) else "n/a"


def _duration(seconds: Any) -> str:
    if not _is_num(seconds):
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _matrix(results: Mapping[str, Any]) -> list[list[float | None]]:
    """The accuracy matrix as a square list of lists (None above the diagonal), one row per completed task."""
    rows = results["accuracy_matrix"]
    n = len(rows)
    return [[(rows[i][j] if j < len(rows[i]) and j <= i else None) for j in range(n)] for i in range(n)]


def _dataset_name(results: Mapping[str, Any]) -> str:
    ds = results.get("dataset")
    return str(ds.get("name", "?")) if isinstance(ds, Mapping) else str(ds)


def _tasks_text(results: Mapping[str, Any]) -> str:
    done = results.get("completed_tasks", len(results["accuracy_matrix"]))
    planned = results.get("num_tasks", done)
    return str(done) if done == planned else f"{done}/{planned}"


def _max_or_none(values: Any) -> int | None:
    nums = [v for v in (values or []) if _is_num(v)]
    return int(max(nums)) if nums else None


def _labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Directory names for display; the paths as given when two runs share a name (runs/a/s0 vs runs/b/s0)."""
    paths = [os.path.normpath(os.fspath(d)) for d in run_dirs]
    names = [os.path.basename(p) or p for p in paths]
    return names if len(set(names)) == len(names) else paths


# --------------------------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------------------------


def write_run_tables(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> list[str]:
    """Write ``metrics.csv`` and ``accuracy_matrix.csv`` into ``run_dir`` (atomically).

    ``metrics.csv`` has one row per completed task: ``task`` (1-based), ``new_classes``, ``classes_seen``,
    ``acc_after_task`` (sample-weighted accuracy on all seen classes), ``mean_task_acc_so_far`` (unweighted mean of
    that row of the accuracy matrix), ``trainable_params`` and ``acc_task_<j>`` for every task ``j`` (empty for tasks
    not yet trained). ``accuracy_matrix.csv`` has rows ``after_task`` = i and columns ``task_<j>``, empty above the
    diagonal. Accuracies are percent with 4 decimals.

    Args:
        run_dir: Run directory.
        results: The run's results; loaded from ``results.json`` when None.

    Returns:
        Paths of the two files written.
    """
    run_dir = os.fspath(run_dir)
    if results is None:
        results = load_results(run_dir)
    R = _matrix(results)
    n = len(R)
    tasks = results.get("tasks") or []
    params = results.get("trainable_params_per_task") or []
    curve = results["acc_after_task"]

    header = ["task", "new_classes", "classes_seen", "acc_after_task", "mean_task_acc_so_far", "trainable_params"]
    header += [f"acc_task_{j + 1}" for j in range(n)]
    rows = []
    seen: int | None = 0
    for i in range(n):
        new = len(tasks[i]) if i < len(tasks) else None
        seen = seen + new if new is not None and seen is not None else None
        row_vals = [v for v in R[i][: i + 1] if _is_num(v)]
        rows.append(
            [
                i + 1,
                _int_or_blank(new),
                _int_or_blank(seen),
                _csv_num(curve[i] if i < len(curve) else None),
                _csv_num(sum(row_vals) / len(row_vals) if row_vals else None),
                _int_or_blank(params[i] if i < len(params) else None),
            ]
            + [_csv_num(v) for v in R[i]]
        )
    metrics_path = os.path.join(run_dir, "metrics.csv")
    atomic_write_text(metrics_path, _csv_text(header, rows))

    matrix_path = os.path.join(run_dir, "accuracy_matrix.csv")
    atomic_write_text(
        matrix_path,
        _csv_text(
            ["after_task"] + [f"task_{j + 1}" for j in range(n)],
            [[i + 1] + [_csv_num(v) for v in R[i]] for i in range(n)],
        ),
    )
    return [metrics_path, matrix_path]


def _save_figure(fig: Any, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _run_title(results: Mapping[str, Any]) -> str:
    return f"{results.get('method', '?')} on {_dataset_name(results)} (seed {results.get('seed', '?')})"


def plot_run(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> list[str]:
    """Write ``plots/accuracy_matrix.png`` (heatmap with values) and ``plots/accuracy_curve.png`` into ``run_dir``.

    Args:
        run_dir: Run directory; ``plots/`` is created if needed.
        results: The run's results; loaded from ``results.json`` when None.

    Returns:
        Paths of the two PNG files.
    """
    from matplotlib.figure import Figure

    run_dir = os.fspath(run_dir)
    if results is None:
        results = load_results(run_dir)
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    R = _matrix(results)
    n = len(R)
    ticks = list(range(n))
    tick_labels = [str(j + 1) for j in ticks]

    size = min(4.0 + 0.45 * n, 14.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    arr = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float))
    im = ax.imshow(arr, cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fontsize = max(5.0, 10.0 - 0.25 * n)
    for i in range(n):
        for j in range(i + 1):
            v = R[i][j]
            if _is_num(v):
                # Dark cells (low accuracy in viridis) need white text to stay readable.
                ax.text(
                    j, i, f"{v:.1f}", ha="center", va="center", fontsize=fontsize, color="white" if v < 60 else "black"
                )
    ax.set_xticks(ticks, tick_labels)
    ax.set_yticks(ticks, tick_labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_title(_run_title(results))
    matrix_png = os.path.join(plots, "accuracy_matrix.png")
    _save_figure(fig, matrix_png)

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    curve = [np.nan if v is None else v for v in results["acc_after_task"]]
    ax.plot(range(1, len(curve) + 1), curve, marker="o")
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_xticks(range(1, len(curve) + 1))
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{_run_title(results)}: Acc {_f(results.get('acc'))}, AAA {_f(results.get('aaa'))}")
    curve_png = os.path.join(plots, "accuracy_curve.png")
    _save_figure(fig, curve_png)
    return [matrix_png, curve_png]


def on_run_event(event: RunEvent) -> None:
    """The engine's default listener: keep a run directory's derived files current while it runs.

    ``task_end`` and ``resumed``: write ``metrics.csv`` and ``accuracy_matrix.csv`` (:func:`write_run_tables`);
    ``run_end``: write the plots (:func:`plot_run`).
    """
    if event.kind in ("task_end", "resumed"):
        write_run_tables(event.run_dir, event.results)
    elif event.kind == "run_end":
        plot_run(event.run_dir, event.results)


def format_task_table(results: Mapping[str, Any]) -> str:
    """Plain-text per-task table for the terminal.

    One line per completed task: task number, classes seen, accuracy on all seen classes (sample-weighted) and the
    per-task accuracies of that row of the accuracy matrix; then a summary line with Acc, AAA, mean task accuracy,
    forgetting and BWT.

    Args:
        results: A results dict (see :class:`sdlora.results.RunResults`; needs at least ``accuracy_matrix`` and
            ``acc_after_task``).

    Returns:
        The table, lines joined with ``\\n``, no trailing newline.
    """
    R = _matrix(results)
    tasks = results.get("tasks") or []
    curve = results["acc_after_task"]
    lines = [f"{'task':>4}  {'classes':>7}  {'acc seen':>8}  per-task acc (%)"]
    seen = 0
    for i, row in enumerate(R):
        seen += len(tasks[i]) if i < len(tasks) else 0
        per_task = " ".join(f"{_f(v, 1):>5}" for v in row[: i + 1])
        classes = str(seen) if i < len(tasks) else "?"
        lines.append(f"{i + 1:>4}  {classes:>7}  {_f(curve[i] if i < len(curve) else None):>8}  {per_task}")
    summary = (
        f"Acc {_f(results.get('acc'))} | AAA {_f(results.get('aaa'))} | mean task acc "
        f"{_f(results.get('mean_task_acc'))} | forgetting {_f(results.get('forgetting'))} | "
        f"BWT {_f(results.get('bwt'))}"
    )
    done = results.get("completed_tasks", len(R))
    planned = results.get("num_tasks", done)
    if done != planned:
        summary += f" | partial run: {done}/{planned} tasks"
    lines.append(summary)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# several runs
# --------------------------------------------------------------------------------------------------------------------

_REPORT_HEADER = (
    "run",
    "method",
    "dataset",
    "seed",
    "tasks",
    "Acc",
    "AAA",
    "mean task acc",
    "forgetting",
    "BWT",
    "trainable params/task",
    "stored params",
    "wall time",
    "environment",
)


def _report_rows(labels: Sequence[str], all_results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            label,
            str(r["method"]),
            _dataset_name(r),
            str(r["seed"]),
            _tasks_text(r),
            _f(r["acc"]),
            _f(r["aaa"]),
            _f(r["mean_task_acc"]),
            _f(r["forgetting"]),
            _f(r["bwt"]),
            _params(_max_or_none(r["trainable_params_per_task"])),
            _params(r["stored_params_total"]),
            _duration(r["wall_time_s"]),
            short_environment(r.get("environment") or {}),
        ]
        for label, r in zip(labels, all_results, strict=True)
    ]


def report_table(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Markdown table with one row per run, without writing anything.

    Columns: run directory name, method, dataset, seed, tasks (``done/planned`` for a partial run), Acc, AAA, mean
    task accuracy, forgetting, BWT, trainable parameters per task (the maximum over tasks), stored parameters,
    wall time and the environment (:func:`sdlora.environment.short_environment`).

    Args:
        run_dirs: Run directories, each with a ``results.json``.

    Returns:
        The markdown table.

    Raises:
        FileNotFoundError: If a run has no ``results.json``.
        ValueError: If a ``results.json`` is corrupt or incomplete.
    """
    all_results = [load_results(d) for d in run_dirs]
    return _md_table(_REPORT_HEADER, _report_rows(_labels(run_dirs), all_results))


def report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    regenerate: bool | Callable[[str | os.PathLike], object] = True,
) -> str:
    """Summarize runs as a markdown table, optionally writing a report with a curves plot.

    All ``results.json`` files are loaded and checked before anything is written.

    Args:
        run_dirs: Run directories, each with a ``results.json``.
        out_dir: If given, ``report.md`` (the table plus a link to the plot) and ``plots/curves.png``
            (``acc_after_task`` of every run) are written there.
        regenerate: Rewrite each run's own tables and plots: a function called with each run directory
            (``sdlora report`` passes :func:`sdlora.rundir.regenerate_run_files`, which holds the run's lock and
            reads ``results.json`` again under it, so a run being written is never given stale tables), or
            ``True``: :func:`write_run_tables` and :func:`plot_run` from the records read here, without a lock
            (only for directories no process writes). A run directory that cannot be written (read-only archive)
            is skipped with a warning.

    Returns:
        The markdown table (see :func:`report_table`).

    Raises:
        FileNotFoundError: If a run has no ``results.json``.
        ValueError: If a ``results.json`` is corrupt or incomplete.
    """
    all_results = [load_results(d) for d in run_dirs]
    labels = _labels(run_dirs)
    table = _md_table(_REPORT_HEADER, _report_rows(labels, all_results))

    if callable(regenerate):
        for d in run_dirs:
            regenerate(d)
    elif regenerate:
        for d, r in zip(run_dirs, all_results, strict=True):
            try:
                write_run_tables(d, r)
                plot_run(d, r)
            except OSError as e:
                log.warning("could not regenerate tables/plots in %s: %s", os.fspath(d), e)

    if out_dir is not None:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        out_dir = os.fspath(out_dir)
        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
        fig = Figure(figsize=(7.0, 4.5))
        ax = fig.add_subplot()
        for label, r in zip(labels, all_results, strict=True):
            curve = [np.nan if v is None else v for v in r["acc_after_task"]]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy on seen classes (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if all_results:
            ax.legend(fontsize="small")
        _save_figure(fig, os.path.join(out_dir, "plots", "curves.png"))
        atomic_write_text(
            os.path.join(out_dir, "report.md"),
            f"# sdlora report\n\n{table}\n\n![accuracy on seen classes after each task](plots/curves.png)\n",
        )
    return table


# --------------------------------------------------------------------------------------------------------------------
# methods x seeds
# --------------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def _mean_std_text(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return _f(mean) if std is None else f"{_f(mean)} ({_f(std)})"


def _mean_or_none(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if _is_num(v)]
    return sum(nums) / len(nums) if nums else None


def inference_passes(results: Mapping[str, Any]) -> int:
    """Backbone forward passes a run's method needs per prediction (``RunResults.inference_passes``; 1 in records
    written before the field existed)."""
    value = results.get("inference_passes", 1)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1


_COMPARE_CSV_HEADER = [
    "method",
    "dataset",
    "n_runs",
    "seeds",
    "completed_tasks",
    "num_tasks",
    "acc_mean",
    "acc_std",
    "aaa_mean",
    "aaa_std",
    "mean_task_acc_mean",
    "forgetting_mean",
    "bwt_mean",
    "trainable_params_per_task_max",
    "stored_params",
    "inference_passes",
    "wall_time_s_mean",
]
_COMPARE_MD_HEADER = [
    "method",
    "dataset",
    "runs",
    "tasks",
    "Acc",
    "AAA",
    "forgetting",
    "trainable params/task",
    "stored params",
    "passes/prediction",
    "train time",
]


def load_compare_runs(runs: Mapping[str, Sequence[str | os.PathLike]]) -> dict[str, list[dict[str, Any]]]:
    """The ``results.json`` of every run, per method, checked so that means over seeds make sense.

    Raises:
        FileNotFoundError: If a run has no ``results.json``.
        ValueError: If a method has no runs, two runs with the same seed, or runs with different numbers of
            completed tasks; or if a ``results.json`` is corrupt or incomplete.
    """
    loaded: dict[str, list[dict[str, Any]]] = {}
    for method, dirs in runs.items():
        if not dirs:
            raise ValueError(f"method {method!r} has no run directories")
        results = [load_results(d) for d in dirs]
        seeds = [r["seed"] for r in results]
        if len(set(map(str, seeds))) != len(seeds):
            raise ValueError(
                f"method {method!r}: several runs with the same seed ({seeds}) among {list(map(str, dirs))}"
            )
        lengths = {len(r["acc_after_task"]) for r in results}
        if len(lengths) != 1:
            raise ValueError(
                f"method {method!r}: runs completed different numbers of tasks ({sorted(lengths)}); "
                "means over seeds would mix different points of the task sequence"
            )
        loaded[method] = results
    return loaded


def _compare_rows(method: str, results: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """One method's row of ``compare.csv`` and of the markdown table."""
    acc_mean, acc_std = _mean_std([r["acc"] for r in results])
    aaa_mean, aaa_std = _mean_std([r["aaa"] for r in results])
    forgetting = _mean_or_none([r["forgetting"] for r in results])
    wall = _mean_or_none([r["wall_time_s"] for r in results])
    trainable = _max_or_none([p for r in results for p in (r["trainable_params_per_task"] or [])])
    stored = _max_or_none([r["stored_params_total"] for r in results])
    passes = max(inference_passes(r) for r in results)
    datasets = " / ".join(sorted({_dataset_name(r) for r in results}))
    done = results[0]["completed_tasks"]
    planned = max(r["num_tasks"] for r in results)
    csv_row = [
        method,
        datasets,
        len(results),
        " ".join(str(r["seed"]) for r in results),
        done,
        planned,
        _csv_num(acc_mean),
        _csv_num(acc_std),
        _csv_num(aaa_mean),
        _csv_num(aaa_std),
        _csv_num(_mean_or_none([r["mean_task_acc"] for r in results])),
        _csv_num(forgetting),
        _csv_num(_mean_or_none([r["bwt"] for r in results])),
        _int_or_blank(trainable),
        _int_or_blank(stored),
        passes,
        _csv_num(wall, 1),
    ]
    md_row = [
        method,
        datasets,
        len(results),
        _tasks_text(results[0]),
        _mean_std_text([r["acc"] for r in results]),
        _mean_std_text([r["aaa"] for r in results]),
        _f(forgetting),
        _params(trainable),
        _params(stored),
        passes,
        _duration(wall),
    ]
    return csv_row, md_row


def compare_tables(loaded: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, str]:
    """The text of ``compare.csv`` and of ``compare.md`` for runs as :func:`load_compare_runs` returns them."""
    rows = [_compare_rows(method, results) for method, results in loaded.items()]
    markdown = (
        "# sdlora comparison\n\n"
        + _md_table(_COMPARE_MD_HEADER, [md for _, md in rows])
        + "\n\nAcc and AAA: mean (sample std, ddof=1) over runs; forgetting and train time: mean over runs.\n\n"
        + "![mean accuracy on seen classes after each task](plots/compare_curves.png)\n"
    )
    return _csv_text(_COMPARE_CSV_HEADER, [c for c, _ in rows]), markdown


def plot_compare(loaded: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> None:
    """Mean ``acc_after_task`` per method, with a +-1 std band (ddof=1) when a method has several runs."""
    _save_figure(compare_figure(loaded), os.fspath(path))


def compare_figure(loaded: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """The figure of :func:`plot_compare` (a matplotlib ``Figure``, not saved).

    Methods are drawn and listed best first (by mean final accuracy), each with its own colour and line style: the
    default ten-colour cycle repeats from the eleventh method (``sdlora compare --methods all`` has 18), so more
    methods take the twenty colours of ``tab20`` and, beyond those, a second line style. With more than six methods
    the legend stands beside the axes instead of over the curves.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = {
        method: np.array([[np.nan if v is None else v for v in r["acc_after_task"]] for r in results], dtype=float)
        for method, results in loaded.items()
    }
    final = {m: float(c.mean(axis=0)[-1]) for m, c in curves.items()}
    # Best first; sorted() is stable, so ties keep their input order; unfinished curves go last.
    order = sorted(curves, key=lambda m: -final[m] if np.isfinite(final[m]) else np.inf)
    many = len(order) > 10
    n_colors = 20 if many else 10
    cmap = colormaps["tab20" if many else "tab10"]
    palette = [cmap(i) for i in range(n_colors)]
    styles = ("-", "--", ":", "-.")
    fig = Figure(figsize=(9.0, 4.5) if len(order) > 6 else (7.0, 4.5))
    ax = fig.add_subplot()
    for i, method in enumerate(order):
        c = curves[method]
        x = np.arange(1, c.shape[1] + 1)
        mean = c.mean(axis=0)
        color = palette[i % len(palette)]
        style = styles[(i // len(palette)) % len(styles)]
        ax.plot(x, mean, marker="o", markersize=3, color=color, linestyle=style, label=f"{method} (n={len(c)})")
        if len(c) > 1:
            std = c.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.1 if many else 0.2, linewidth=0)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if len(order) > 6:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif order:
        ax.legend(fontsize="small")
    return fig


def write_compare(
    runs: Mapping[str, Sequence[str | os.PathLike]], out_dir: str | os.PathLike, skipped: Sequence[str] = ()
) -> str:
    """Compare methods over seeds: ``compare.csv``, ``compare.md`` and ``plots/compare_curves.png`` in ``out_dir``.

    One row per method. Acc and AAA are given as "mean (std)" with the sample standard deviation (ddof=1) over the
    method's runs, or just the mean for a single run. (The paper's parenthesized numbers are standard errors,
    std / sqrt(n).) Forgetting and train time are means, trainable parameters per task the maximum over tasks and
    runs, stored parameters the maximum over runs, passes/prediction the backbone forward passes per prediction
    (:func:`inference_passes`; prompt methods need two). The plot shows the mean ``acc_after_task`` per method
    with a +-1 std band when there are several runs.

    Args:
        runs: Method name -> run directories of that method (one per seed).
        out_dir: Output directory (created if needed).
        skipped: methods not run and why (``"name: reason"``), listed under the table.

    Returns:
        The markdown written to ``compare.md``.

    Raises:
        FileNotFoundError: If a run has no ``results.json``.
        ValueError: If a method has no runs, two runs with the same seed, or runs with different numbers of
            completed tasks; or if a ``results.json`` is corrupt or incomplete.
    """
    loaded = load_compare_runs(runs)
    csv_text, markdown = compare_tables(loaded)
    if skipped:
        markdown += "\nNot run (the method cannot work on this backbone):\n\n" + "".join(f"- {s}\n" for s in skipped)
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "compare.csv"), csv_text)
    atomic_write_text(os.path.join(out_dir, "compare.md"), markdown)
    plot_compare(loaded, os.path.join(out_dir, "plots", "compare_curves.png"))
    return markdown
