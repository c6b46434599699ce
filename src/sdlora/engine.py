"""The one training loop: tasks, epochs, batches, evaluation, metrics, checkpoints, resume, torchrun.

The engine drives a run; its parts live below it: ``distributed`` (processes, devices, collectives),
``batches`` (seeded augmentation, batch order, loaders), ``training`` (optimiser, epochs, evaluation) and
``runstate`` (what the loop carries from task to task). Files
of the run directory are read and written through ``rundir`` (status, checkpoints, RNG) and ``results`` (the
record); the derived tables and plots belong to ``report``, which listens to the run's events. Methods only
implement hooks (``methods/base.py``).

Pieces, from the outside in:

* :func:`run_experiment` -- a whole run into a run directory (prepare or resume it, build everything, loop over
  the tasks, write ``results.json`` and a checkpoint after each, tell the listeners);
* :func:`run_task` -- one task on a given method: train, ``end_task``, evaluate on every task so far, update
  the :class:`RunState` (also usable outside a scenario loop, e.g. to add a task to a finished run);
* :class:`~sdlora.runstate.RunState` -- what the loop carries from task to task (accuracy counts, test totals,
  trainable counts, task log, wall time, next task), saved in every checkpoint and restored on resume.

Determinism. Augmentation and batch order are seeded per sample and per epoch (``batches``), so results do not
depend on ``num_workers``, on the number of processes under torchrun, or on whether a run was resumed. The global
RNG state is also saved in every checkpoint and restored on resume (it drives parameter initialisation).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from . import __version__
from .backbones import Backbone, create_backbone
from .batches import SeededAugment, shard_loader
from .config import RunConfig
from .configtools import ConfigError, dump_yaml, to_dict
from .data import Batch, DatasetBundle, Scenario, batch_to, build_dataset, load_raw_dataset
from .data.check import coverage_problems
from .data.identity import identity_changes
from .distributed import DistInfo, all_reduce_sum, check_ranks_agree, init_distributed, select_device
from .environment import capture_environment
from .fileio import atomic_write_json, atomic_write_text, read_json
from .methods import Method, TaskContext, create_method, resolve_method_config
from .report import on_run_event
from .results import RESULTS_FILE, RunEvent, RunResults
from .rundir import (
    CONFIG_HEADER,
    RunError,
    build_method_from_run,
    committed_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    prune_checkpoints,
    restore_rng_state,
    run_dir_lock,
    save_checkpoint,
    seed_everything,
)
from .runstate import RunState
from .tracking import RunTracking
from .training import Runtime, evaluate, train_task

__all__ = [
    "RunError",
    "TaskData",
    "build_method_from_run",
    "build_results",
    "build_run",
    "load_checkpoint",
    "run_experiment",
    "run_task",
    "task_data",
]

log = logging.getLogger(__name__)
#: the package logger: the run's log.txt handler goes here, so every sdlora module's messages reach it
_pkg_log = logging.getLogger("sdlora")

#: a listener of the run's progress (see :class:`sdlora.results.RunEvent`)
EventHandler = Callable[[RunEvent], None]


# ------------------------------------------------------------------------------------------ one task
@dataclass
class TaskData:
    """The data of one task, labels already mapped to class positions.

    Attributes:
        task: 0-based index of the task.
        class_start, class_end: its classes are positions ``[class_start, class_end)``.
        train: its training samples ``(x, position)`` with training transforms.
        statistics: the same samples with evaluation transforms (for ``TaskContext.statistics_batches``).
        test: test samples of every task so far (positions ``< class_end``).
        task_of_position: for each position ``< class_end``, the task that introduced it (groups the test
            accuracy by task).
    """

    task: int
    class_start: int
    class_end: int
    train: Dataset
    statistics: Dataset
    test: Dataset
    task_of_position: list[int]

    def __post_init__(self) -> None:
        if len(self.task_of_position) != self.class_end:
            raise ValueError(
                f"task_of_position has {len(self.task_of_position)} entries for {self.class_end} class positions"
            )


def task_data(scenario: Scenario, data: DatasetBundle, t: int) -> TaskData:
    """Task ``t`` of ``scenario`` over ``data``: its training samples and the test samples of tasks ``0..t``."""
    start, end = scenario.task_range(t)
    train_eval = copy.copy(data.train)
    if hasattr(train_eval, "transform") and hasattr(data.test, "transform"):
        train_eval.transform = data.test.transform  # statistics use evaluation transforms
    return TaskData(
        task=t,
        class_start=start,
        class_end=end,
        train=scenario.subset(data.train, data.train_targets, [t]),
        statistics=scenario.subset(train_eval, data.train_targets, [t]),
        test=scenario.subset(data.test, data.test_targets, list(range(t + 1))),
        task_of_position=[scenario.task_of_position(p) for p in range(end)],
    )


def run_task(
    method: Method,
    state: RunState,
    task: TaskData,
    rt: Runtime,
    *,
    num_tasks: int,
    not_evaluated: Sequence[int] = (),
) -> dict[str, Any]:
    """Learn one task and evaluate on every task so far; updates ``state`` in place.

    ``begin_task`` -> training epochs -> ``end_task`` -> ``after_task`` (optional classifier alignment) -> (under
    torchrun) the check that every process holds the same state -> evaluation on ``task.test`` (argmax over all seen
    classes) -> ``state`` gets the new row of counts, the test totals, the trainable count, the log entry, the wall
    time and ``next_task``.

    Args:
        method: the method, on ``rt.device``, with tasks ``0..task.task - 1`` learned.
        state: the run state; ``state.next_task`` must equal ``task.task``.
        task: the task's data.
        rt: train settings, seed, device, processes.
        num_tasks: tasks planned (``TaskContext.num_tasks``; e.g. InfLoRA's threshold schedule reads it).
        not_evaluated: earlier tasks whose test samples ``task.test`` does not hold (their test data is gone):
            their entry in the new row is ``None`` and their recorded test totals are kept (``sdlora learn``).

    Returns:
        The task's log entry (also appended to ``state.task_log``): ``task``, ``classes`` ``[start, end)``,
        ``train_time_s``, ``eval_time_s``, ``epochs``, ``steps``, ``loss``, ``method_report``.

    Raises:
        RunError: ``task.task`` is not the state's next task, or training diverged.
    """
    t = task.task
    if t != state.next_task:
        raise RunError(f"cannot run task {t + 1}: the run's next task is task {state.next_task + 1}")
    if any(not 0 <= j < t for j in not_evaluated):
        raise ValueError(f"not_evaluated must name earlier tasks (0..{t - 1}), got {sorted(not_evaluated)}")
    t0 = time.time()
    tcfg, device, info = rt.train, rt.device, rt.info

    def statistics_batches() -> Iterator[tuple[Batch, Tensor]]:
        for x, y in shard_loader(task.statistics, tcfg.eval_batch_size, rt.workers, device, info):
            yield batch_to(x, device), y.to(device)

    ctx = TaskContext(
        task=t,
        num_tasks=num_tasks,
        class_start=task.class_start,
        class_end=task.class_end,
        device=device,
        epochs=tcfg.epochs_for(t),
        statistics_batches=statistics_batches,
        all_reduce=lambda x: all_reduce_sum(x, info),
        seed=rt.seed,
    )
    method.begin_task(ctx)
    trainable = int(method.parameter_counts()["trainable"])
    train_set = SeededAugment(task.train, base_seed=rt.seed * 1000 + t)
    steps_before = sum(int(e.get("steps") or 0) for e in state.task_log)
    train_stats = train_task(method, ctx, train_set, rt, steps_before)
    end_report = method.end_task(ctx)
    end_report.update(method.after_task(ctx))  # optional classifier alignment (method.align)
    check_ranks_agree(method, info, device, t)
    t_train = time.time() - t0
    test_loader = shard_loader(task.test, tcfg.eval_batch_size, rt.workers, device, info)
    task_of_pos = torch.tensor(task.task_of_position, dtype=torch.long, device=device)
    correct, total = evaluate(method, test_loader, task_of_pos, t + 1, device, tcfg, info)
    entry = {
        "task": t,
        "classes": [task.class_start, task.class_end],
        "train_time_s": round(t_train, 3),
        "eval_time_s": round(time.time() - t0 - t_train, 3),
        **train_stats,
        "method_report": end_report,
    }
    row: list[int | None] = list(correct)
    for j in not_evaluated:
        row[j] = None
        total[j] = state.totals[j]
    state.correct.append(row)
    state.totals = total  # totals of earlier tasks do not change
    state.trainable_per_task.append(trainable)
    state.task_log.append(entry)
    state.next_task = t + 1
    state.wall_time_s = state.elapsed_before + (time.time() - state.session_start)
    if info.main:
        _log_task(state, task, num_tasks, t_train)
    return entry


def _log_task(state: RunState, task: TaskData, num_tasks: int, t_train: float) -> None:
    """The one progress line of a finished task: accuracy on every class seen so far and per task."""
    metrics, t = state.metrics(), task.task
    log.info(
        "task %d/%d | classes %d-%d | acc on %d seen classes %.2f%% | per task %s | %.1fs",
        t + 1,
        num_tasks,
        task.class_start,
        task.class_end - 1,
        task.class_end,
        metrics["acc_after_task"][-1],
        " ".join("-" if v is None else f"{v:.1f}" for v in metrics["accuracy_matrix"][-1][: t + 1]),
        t_train,
    )


# ------------------------------------------------------------------------------------------ the run
def build_run(cfg: RunConfig, device: torch.device) -> tuple[Backbone, DatasetBundle, Scenario, Method]:
    """The pieces of a run, built from its config as :func:`run_experiment` builds them: the dataset's files and
    labels first (a wrong ``data.root`` fails before any backbone download), then the global RNG seeded with
    ``cfg.seed``, the backbone, the dataset (subsets drawn with the seed), the scenario and the fresh method on
    ``device``.

    Raises:
        ConfigError: a class of the scenario has no training or no test images (``data``), or a backbone setting
            does not fit (``backbone.kwargs``, ``data.image_size``); all before anything is trained.
    """
    raw = load_raw_dataset(cfg.data, cfg.seed)
    seed_everything(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    data = build_dataset(
        cfg.data, mean=backbone.mean, std=backbone.std, seed=cfg.seed, tokenizer=backbone.tokenizer, raw=raw
    )
    scenario = cfg.scenario.make(data.num_classes, cfg.seed)
    problems = coverage_problems(data.class_names, data.train_targets, data.test_targets, scenario.tasks)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(
            f"{len(problems)} class(es) of the scenario cannot be trained or evaluated: {'; '.join(problems[:5])}"
            f"{more}. Every class needs training and test images; `sdlora check-data CONFIG` lists every problem",
            "data",
        )
    method = create_method(cfg.method, backbone).to(device)
    return backbone, data, scenario, method


def run_experiment(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventHandler | None = None,
) -> dict[str, Any]:
    """Run (or resume) a class-incremental experiment and write its run directory.

    The config saved as ``config.yaml`` is derived here: ``cfg`` with its method options checked and their
    defaults filled in (``methods.resolve_method_config``, applied to ``cfg`` in place).

    Args:
        cfg: the typed config.
        out_dir: run directory.
        resume: continue after the last completed task (same config required).
        overwrite: replace an earlier run in ``out_dir``.
        on_event: called with a :class:`~sdlora.results.RunEvent` after each task and at the end, on the main
            process, after the default listener :func:`sdlora.report.on_run_event` (which writes the run's CSV
            tables after each task and its plots at the end).

    Returns:
        The results dict (also in ``results.json``; :class:`~sdlora.results.RunResults` defines it).

    Raises:
        RunError: the run directory refuses the run (see ``rundir.prepare_run_dir``), a checkpoint is damaged,
            or training diverged.
        ConfigError: unknown method or bad method options.
    """
    t_start = time.time()
    resolve_method_config(cfg)
    cfg_dict = to_dict(cfg)
    info = init_distributed(cfg.train.device)
    out = Path(out_dir)
    # One writer per run directory, for the whole run (under torchrun: rank 0 holds it for every process).
    with contextlib.ExitStack() as lock:
        if not info.enabled:
            lock.enter_context(run_dir_lock(out))
            prepare_run_dir(out, cfg_dict, resume, overwrite)
        else:
            _prepare_run_dir_distributed(out, cfg_dict, resume, overwrite, info, lock)
        results = _logged_run(cfg, cfg_dict, out, resume, info, t_start, on_event)
    if info.owns_group:
        # Every process got here through the same collectives, so none has a pending operation. (On an
        # error the process exits without this; torchrun then stops the others.)
        dist.destroy_process_group()
    return results


def _logged_run(
    cfg: RunConfig,
    cfg_dict: dict[str, Any],
    out: Path,
    resume: bool,
    info: DistInfo,
    t_start: float,
    on_event: EventHandler | None,
) -> dict[str, Any]:
    """:func:`_run` with the run's ``log.txt`` attached to the package logger (rank 0)."""
    file_handler = None
    if info.main:
        file_handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        _pkg_log.addHandler(file_handler)
    level = _pkg_log.level
    if not info.main:  # progress lines come from rank 0 only; other processes still report warnings
        _pkg_log.setLevel(max(logging.WARNING, _pkg_log.getEffectiveLevel()))
    listeners: list[EventHandler] = [on_run_event] + ([on_event] if on_event is not None else [])
    tracking = None
    if info.main and cfg.train.log_to:  # after the directory is prepared: a refused run starts no tracked run
        tracking = RunTracking(cfg.train.log_to, out, cfg_dict, resume=resume)
        listeners.insert(1, tracking)  # after the tables and plots are written (it logs the plots)
    failed = True
    try:
        results = _run(cfg, cfg_dict, out, resume, info, t_start, listeners)
        failed = False
        return results
    finally:
        if tracking is not None:
            tracking.close(failed=failed)
        _pkg_log.setLevel(level)
        if file_handler is not None:
            _pkg_log.removeHandler(file_handler)
            file_handler.close()


def _prepare_run_dir_distributed(
    out: Path, cfg_dict: dict[str, Any], resume: bool, overwrite: bool, info: DistInfo, lock: contextlib.ExitStack
) -> None:
    """Rank 0 takes the run directory's lock (into ``lock``, held until the run ends), checks and prepares the
    directory; every process learns the outcome, so a refused run (another writer, existing results, changed
    config on resume) stops all of them with the same message instead of leaving the others waiting in a
    collective."""
    error: BaseException | None = None
    if info.main:
        try:
            lock.enter_context(run_dir_lock(out))
            prepare_run_dir(out, cfg_dict, resume, overwrite)
        except Exception as e:
            error = e
    box: list[Any] = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=0)  # also the barrier: nobody reads the directory before it is ready
    if box[0] is not None:
        if info.owns_group:
            dist.destroy_process_group()
        if error is not None:
            raise error
        raise RunError(box[0])


