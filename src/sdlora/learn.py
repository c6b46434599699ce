"""Teach a finished run new classes: ``sdlora learn RUN_DIR --data NEW_ROOT [--name LABEL]``.

The run's model learns one more task made of the classes found in ``NEW_ROOT``, with the run's method and
training settings and none of the earlier training data (rehearsal-free: only what the method itself keeps).
It is the engine's next task (:func:`sdlora.engine.run_task`) on a finished run: the model, the run state and the
global RNG come from the run's last checkpoint, so learning a folder of classes gives what the engine would have
given had those classes been the scenario's next task.

Data. ``NEW_ROOT`` belongs to the run's dataset family: for image runs an image folder, either pre-split
(``NEW_ROOT/train/<class>/...`` and ``NEW_ROOT/test/<class>/...``) or one tree ``NEW_ROOT/<class>/...`` split per
class with the run's ``data.test_fraction`` and seed. Every image is used (the run's ``train_per_class`` and
``test_per_class`` caps are not applied), with the run's image size, augmentation and normalisation. For text runs
(a Hugging Face text backbone) a ``text_csv`` / ``text_jsonl`` source with the run's ``data.text_column`` and
``data.label_column``: one ``.csv`` / ``.tsv`` / ``.jsonl`` file split per class with the run's
``data.test_fraction`` and seed, or a directory holding ``train.<ext>`` and ``test.<ext>``; tokenised with the
run's tokenizer and ``data.max_length``. Image and text runs alike take a Hugging Face dataset
(``hf:ROOT``, or without the prefix a ``save_to_disk`` directory or a ``.parquet`` / ``.arrow`` file; see
:mod:`sdlora.data.hf`) read with the run's ``data.image_column`` / ``text_column`` / ``label_column``: its
``train`` and ``test`` splits, or its one split split per class. A class name the run already knows (compared
case-insensitively, in Unicode NFC) is refused: this is class-incremental learning, not fine-tuning.

Evaluation. The new row of the accuracy matrix covers the new task and every earlier one: the run's own test
split (rebuilt from its config and checked against the ``data_identity`` digest the run recorded) and the test
split of each earlier learned folder (recorded in ``results.json`` under ``learned_tasks`` with its path and
digest). A test set that is missing or has changed is reported and skipped (``None`` in the matrix, left out of
the pooled metrics), never fatal.

Commit. Training and evaluation happen in memory. Then the new checkpoint is written (atomically), then
``results.json`` (atomically: the commit point), then the tables and plots. A learn that fails or is killed
before the commit leaves ``results.json`` as it was; a checkpoint it may have written is newer than the
run's record, is ignored by everything that loads the run (:func:`sdlora.rundir.committed_checkpoint`) and is
replaced when ``learn`` is run again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from . import __version__
from .backbones import create_backbone
from .backbones.hf import load_tokenizer
from .config import RunConfig
from .data import DataConfig, DatasetBundle, build_dataset
from .data.hf import HF_PREFIX, hf_source_format
from .distributed import DistInfo, select_device
from .engine import TaskData, run_task
from .environment import capture_environment
from .fileio import atomic_write_json
from .methods import Method, create_method, load_run_config
from .predict import check_device, run_class_names
from .report import on_run_event
from .results import RESULTS_FILE, RunEvent, load_results, parse_results
from .rundir import (
    RunError,
    committed_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    run_dir_lock,
    save_checkpoint,
    seed_everything,
)
from .runstate import RunState
from .tracking import RunTracking
from .training import Runtime

__all__ = ["LearnError", "LearnReport", "learn", "load_test_sources", "task_test_sources"]

log = logging.getLogger(__name__)
_pkg_log = logging.getLogger("sdlora")


class LearnError(ValueError):
    """The run cannot learn these classes (unfinished run, known class names, unusable data folder)."""


@dataclass
class LearnReport:
    """What :func:`learn` did: the new task (0-based), its label and classes, the skipped earlier test sets
    (``(task, reason)``) and the run's new record."""

    task: int
    name: str
    class_names: list[str]
    skipped: list[tuple[int, str]]
    results: dict[str, Any]


