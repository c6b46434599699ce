"""The run record (``results.json``): one typed definition, built by the engine, read by everything else.

:class:`RunResults` is the only place that says which keys a ``results.json`` has, in which order, and which of
them a reader may rely on (:data:`REQUIRED_KEYS`: the fields without a default, so a record written before a
field was added still loads). ``engine`` builds it after every task; ``report``, ``compare``, ``cli`` read it
through :func:`load_results`. :class:`RunEvent` is what the engine tells its listeners while a run progresses.

Task indices in the record are 0-based lists; reports print them 1-based.

Only the standard library, :mod:`sdlora.configtools` and :mod:`sdlora.fileio` are imported.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .configtools import ConfigError, from_dict
from .fileio import read_json

__all__ = ["REQUIRED_KEYS", "RESULTS_FILE", "RunEvent", "RunResults", "load_results", "parse_results"]

RESULTS_FILE = "results.json"


@dataclass(kw_only=True)
class RunResults:
    """One run's record, as written to ``results.json`` (the field order is the file's key order).

    Attributes:
        status: ``running`` while tasks remain, ``finished`` after the last one (None: not recorded).
        name: the config's ``name``.
        method: registered method name; protocol: its adapter protocol label (``n/a`` without one).
        backbone: ``Backbone.info()`` (name, weights tag and sha256, sizes).
        dataset: ``DatasetBundle.info`` (name, root, format, counts, transforms).
        seed: the run's seed.
        class_order: original class ids in position order.
        class_names: the dataset's class names in position order (``class_names[argmax of the logits]`` names
            a prediction); empty in records written before it existed.
        tasks: original class ids of every task, in order.
        num_tasks: tasks planned; completed_tasks: tasks finished so far.
        accuracy_matrix ... test_samples_per_task: :func:`sdlora.metrics.compute_metrics` of the counts so far.
        trainable_params_per_task: scalars that learned in each task; stored_params_total: scalars kept now.
        task_log: one entry per finished task (times, steps, loss, the method's ``end_task`` report).
        wall_time_s: wall time of the run so far, over all sessions (resumes add up).
        reference: the config's reference numbers (not used in training).
        sdlora_version: the version that wrote the record.
        data_identity: :func:`sdlora.data.identity.data_identity` of the data in use (counts, digests); empty
            in records written before it existed.
        inference_passes: backbone forward passes the method needs per prediction (``Method.inference_passes``:
            1, or 2 for the prompt methods' query and prompted passes); 1 in records written before it existed.
        learned_tasks: one entry per task added by ``sdlora learn`` (``task``, ``name``, ``root``, ``dataset``
            (``imagefolder``, ``text_csv``, ``text_jsonl``; missing before text learns existed: ``imagefolder``),
            ``format``, ``class_names``, ``class_ids``, train/test counts, the data's ``identity``): where its data
            is and how to recognise it, so later learns can evaluate on its test split. Learned classes take ids
            after every id used before (``class_order``), and a learn drops unseen dataset classes from
            ``class_order`` and ``class_names``.
        environment: :func:`sdlora.environment.capture_environment` of the session that wrote the record (Python,
            torch/timm/transformers/peft/numpy versions, device, sdlora version and git commit); empty in records
            written before it existed.
        earlier_environments: the environments of earlier sessions of this run that differ from ``environment``
            (a run resumed or extended by ``learn`` under other versions), oldest first, each with ``until_task``:
            the number of tasks completed when that environment was last used.
    """

    status: Literal["running", "finished"] | None = None
    name: str | None = None
    method: str
    protocol: str
    backbone: dict[str, Any]
    dataset: dict[str, Any]
    seed: int
    class_order: list[int]
    class_names: list[str] = field(default_factory=list)
    tasks: list[list[int]]
    num_tasks: int
    completed_tasks: int
    accuracy_matrix: list[list[float | None]]
    acc_after_task: list[float]
    acc: float
    aaa: float
    mean_task_acc: float
    forgetting: float | None
    bwt: float | None
    test_samples_per_task: list[int]
    trainable_params_per_task: list[int]
    stored_params_total: int
    task_log: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float
    reference: dict[str, float] = field(default_factory=dict)
    sdlora_version: str
    data_identity: dict[str, Any] = field(default_factory=dict)
    inference_passes: int = 1
    learned_tasks: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    earlier_environments: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data in field order (what ``results.json`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: Keys every ``results.json`` must have: the fields of :class:`RunResults` without a default.
REQUIRED_KEYS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(RunResults)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def parse_results(data: Any, source: str = RESULTS_FILE) -> RunResults:
    """Check a decoded ``results.json`` and return it typed.

    Keys this version does not know (written by a newer one) are ignored.

    Raises:
        ValueError: not a JSON object, missing :data:`REQUIRED_KEYS` (all named), or a value of the wrong type
            (with its key); the message starts with ``source``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{source}: missing keys {', '.join(missing)}")
    known = {f.name for f in dataclasses.fields(RunResults)}
    try:
        return from_dict(RunResults, {k: v for k, v in data.items() if k in known})
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``<run_dir>/results.json``.

    Returns:
        The results as read (a dict; :func:`parse_results` gives the typed form).

    Raises:
        FileNotFoundError: the run directory has no ``results.json`` (the message names the path).
        ValueError: the file is not valid JSON, not an object, lacks keys of :data:`REQUIRED_KEYS` or holds a
            value of the wrong type (the message names the file and the keys).
    """
    path = os.path.join(os.fspath(run_dir), RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {RESULTS_FILE} in run directory {os.fspath(run_dir)!r} (looked for {path})")
    data = read_json(path)
    parse_results(data, path)
    return data


@dataclass(frozen=True)
class RunEvent:
    """Progress of a run, passed to the engine's listeners (on the main process only).

    Attributes:
        kind: ``task_end`` after each task (``results.json`` has just been written); ``resumed`` once when a run
            continues from a checkpoint (``results.json`` has just been rewritten from it); ``run_end`` at the
            end of every call, also when a finished run was resumed and no task ran; ``step`` after every
            optimizer step and ``epoch_end`` after every epoch (training progress: ``scalars`` and ``step``, no
            ``results``).
        run_dir: the run directory.
        task: the 0-based task just finished (``task_end``), the checkpoint's task (``resumed``), the last one
            (``run_end``), or the task in training (``step``, ``epoch_end``).
        results: the record as written to ``results.json`` (empty for ``step`` and ``epoch_end``).
        scalars: ``step``: ``train/loss`` (the step's mean loss over this process's samples) and ``train/lr``;
            ``epoch_end``: ``train/epoch_loss`` (the epoch's mean over all samples) and ``train/epoch`` (1-based).
        step: ``step`` / ``epoch_end``: optimizer steps of the run so far, over all tasks (1 after the first step).
    """

    kind: Literal["task_end", "resumed", "run_end", "step", "epoch_end"]
    run_dir: Path
    task: int
    results: dict[str, Any]
    scalars: dict[str, float] = field(default_factory=dict)
    step: int | None = None