def _run(
    cfg: RunConfig,
    cfg_dict: dict[str, Any],
    out: Path,
    resume: bool,
    info: DistInfo,
    t_start: float,
    listeners: Sequence[EventHandler],
) -> dict[str, Any]:
    tcfg = cfg.train
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = select_device(tcfg.device, info)
    if tcfg.amp and device.type != "cuda":
        log.warning("train.amp is set but the device is %s: training in float32 (autocast is CUDA-only here)", device)
    if info.enabled and not info.main:
        dist.barrier()  # rank 0 builds first: a dataset download or weight cache is written by one process
    backbone, data, scenario, method = build_run(cfg, device)
    if info.enabled and info.main:
        dist.barrier()
    if info.main:
        atomic_write_text(out / "config.yaml", CONFIG_HEADER + dump_yaml(cfg_dict))
        if data.split_record is not None:
            atomic_write_json(out / "split.json", data.split_record)
    n_tasks = scenario.num_tasks
    environment = capture_environment(device)
    state = RunState(session_start=t_start)
    state.continue_in(environment)
    results: dict[str, Any] | None = None
    if resume:
        # The checkpoint results.json commits to (the one every reader of the run uses): a checkpoint written by a
        # process killed before its results.json is ignored, and its task runs again.
        ck = committed_checkpoint(out)
        if ck is not None:
            state = _restore(ck, out, method, data, device, t_start)
            if state.next_task > n_tasks:
                raise RunError(
                    f"cannot resume {out}: its checkpoint {ck.name} is after task {state.next_task}, but the "
                    f"config's scenario has {n_tasks}: tasks were added by sdlora learn (or another scenario made "
                    "it), and rebuilding the run from this config would drop them. Use sdlora report to rewrite "
                    "its tables and plots, sdlora learn to add classes, or --overwrite / another --out to start over"
                )
            log.info("resuming after task %d of %d from %s", state.next_task, n_tasks, ck)
            changes = state.continue_in(environment)
            if changes and info.main:
                log.warning(
                    "resuming in another environment than the run's earlier tasks (%s): results may differ from an "
                    "uninterrupted run; results.json keeps the earlier one in earlier_environments",
                    "; ".join(changes),
                )
            # The record, tables and plots are rewritten from the checkpoint: a run killed while writing them (or
            # one whose results.json was lost) gets them back, even when no task remains.
            results = build_results(cfg, method, backbone, data, scenario, state).to_dict()
            if info.main:
                atomic_write_json(out / RESULTS_FILE, results)
                _emit(listeners, RunEvent("resumed", out, state.next_task - 1, results))
        else:
            log.info("nothing to resume in %s: starting from the first task", out)
    if info.main:
        log.info(
            "sdlora %s | method %s | backbone %s (%s) | dataset %s: %d train / %d test samples, %d classes | "
            "%d tasks | device %s%s",
            __version__,
            cfg.method.name,
            backbone.name,
            backbone.tag or "random init",
            cfg.data.name,
            len(data.train_targets),
            len(data.test_targets),
            data.num_classes,
            n_tasks,
            device,
            f" x{info.world} processes" if info.enabled else "",
        )

    def progress(kind: Literal["step", "epoch_end"], task: int, step: int, scalars: dict[str, float]) -> None:
        _emit(listeners, RunEvent(kind, out, task, {}, scalars=scalars, step=step))

    rt = Runtime(train=tcfg, seed=cfg.seed, device=device, info=info, workers=cfg.data.num_workers, progress=progress)
    for t in range(state.next_task, n_tasks):
        run_task(method, state, task_data(scenario, data, t), rt, num_tasks=n_tasks)
        results = build_results(cfg, method, backbone, data, scenario, state).to_dict()
        if info.main:
            # Commit order (as in sdlora learn): the checkpoint, then results.json, which commits it. A kill in
            # between leaves a record of the previous task and its checkpoint, never a record without its model.
            if tcfg.checkpoint:
                save_checkpoint(out, t, method, state.to_checkpoint(), data_identity=data.identity)
            atomic_write_json(out / RESULTS_FILE, results)
            prune_checkpoints(out, tcfg.keep_checkpoints)
            _emit(listeners, RunEvent("task_end", out, t, results))
        if info.enabled:
            dist.barrier()
    if results is None:  # unreachable: a scenario has at least one task, or the state came from a checkpoint
        raise RunError(f"{out}: no task ran and no checkpoint was restored")
    if info.main:
        _emit(listeners, RunEvent("run_end", out, n_tasks - 1, results))
    return results