class _Positions(Dataset):
    """``(x, position)`` samples: a dataset's labels mapped to class positions through ``mapping``."""

    def __init__(self, dataset: Dataset, labels: np.ndarray, mapping: dict[int, int]) -> None:
        self.dataset = dataset
        self.indices = np.flatnonzero(np.isin(labels, list(mapping)))
        self.mapping = mapping

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[int(self.indices[i])]
        return x, self.mapping[int(y)]


def _with_eval_transform(data: DatasetBundle) -> Dataset:
    import copy

    train_eval = copy.copy(data.train)
    if hasattr(train_eval, "transform") and hasattr(data.test, "transform"):
        train_eval.transform = data.test.transform  # statistics use evaluation transforms
    return train_eval


#: Text datasets learned classes can come from, by file suffix.
_TEXT_SOURCES = {".jsonl": "text_jsonl", ".csv": "text_csv", ".tsv": "text_csv"}


def _text_dataset_name(root: Path) -> str | None:
    """``text_jsonl`` / ``text_csv`` for a data file or a directory holding ``train.<ext>`` (None: neither)."""
    if root.is_file():
        return _TEXT_SOURCES.get(root.suffix.lower())
    return next((name for ext, name in _TEXT_SOURCES.items() if (root / f"train{ext}").is_file()), None)


#: Data files read as Hugging Face datasets by ``learn --data`` without the ``hf:`` prefix.
_HF_FILES = (".parquet", ".arrow")


def _hf_root(spec: str) -> str | None:
    """The dataset root when ``--data`` names a Hugging Face dataset: ``hf:ROOT``, a ``save_to_disk`` directory or
    a parquet / arrow file (local roots resolved); None otherwise."""
    if spec.startswith(HF_PREFIX) and not os.path.exists(spec):
        rest = spec[len(HF_PREFIX) :]
        local = Path(rest).expanduser()
        return str(local.resolve()) if local.exists() else rest
    p = Path(spec).expanduser()
    if (p.is_dir() and hf_source_format(str(p)) == "disk") or (p.is_file() and p.suffix.lower() in _HF_FILES):
        return str(p.resolve())
    return None


def _source_config(
    cfg: RunConfig, root: Path, fmt: str | None = None, text: bool = False, dataset: str | None = None
) -> DataConfig:
    """The data config of learned classes at ``root``: an image folder with the run's image settings, or (``text``)
    a text file / directory with the run's columns and ``max_length``, or (``dataset`` ``hf``) a Hugging Face
    dataset read with the run's columns and settings (default splits); no per-class caps."""
    if dataset == "hf":
        return DataConfig(
            name="hf",
            root=str(root),
            format=fmt,
            image_size=cfg.data.image_size,
            max_length=cfg.data.max_length,
            test_fraction=cfg.data.test_fraction,
            augment=cfg.data.augment,
            text_column=cfg.data.text_column,
            label_column=cfg.data.label_column,
            image_column=cfg.data.image_column,
            download=False,
            num_workers=cfg.data.num_workers,
        )
    if not text:
        return DataConfig(
            name="imagefolder",
            root=str(root),
            format=fmt,
            image_size=cfg.data.image_size,
            test_fraction=cfg.data.test_fraction,
            augment=cfg.data.augment,
            download=False,
            num_workers=cfg.data.num_workers,
        )
    return DataConfig(
        name=dataset or _text_dataset_name(root) or "text_jsonl",
        root=str(root),
        format=fmt,
        max_length=cfg.data.max_length,
        test_fraction=cfg.data.test_fraction,
        text_column=cfg.data.text_column,
        label_column=cfg.data.label_column,
        download=False,
        num_workers=cfg.data.num_workers,
    )


