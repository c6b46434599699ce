"""What the task loop carries from one task to the next (:class:`RunState`): the accuracy counts, test totals,
trainable counts, task log, wall time and environments, saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .environment import continue_environments
from .metrics import compute_metrics
from .rundir import RunError

__all__ = ["RunState"]


@dataclass
class RunState:
    """What the task loop carries from one task to the next; saved in every checkpoint.

    Attributes:
        correct: ``correct[i][j]``: correctly classified test samples of task ``j`` after training task ``i``;
            ``None`` for an earlier task whose test data was not available then (``sdlora learn``).
        totals: test samples of every task seen so far (the totals of earlier tasks never change).
        trainable_per_task: scalars that learned in each task (``method.parameter_counts()["trainable"]`` right
            after ``begin_task``).
        task_log: one entry per finished task (see :func:`sdlora.engine.run_task`).
        wall_time_s: wall time of the run up to the last finished task, over all sessions.
        next_task: the 0-based task to run next (= tasks finished).
        elapsed_before: wall time of earlier sessions (restored from the checkpoint; not saved on its own).
        session_start: ``time.time()`` when this session started (not saved).
        environment: :func:`sdlora.environment.capture_environment` of the session that ran the last task;
            earlier_environments: the ones before it that differed (:meth:`continue_in`).
    """

    correct: list[list[int | None]] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    trainable_per_task: list[int] = field(default_factory=list)
    task_log: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    next_task: int = 0
    elapsed_before: float = field(default=0.0, repr=False, compare=False)
    session_start: float = field(default_factory=time.time, repr=False, compare=False)
    environment: dict[str, Any] = field(default_factory=dict)
    earlier_environments: list[dict[str, Any]] = field(default_factory=list)

    def continue_in(self, environment: dict[str, Any]) -> list[str]:
        """This session runs in ``environment``: record it, keeping a differing earlier one in the history.

        Returns:
            What differs from the environment recorded before (``key: old -> new``; empty for a new run, or when
            nothing that decides the numbers changed), for the caller's warning.
        """
        self.earlier_environments, changes = continue_environments(
            self.environment, self.earlier_environments, environment, self.next_task
        )
        self.environment = dict(environment)
        return changes

    def metrics(self) -> dict[str, Any]:
        """:func:`sdlora.metrics.compute_metrics` of the counts so far (needs a finished task)."""
        return compute_metrics(self.correct, self.totals)

    def to_checkpoint(self) -> dict[str, Any]:
        """The JSON-able engine state stored in a checkpoint (``record["engine"]``; the task is ``record["task"]``)."""
        return {
            "correct": self.correct,
            "totals": self.totals,
            "trainable_per_task": self.trainable_per_task,
            "task_log": self.task_log,
            "wall_time_s": self.wall_time_s,
            "environment": self.environment,
            "earlier_environments": self.earlier_environments,
        }

    @classmethod
    def from_checkpoint(cls, record: dict[str, Any], session_start: float | None = None) -> RunState:
        """The state saved in a checkpoint record (as ``rundir.load_checkpoint`` returns it).

        Args:
            record: the checkpoint's JSON record; its ``engine`` entry is :meth:`to_checkpoint`'s output.
            session_start: when the resuming session started (default: now); later wall times add to the saved one.

        Raises:
            RunError: the record lacks the engine state (not a checkpoint of this engine).
        """
        try:
            eng = record["engine"]
            state = cls(
                correct=[[None if v is None else int(v) for v in row] for row in eng["correct"]],
                totals=[int(t) for t in eng["totals"]],
                trainable_per_task=[int(n) for n in eng["trainable_per_task"]],
                task_log=list(eng["task_log"]),
                wall_time_s=float(eng["wall_time_s"]),
                next_task=int(record["task"]) + 1,
                elapsed_before=float(eng["wall_time_s"]),
                # Checkpoints written before environments were recorded have none.
                environment=dict(eng.get("environment") or {}),
                earlier_environments=list(eng.get("earlier_environments") or []),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"checkpoint record without a valid engine state ({type(e).__name__}: {e})") from None
        if session_start is not None:
            state.session_start = session_start
        return state