def _restore(
    ck: Path, out: Path, method: Method, data: DatasetBundle, device: torch.device, t_start: float
) -> RunState:
    """Load checkpoint ``ck`` into ``method`` and the global RNG after checking that the data is the run's data;
    returns the run state it holds.

    Raises:
        RunError: the checkpoint is damaged or does not fit (with the advice to delete it), or the dataset differs
            from the one the run started with (the message says what changed).
    """
    tensors, record = load_checkpoint(ck)
    recorded = record.get("data_identity")
    if not recorded and (out / RESULTS_FILE).is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = read_json(out / RESULTS_FILE).get("data_identity")
    if recorded:
        changes = identity_changes(recorded, data.identity)
        if changes:
            raise RunError(
                f"cannot resume {out}: the data is not the data this run started with:\n  "
                + "\n  ".join(changes)
                + "\nrestore that data, or start a new run (--overwrite, or another --out)"
            )
    else:
        log.warning("%s records no data identity (an older sdlora wrote it): the data cannot be checked", out)
    try:
        method.load_state(tensors, record["method"])
        method.to(device)
        state = RunState.from_checkpoint(record, session_start=t_start)
        restore_rng_state(tensors, record["rng"])
    except RunError as e:
        raise RunError(
            f"checkpoint {ck} does not fit this run ({e}); delete it to resume from the previous task"
        ) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise RunError(
            f"checkpoint {ck} does not fit this run ({type(e).__name__}: {e}); delete it (and its .safetensors) to "
            "resume from the previous task"
        ) from None
    return state


