"""Run tracking: send a run's progress to TensorBoard, MLflow and/or Weights & Biases (``train.log_to``).

:class:`RunTracking` is a listener of the engine's :class:`~sdlora.results.RunEvent` stream (like
:func:`sdlora.report.on_run_event`), created by the engine on the main process only (rank 0 under torchrun). What
each tracker receives:

* ``step`` events: ``train/loss`` (the step's mean loss; under torchrun rank 0's shard) and ``train/lr`` against the
  run's global optimizer step (counted over all tasks); ``epoch_end``: ``train/epoch_loss`` (the epoch's mean over
  all samples, as in ``results.json``'s task log) and ``train/epoch``;
* ``task_end``: the accuracy matrix row (``accuracy/task_NN``, 1-based) and ``metrics/acc`` (accuracy on all seen
  classes), ``metrics/aaa``, ``metrics/forgetting``, ``metrics/bwt`` (when defined), against the task number;
* ``run_end``: the plots ``accuracy_matrix.png`` / ``accuracy_curve.png`` that :mod:`sdlora.report` has just drawn;
* when a tracker starts: the resolved config and the environment (Python, platform, torch, CUDA, versions).

Where the data goes: TensorBoard event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``); MLflow
the tracking URI that MLflow itself uses (``MLFLOW_TRACKING_URI``, else MLflow's default), experiment
``MLFLOW_EXPERIMENT_NAME`` or the config's ``name``; W&B the project ``WANDB_PROJECT`` (default ``sdlora``), files
under the run directory, ``WANDB_MODE=offline`` honoured. The run ids are kept in ``RUN_DIR/tracking.json``, so a
``--resume`` continues the same tracked runs (TensorBoard drops the events a killed session wrote after the
checkpoint it resumes from; MLflow and W&B keep them) and ``sdlora learn`` adds its task to them.

Each tracker's package is optional (``pip install 'sdlora[track]'``); a missing one is reported when the run starts,
before any training.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import LOG_TO
from .fileio import atomic_write_json, read_json
from .results import RunEvent

__all__ = ["TRACKERS", "TRACKING_FILE", "RunTracking", "environment", "flatten", "require_trackers"]

log = logging.getLogger(__name__)

#: Trackers ``train.log_to`` may name (:data:`sdlora.config.LOG_TO`), with the package each needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
assert set(TRACKERS) == set(LOG_TO), "config.LOG_TO and tracking.TRACKERS name the same trackers"
#: The file in the run directory that keeps each tracker's run id.
TRACKING_FILE = "tracking.json"
_PLOTS = ("accuracy_matrix", "accuracy_curve")


def require_trackers(names: Sequence[str]) -> None:
    """Import each named tracker's package now, so a missing one stops the run before it trains.

    Raises:
        ImportError: a package is missing (the message says what to install).
    """
    import importlib

    for name in names:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError as e:
            raise ImportError(
                f"train.log_to names {name} but its package is not installed ({e}); install it with "
                f"pip install 'sdlora[track]' (or pip install {TRACKERS[name]}), or remove {name} from train.log_to"
            ) from None


def environment() -> dict[str, Any]:
    """Where the run runs: versions of Python, torch and the libraries sdlora builds on, the platform and CUDA."""
    import torch

    from . import __version__

    env: dict[str, Any] = {
        "sdlora": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    for mod in ("timm", "transformers", "datasets"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", None)
    return env


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``train.lr``), for trackers whose parameters are flat."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _task_scalars(results: Mapping[str, Any], task: int) -> dict[str, float]:
    """The accuracy row of ``task`` and the pooled metrics after it (``None`` entries left out)."""
    row = results["accuracy_matrix"][task]
    values: dict[str, Any] = {f"accuracy/task_{j + 1:02d}": v for j, v in enumerate(row[: task + 1])}
    values.update(
        {
            "metrics/acc": results["acc_after_task"][task],
            "metrics/aaa": results.get("aaa"),
            "metrics/forgetting": results.get("forgetting"),
            "metrics/bwt": results.get("bwt"),
        }
    )
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _steps_done(results: Mapping[str, Any]) -> int:
    return sum(int(e.get("steps") or 0) for e in results.get("task_log") or [])


class _Tracker:
    """One tracking backend. ``start`` returns what ``tracking.json`` keeps to continue the same run later."""

    name = ""

    def start(
        self,
        run_dir: Path,
        config: dict[str, Any],
        env: dict[str, Any],
        previous: dict[str, Any] | None,
        steps_done: int,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def scalars(self, values: Mapping[str, float], axis: str, step: int) -> None:
        raise NotImplementedError

    def image(self, key: str, path: Path, step: int) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def start(
        self,
        run_dir: Path,
        config: dict[str, Any],
        env: dict[str, Any],
        previous: dict[str, Any] | None,
        steps_done: int,
    ) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        # TensorBoard drops the earlier events of this directory from purge_step on: on a resume the steps a killed
        # session wrote after its checkpoint (redone now), on a new run (--overwrite) every event of the old one.
        self.writer = SummaryWriter(str(log_dir), purge_step=steps_done + 1 if previous else 0)
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", steps_done)
        self.writer.add_text("environment", "```\n" + json.dumps(env, indent=1) + "\n```", steps_done)
        return {"log_dir": str(log_dir)}

    def scalars(self, values: Mapping[str, float], axis: str, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(key, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow(_Tracker):
    """MLflow through its client (no global active run is set, so sdlora leaves a caller's MLflow state alone)."""

    name = "mlflow"

    def start(
        self,
        run_dir: Path,
        config: dict[str, Any],
        env: dict[str, Any],
        previous: dict[str, Any] | None,
        steps_done: int,
    ) -> dict[str, Any]:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = previous["tracking_uri"] if previous else mlflow.get_tracking_uri()
        self.client = MlflowClient(uri)
        if previous:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(config.get("name") or "sdlora")
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
            run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"sdlora.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            params = {k: str(v)[:500] for k, v in flatten(config).items()}
            items = sorted(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        self.client.log_dict(self.run_id, config, "config.json")
        self.client.log_dict(self.run_id, env, "environment.json")
        return {"tracking_uri": uri, "run_id": self.run_id}

    def scalars(self, values: Mapping[str, float], axis: str, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, key: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class _WandB(_Tracker):
    name = "wandb"

    def start(
        self,
        run_dir: Path,
        config: dict[str, Any],
        env: dict[str, Any],
        previous: dict[str, Any] | None,
        steps_done: int,
    ) -> dict[str, Any]:
        import wandb

        project = previous["project"] if previous else os.environ.get("WANDB_PROJECT", "sdlora")
        self.run = wandb.init(
            project=project,
            id=previous["id"] if previous else None,
            resume="allow" if previous else None,
            name=str(config.get("name") or run_dir.name),
            dir=str(run_dir),
            config={**config, "environment": env},
            reinit="create_new",
        )
        # Two x axes: the global optimizer step for training curves, the task number for accuracies.
        self.run.define_metric("global_step")
        self.run.define_metric("task")
        self.run.define_metric("train/*", step_metric="global_step")
        for group in ("accuracy/*", "metrics/*", "plots/*"):
            self.run.define_metric(group, step_metric="task")
        return {"project": project, "id": self.run.id}

    def scalars(self, values: Mapping[str, float], axis: str, step: int) -> None:
        self.run.log({**values, ("global_step" if axis == "step" else "task"): step})

    def image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path)), "task": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_BACKENDS: dict[str, type[_Tracker]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class RunTracking:
    """The engine's tracking listener for one run directory (module docstring).

    Args:
        names: the trackers (``train.log_to``).
        run_dir: the run directory (``tracking.json`` is kept there).
        config: the run's resolved config (logged when a tracker starts).
        resume: continue the tracked runs recorded in ``tracking.json`` (``--resume``, ``sdlora learn``); without
            it new tracked runs start and replace the record.

    Raises:
        ImportError: a tracker's package is missing (:func:`require_trackers`).
    """

    def __init__(
        self, names: Sequence[str], run_dir: str | os.PathLike, config: dict[str, Any], *, resume: bool = False
    ) -> None:
        require_trackers(names)
        self.names = list(names)
        self.run_dir = Path(run_dir)
        self.config = config
        self.resume = resume
        self.trackers: list[_Tracker] = []
        self.started = False

    def _start(self, steps_done: int) -> None:
        self.started = True
        path = self.run_dir / TRACKING_FILE
        record: dict[str, Any] = {}
        if self.resume and path.is_file():
            try:
                record = read_json(path)
            except ValueError as e:
                log.warning("%s is unreadable (%s): tracking starts new runs", path, e)
        env = environment()
        ids: dict[str, Any] = {}
        for name in self.names:
            backend = _BACKENDS[name]()
            previous = record.get(name) if self.resume else None
            ids[name] = backend.start(self.run_dir, self.config, env, previous, steps_done)
            self.trackers.append(backend)
            log.info("tracking to %s: %s%s", name, ids[name], " (continued)" if previous else "")
        atomic_write_json(path, {**record, **ids})

    def __call__(self, event: RunEvent) -> None:
        if not self.started:
            self._start(_steps_done(event.results) if event.kind == "resumed" else self._steps_before(event))
        if event.kind in ("step", "epoch_end"):
            self._emit(event.scalars, "step", int(event.step or 0))
        elif event.kind == "task_end":
            self._emit(_task_scalars(event.results, event.task), "task", event.task + 1)
        elif event.kind == "run_end":
            for plot in _PLOTS:
                path = self.run_dir / "plots" / f"{plot}.png"
                if path.is_file():
                    for tracker in self.trackers:
                        tracker.image(f"plots/{plot}", path, event.task + 1)

    def _steps_before(self, event: RunEvent) -> int:
        """Optimizer steps before the first event of this session (a step event carries its own number)."""
        if event.kind in ("step", "epoch_end") and event.step is not None:
            return int(event.step) - 1
        return _steps_done(event.results)

    def _emit(self, values: Mapping[str, float], axis: str, step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, axis, step)

    def close(self, failed: bool = False) -> None:
        """End every tracked run (``failed``: the run stopped with an error); a second call does nothing."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as e:  # a tracker that cannot close must not hide the run's own outcome
                log.warning("closing the %s tracker failed: %s", tracker.name, e)