def _load_new_data(
    cfg: RunConfig, root: Path, shown: str, mean: Any, std: Any, tokenizer: Any = None, dataset: str | None = None
) -> DatasetBundle:
    text = tokenizer is not None
    # (a Hugging Face dataset is not checked here: its reader names a missing path, split or column itself)
    if dataset != "hf" and text and _text_dataset_name(root) is None:
        raise LearnError(
            f"--data {shown}: this is a text run; give a .jsonl, .csv or .tsv file (one text per row, columns "
            f"{cfg.data.text_column!r} and {cfg.data.label_column!r}; split here with test_fraction="
            f"{cfg.data.test_fraction}) or a directory holding train.jsonl and test.jsonl (or train.csv / test.csv)"
        )
    if dataset != "hf" and not text and not root.is_dir():
        raise LearnError(
            f"--data {shown}: not a folder (expected {shown}/<class>/<images>, or train/ and test/ inside it)"
        )
    try:
        data = build_dataset(
            _source_config(cfg, root, text=text, dataset=dataset),
            mean=mean,
            std=std,
            seed=cfg.seed,
            tokenizer=tokenizer,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise LearnError(f"--data {shown}: {e}") from None
    counts_train = np.bincount(data.train_targets, minlength=data.num_classes)
    counts_test = np.bincount(data.test_targets, minlength=data.num_classes)
    empty = [data.class_names[c] for c in range(data.num_classes) if counts_test[c] == 0 or counts_train[c] == 0]
    if empty:
        raise LearnError(
            f"--data {shown}: classes {empty} need at least one training and one test "
            f"{'text' if text else 'image'} (a single {'file' if text else 'tree'} is split with test_fraction="
            f"{cfg.data.test_fraction}; a class needs two {'texts' if text else 'images'} there)"
        )
    return data


def _name_key(name: str) -> str:
    """How class names are compared: Unicode NFC (macOS may spell a folder name decomposed, NFD), no surrounding
    spaces, case-insensitive."""
    import unicodedata

    return unicodedata.normalize("NFC", name).strip().casefold()


def _check_new_names(known: list[str], new: list[str], root: str, text: bool = False) -> None:
    seen = {_name_key(n): n for n in known}
    clash = [
        repr(n) if seen[_name_key(n)] == n else f"{n!r} (known as {seen[_name_key(n)]!r})"
        for n in new
        if _name_key(n) in seen
    ]
    if clash:
        raise LearnError(
            f"--data {root}: the run already knows the class(es) {', '.join(clash)}; sdlora learn adds new classes "
            "(class-incremental), it does not fine-tune known ones. "
            + ("Remove those rows or rename their labels." if text else "Remove or rename those folders.")
        )


def _check_one_class(method: Method, name: str, shown: str) -> None:
    """Refuse a task of one class where the method would learn nothing from it; warn where only the head learns.

    After the first task the default loss is cross-entropy over the current task's logits (``loss_scope:
    current``); over one logit it is 0 for every sample, so neither the adapter nor the head gets a gradient and
    the class would be "learned" with an untrained head row.
    """
    if not type(method).trains or not type(method).uses_head or method.cfg.loss_scope == "all":
        return  # prototypes, a ridge head or a loss over every seen class: one class is learned like any other
    if method.align_config.enabled:
        log.warning(
            "--data %s holds one class (%r): the task's loss is over its one logit (loss_scope: current), so the "
            "backbone learns nothing from it; only classifier alignment fits its head row",
            shown,
            name,
        )
        return
    raise LearnError(
        f"--data {shown} holds one class ({name!r}): this run's method ({method.cfg.name}) trains with "
        "the current task's logits only (method.loss_scope: current), and cross-entropy over one logit is 0, so "
        "nothing would be learned. Add at least one more class folder, or learn it into a run whose method learns "
        "one class: method.loss_scope: all, classifier alignment (sdlora_ca, method.align.enabled: true) or a "
        "prototype head (simplecil, ranpac)"
    )


@dataclass
class _Source:
    """Where the test data of some earlier tasks comes from: the run's own dataset or one learned folder."""

    what: str  # for messages
    data: DataConfig
    identity: dict[str, Any]
    tasks: list[int]
    positions: dict[int, int]  # label in that dataset -> class position in the run


def _run_data_config(cfg: RunConfig, results: dict[str, Any]) -> DataConfig:
    """The run's data config with ``data.root`` as the run resolved it (``results.json`` ``dataset.resolved_root``):
    a relative root is not read against the caller's working directory."""
    root = cfg.data.root
    if root is None or Path(root).expanduser().is_absolute():
        return cfg.data
    recorded = (results.get("dataset") or {}).get("resolved_root")
    if recorded:
        return dataclasses.replace(cfg.data, root=str(recorded))
    log.warning(
        "the run's data.root %r is relative and the run does not record where it pointed (an older sdlora wrote "
        "it): it is read from the working directory %s",
        root,
        os.getcwd(),
    )
    return cfg.data


def task_test_sources(cfg: RunConfig, results: dict[str, Any], text: bool = False) -> list[_Source]:
    """Where the test data of each task in ``results["tasks"]`` comes from, with the class positions of its labels:
    the run's own dataset for the scenario's tasks, the folder recorded in ``learned_tasks`` for learned ones."""
    learned = {int(r["task"]): r for r in results.get("learned_tasks") or []}
    base = _Source(
        f"the run's {cfg.data.name} test split",
        _run_data_config(cfg, results),
        results.get("data_identity") or {},
        [],
        {},
    )
    folders: list[_Source] = []
    pos = 0
    for t, ids in enumerate(results["tasks"]):
        rec = learned.get(t)
        if rec is None:
            src, labels = base, [int(c) for c in ids]
        else:
            root = Path(rec["root"])
            src = _Source(
                f"the test split of learned task {t + 1} ({root})",
                _source_config(cfg, root, rec.get("format"), text, rec.get("dataset")),
                rec.get("identity") or {},
                [],
                {},
            )
            folders.append(src)
            labels = list(range(len(ids)))  # a learned folder labels its classes 0.. in name order
        src.tasks.append(t)
        for label in labels:
            src.positions[label] = pos
            pos += 1
    return ([base] if base.tasks else []) + folders


def load_test_sources(
    cfg: RunConfig, sources: list[_Source], mean: Any, std: Any, tokenizer: Any = None
) -> tuple[list[Dataset], list[tuple[int, str]]]:
    """Rebuild each source's test split and check it against the digest the run recorded.

    Returns:
        ``(datasets, skipped)``: ``(x, position)`` test datasets, and ``(task, reason)`` for every earlier task
        whose test data is missing, unreadable or changed (reported and left out, never fatal).
    """
    datasets: list[Dataset] = []
    skipped: list[tuple[int, str]] = []
    for src in sources:
        try:
            data = build_dataset(src.data, mean=mean, std=std, seed=cfg.seed, tokenizer=tokenizer)
        except Exception as e:  # missing or unreadable data: reported, not fatal
            skipped.extend((t, f"{src.what} is not available ({e})") for t in src.tasks)
            continue
        want = src.identity.get("test_sha256")
        if want and data.identity.get("test_sha256") != want:
            reason = f"{src.what} has changed since the run recorded it (its file list sha256 differs)"
            skipped.extend((t, reason) for t in src.tasks)
            continue
        datasets.append(_Positions(data.test, data.test_targets, src.positions))
    return datasets, skipped


def _log_start(label: str, new: DatasetBundle, shown: str, task: int, out: Path, dev: torch.device) -> None:
    log.info(
        "learn %r: %d new classes (%s) from %s, %d train / %d test %s, as task %d of run %s on %s",
        label,
        new.num_classes,
        ", ".join(new.class_names),
        shown,
        len(new.train_targets),
        len(new.test_targets),
        "texts" if new.info.get("modality") == "text" else "images",
        task + 1,
        out,
        dev,
    )


def _committed_state(out: Path, completed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and record of the checkpoint ``results.json`` commits to (after task ``completed``)."""
    ck = committed_checkpoint(out)
    if ck is None:
        raise RunError(f"{out} has no checkpoint (train.checkpoint was off?): nothing to continue from")
    tensors, record = load_checkpoint(ck)
    if int(record["task"]) + 1 != completed:
        raise RunError(
            f"{out}: the newest checkpoint is after task {int(record['task']) + 1} but results.json records "
            f"{completed} tasks; the run directory is inconsistent"
        )
    return tensors, record


def _task_data(task: int, tasks: list[list[int]], new: DatasetBundle, earlier: list[Dataset]) -> TaskData:
    """The learned task for :func:`sdlora.engine.run_task`: the new classes at the positions after the ``tasks``
    seen so far, tested with every earlier task's test data (``earlier``) and the new test split."""
    start = sum(len(ids) for ids in tasks)
    mapping = {c: start + c for c in range(new.num_classes)}
    return TaskData(
        task=task,
        class_start=start,
        class_end=start + new.num_classes,
        train=_Positions(new.train, new.train_targets, mapping),
        statistics=_Positions(_with_eval_transform(new), new.train_targets, mapping),
        test=ConcatDataset([*earlier, _Positions(new.test, new.test_targets, mapping)]),
        task_of_position=[t for t, ids in enumerate(tasks) for _ in ids] + [task] * new.num_classes,
    )


def _learned_entry(task: int, label: str, root: Path, new: DatasetBundle, new_ids: list[int]) -> dict[str, Any]:
    """The ``learned_tasks`` entry of a learned task: where its data is, its classes and the data's identity."""
    return {
        "task": task,
        "name": label,
        "root": str(root),
        "dataset": new.info.get("name"),
        "format": new.info.get("format"),
        "class_names": list(new.class_names),
        "class_ids": new_ids,
        "train_count": len(new.train_targets),
        "test_count": len(new.test_targets),
        "identity": new.identity,
        "learned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sdlora_version": __version__,
    }


def _extended_results(
    results: dict[str, Any],
    out: Path,
    state: RunState,
    method: Method,
    known: list[str],
    new: DatasetBundle,
    new_ids: list[int],
    entry: dict[str, Any],
) -> dict[str, Any]:
    """The run's record with the learned task appended (what the learn commits)."""
    old = parse_results(results, str(out / RESULTS_FILE))
    seen = len(known)
    # Positions after the seen ones belonged to dataset classes the run never learned (a scenario cut short with
    # num_tasks); the run now continues with the learned classes there instead.
    updated = dataclasses.replace(
        old,
        status="finished",
        class_order=[*old.class_order[:seen], *new_ids],
        class_names=[*known, *new.class_names],
        tasks=[*old.tasks, new_ids],
        num_tasks=entry["task"] + 1,
        completed_tasks=entry["task"] + 1,
        **state.metrics(),
        trainable_params_per_task=list(state.trainable_per_task),
        stored_params_total=int(method.parameter_counts()["stored"]),
        task_log=list(state.task_log),
        wall_time_s=round(state.wall_time_s, 3),
        learned_tasks=[*old.learned_tasks, entry],
        environment=dict(state.environment),
        earlier_environments=list(state.earlier_environments),
    )
    return updated.to_dict()


def learn(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    name: str | None = None,
    device: str | None = None,
) -> LearnReport:
    """Teach the run in ``run_dir`` the classes found in ``data_root`` as one more task (module docstring).

    Args:
        run_dir: a finished run directory.
        data_root: the new classes (an image folder for image runs; a text CSV / JSONL file or a directory of
            ``train.<ext>`` and ``test.<ext>`` for text runs; for both a Hugging Face dataset, ``hf:ROOT``).
        name: a label for the new task (default: the folder's name).
        device: where to train (default: the run's ``train.device``).

    Returns:
        The :class:`LearnReport`.

    Raises:
        LearnError: the run is not finished, a class name is already known, or the folder is unusable.
        RunError: not a run directory, no or a damaged checkpoint, or training diverged.
    """
    t_start = time.time()
    if device is not None:
        check_device(device)
    out = Path(run_dir)
    hf_root = _hf_root(os.fspath(data_root))
    root = Path(data_root).expanduser().resolve() if hf_root is None else Path(hf_root)
    if not (out / "config.yaml").exists():
        raise RunError(f"{out} is not a run directory (no config.yaml)")
    # One writer per run directory: a learn never runs while a run, resume, overwrite or another learn writes it.
    with run_dir_lock(out):
        dataset = None if hf_root is None else "hf"
        return _learn_locked(out, root, data_root, name=name, device=device, t_start=t_start, dataset=dataset)


def _restored_method(
    cfg: RunConfig,
    tensors: dict[str, Any],
    record: dict[str, Any],
    dev: torch.device,
    new: DatasetBundle,
    data_root: str,
) -> Method:
    """The run's method as after its last task, and the global RNG as the engine would continue with it (a single
    new class is checked against the method first)."""
    seed_everything(cfg.seed)
    method: Method = create_method(cfg.method, create_backbone(cfg.backbone, cfg.data.image_size)).to(dev)
    method.load_state(tensors, record["method"])
    method.to(dev)
    if new.num_classes == 1:
        _check_one_class(method, new.class_names[0], data_root)
    restore_rng_state(tensors, record["rng"])
    return method


def _learn_locked(
    out: Path,
    root: Path,
    data_root: str | os.PathLike,
    *,
    name: str | None,
    device: str | None,
    t_start: float,
    dataset: str | None = None,
) -> LearnReport:
    """The body of :func:`learn`, run while holding the run directory's lock (``data_root`` as the user gave it,
    for messages; ``root`` resolved; ``dataset`` ``hf`` for a Hugging Face dataset)."""
    results = load_results(out)
    if results.get("status") != "finished":
        raise LearnError(
            f"{out} holds an unfinished run ({results['completed_tasks']} of {results['num_tasks']} tasks); finish it "
            "first (sdlora run CONFIG --out RUN_DIR --resume), then learn new classes"
        )
    cfg, cfg_dict = load_run_config(str(out / "config.yaml"), saved_run=True)
    tensors, record = _committed_state(out, int(results["completed_tasks"]))
    task = int(record["task"]) + 1
    mean, std = results["backbone"]["mean"], results["backbone"]["std"]
    text = results["backbone"].get("modality") == "text"
    tokenizer = load_tokenizer(cfg.backbone) if text else None  # what the run's data pipeline tokenised with
    new = _load_new_data(cfg, root, str(data_root), mean, std, tokenizer, dataset)
    seen = sum(len(t) for t in results["tasks"])
    known = run_class_names(out, cfg, seen)
    _check_new_names(known, new.class_names, str(data_root), text)
    label = name or (root.stem if root.is_file() else root.name)

    file_handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    _pkg_log.addHandler(file_handler)
    # train.log_to: the learned task goes to the run's tracked runs (tracking.json), as a resumed run's would
    tracking = RunTracking(cfg.train.log_to, out, cfg_dict, resume=True) if cfg.train.log_to else None
    failed = True
    try:
        tcfg = cfg.train
        if tcfg.threads is not None:
            torch.set_num_threads(tcfg.threads)
        dev = select_device(device or tcfg.device, DistInfo())
        _log_start(label, new, str(data_root), task, out, dev)
        method = _restored_method(cfg, tensors, record, dev, new, str(data_root))
        state = RunState.from_checkpoint(record, session_start=t_start)
        for change in state.continue_in(capture_environment(dev)):
            log.warning("learning in another environment than the run's earlier tasks: %s", change)

        # Class ids: learned classes continue the run's id space, after every id used so far (the run's dataset
        # ids 0..K-1 and earlier learned ones), so an id never names two classes.
        next_id = max(int(c) for c in results["class_order"]) + 1
        new_ids = list(range(next_id, next_id + new.num_classes))
        earlier, skipped_at = load_test_sources(cfg, task_test_sources(cfg, results, text), mean, std, tokenizer)
        for t, reason in skipped_at:
            log.warning("task %d is not evaluated in the new row: %s", t + 1, reason)
        end = seen + new.num_classes
        data = _task_data(task, results["tasks"], new, earlier)
        rt = Runtime(train=tcfg, seed=cfg.seed, device=dev, workers=cfg.data.num_workers)
        if tracking is not None:
            rt.progress = lambda kind, t, step, scalars: tracking(RunEvent(kind, out, t, {}, scalars, step))
        skipped = sorted({t for t, _ in skipped_at})
        entry = run_task(method, state, data, rt, num_tasks=task + 1, not_evaluated=skipped)
        entry["learned"] = {"name": label, "root": str(root), "classes": list(new.class_names)}
        if skipped:
            entry["not_evaluated"] = {str(t): r for t, r in skipped_at}

        record_new = _learned_entry(task, label, root, new, new_ids)
        new_results = _extended_results(results, out, state, method, known, new, new_ids, record_new)
        # Commit: checkpoint first (ignored until results.json names its task), then results.json.
        save_checkpoint(
            out,
            task,
            method,
            state.to_checkpoint(),
            data_identity=results.get("data_identity"),
            learned=record_new,
        )
        atomic_write_json(out / RESULTS_FILE, new_results)
        prune_checkpoints(out, tcfg.keep_checkpoints)
        for event in (RunEvent("task_end", out, task, new_results), RunEvent("run_end", out, task, new_results)):
            on_run_event(event)
            if tracking is not None:
                tracking(event)
        failed = False
        log.info(
            "learned %r as task %d: acc on %d seen classes %.2f%%, on the new classes %.2f%%",
            label,
            task + 1,
            end,
            new_results["acc_after_task"][-1],
            new_results["accuracy_matrix"][-1][task],
        )
    finally:
        if tracking is not None:
            tracking.close(failed=failed)
        _pkg_log.removeHandler(file_handler)
        file_handler.close()
    return LearnReport(task, label, list(new.class_names), skipped_at, new_results)