def _emit(listeners: Sequence[EventHandler], event: RunEvent) -> None:
    for listener in listeners:
        listener(event)


def build_results(
    cfg: RunConfig,
    method: Method,
    backbone: Backbone,
    data: DatasetBundle,
    scenario: Scenario,
    state: RunState,
) -> RunResults:
    """The run record after ``state.next_task`` tasks (``finished`` once every task of the scenario ran)."""
    metrics = state.metrics()
    counts = method.parameter_counts()
    order = scenario.to_dict()
    return RunResults(
        status="finished" if state.next_task == scenario.num_tasks else "running",
        name=cfg.name,
        method=cfg.method.name,
        protocol=method.protocol,
        backbone=backbone.info(),
        dataset=data.info,
        seed=cfg.seed,
        class_order=order["class_order"],
        class_names=[data.class_names[c] for c in scenario.class_order],
        tasks=order["tasks"],
        num_tasks=scenario.num_tasks,
        completed_tasks=len(metrics["acc_after_task"]),
        **metrics,
        trainable_params_per_task=list(state.trainable_per_task),
        stored_params_total=int(counts["stored"]),
        task_log=list(state.task_log),
        wall_time_s=round(state.wall_time_s, 3),
        reference=dict(cfg.reference),
        sdlora_version=__version__,
        data_identity=data.identity,
        inference_passes=method.passes_per_prediction(),
        environment=dict(state.environment),
        earlier_environments=list(state.earlier_environments),
    )
