"""The one training loop: tasks, epochs, batches, evaluation, metrics, checkpoints, resume, torchrun.

Everything that touches a device or another process lives here; files of the run directory are read and
written through ``rundir`` (status, checkpoints, RNG) and ``results`` (the record); the derived tables and
plots belong to ``report``, which listens to the run's events. Methods only implement hooks
(``methods/base.py``).

Pieces, from the outside in:

* :func:`run_experiment` -- a whole run into a run directory (prepare or resume it, build everything, loop over
  the tasks, write ``results.json`` and a checkpoint after each, tell the listeners);
* :func:`run_task` -- one task on a given method: train, ``end_task``, evaluate on every task so far, update
  the :class:`RunState` (also usable outside a scenario loop, e.g. to add a task to a finished run);
* :class:`RunState` -- what the loop carries from task to task (accuracy counts, test totals, trainable counts,
  task log, wall time, next task), saved in every checkpoint and restored on resume.

Determinism. Each training sample's augmentation is drawn from its own generator seeded by
``(seed, task, epoch, index)``, and batches come from a seeded global permutation, so results do not depend on
``num_workers``, on the number of processes under torchrun, or on whether a run was resumed. The global RNG
state is also saved in every checkpoint and restored on resume (it drives parameter initialisation).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from .backbones import Backbone, create_backbone
from .config import RunConfig, TrainConfig, resolve_method_config
from .configtools import ConfigError, dump_yaml, to_dict
from .data import Batch, DatasetBundle, Scenario, batch_to, build_dataset, load_raw_dataset
from .data.check import coverage_problems
from .data.identity import identity_changes
from .fileio import atomic_write_json, atomic_write_text, read_json
from .methods import Method, TaskContext, create_method
from .metrics import compute_metrics
from .report import on_run_event
from .results import RESULTS_FILE, RunEvent, RunResults
from .rundir import (
    CONFIG_HEADER,
    RunError,
    build_method_from_run,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    restore_rng_state,
    run_dir_lock,
    save_checkpoint,
    seed_everything,
)

__all__ = [
    "DistInfo",
    "RunError",
    "RunState",
    "Runtime",
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


# ------------------------------------------------------------------------------------------ processes
@dataclass
class DistInfo:
    """Process layout: a single process, or one of ``world`` processes started by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: this run created the process group (so it destroys it at the end); False when a caller set one up
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_spec: str) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec != "cpu" and torch.cuda.is_available()
    if use_cuda:
        # Before the group exists: NCCL collectives (barrier, object broadcasts) run on the current device,
        # which would otherwise be GPU 0 in every process.
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


def select_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    if not torch.cuda.is_available():
        raise RunError(f"train.device={spec!r} but CUDA is not available; use train.device=cpu or auto")
    if info.enabled and spec == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device(spec)


def _all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _comm_device(device: torch.device) -> torch.device:
    """Where small tensors for collectives live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


def _ddp_kwargs() -> dict[str, Any]:
    """No buffer broadcast on every forward: SD-LoRA keeps frozen factors and magnitudes as buffers, identical
    on every process and never changed by a training step. (torch >= 2.14 renames the switch.)"""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def state_fingerprint(method: Method) -> str:
    """sha256 over ``method.state()`` tensors (names, dtypes, shapes, bytes): the trainable head and adapter
    state that a checkpoint holds, not the frozen backbone."""
    tensors, _ = method.state()
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(method: Method, info: DistInfo, device: torch.device, task: int) -> None:
    """Raise on every process if the processes hold different method states after a task.

    The processes are meant to agree bit for bit without any broadcast: the same seed gives the same
    initialisation, DDP gives every process the same averaged gradients, and what ``end_task`` does (SD-LoRA
    freezing/normalising directions, the SD-LoRA-KD least-squares fit and absorption) is a deterministic
    function of those weights, run by every process on its own copy. This check (one small all_reduce per
    task) makes a silent divergence -- e.g. a nondeterministic step in a future method's ``end_task`` -- a
    loud error instead of a checkpoint that only describes rank 0.
    """
    if not info.enabled:
        return
    digest = bytes.fromhex(state_fingerprint(method))
    # 4 non-negative 62-bit chunks of the digest; equal everywhere iff max(h) == -max(-h) == min(h).
    h = torch.tensor(
        [int.from_bytes(digest[i : i + 8], "big") >> 2 for i in range(0, 32, 8)],
        dtype=torch.int64,
        device=_comm_device(device),
    )
    both = torch.cat([h, -h])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[:4], -both[4:]):
        raise RunError(
            f"after task {task + 1} the {info.world} processes hold different model states (rank {info.rank}: "
            f"{digest.hex()[:16]}); something in training or end_task is not deterministic across processes"
        )


# ---------------------------------------------------------------------------------------------- data
class SeededAugment(Dataset):
    """Draws each sample's random transform from a generator seeded by ``(base, epoch, index)``.

    This makes augmentation independent of worker count, process count and resume point. The transforms draw
    from torch's default CPU generator; it is seeded for the sample and restored afterwards, so the caller's
    random stream is untouched. (Only that generator: ``torch.manual_seed`` would also reseed every CUDA
    generator, which made the main process's CUDA stream depend on whether samples were loaded there or in
    workers, and ``torch.random.fork_rng`` costs ~200 us per sample, against ~3 us for this.)
    """

    def __init__(self, dataset: Dataset, base_seed: int) -> None:
        self.dataset = dataset
        self.base_seed = base_seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed((self.base_seed * 1_000_003 + self.epoch * 7_919 + int(i)) % (2**63 - 1))
        try:
            return self.dataset[i]
        finally:
            gen.set_state(state)


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a seeded permutation of ``n`` samples; each process takes its slice of every global batch.

    With one process this is an ordinary shuffled batch sampler. With ``world`` processes every global batch is
    the same as with one, split into contiguous shards, so the averaged gradient is the same (up to float
    summation order). A last global batch smaller than ``world`` is dropped there, since every process must
    take part in each step.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def _global_batches(self) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in batches if len(b) >= self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._global_batches():
            yield np.array_split(b, self.world)[self.rank].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def _loader(
    dataset: Dataset,
    batch_sampler: Sampler | None,
    batch_size: int,
    workers: int,
    pin: bool,
    indices: list[int] | None = None,
) -> DataLoader:
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)


def _shard(n: int, info: DistInfo) -> list[int]:
    """Contiguous shard of ``range(n)`` for this process (no padding: counts are summed, not averaged)."""
    return np.array_split(np.arange(n), info.world)[info.rank].tolist()


def _progress(iterable: Any, total: int, desc: str, info: DistInfo) -> Any:
    from tqdm import tqdm

    quiet = not info.main or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=quiet, dynamic_ncols=True)


# -------------------------------------------------------------------------------------------- training
def _optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int) -> Any:
    if cfg.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=cfg.min_lr)
    return None


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    method: Method,
    loader: DataLoader,
    task_of_pos: Tensor,
    n_tasks_seen: int,
    device: torch.device,
    cfg: TrainConfig,
    info: DistInfo,
) -> tuple[list[int], list[int]]:
    """Correct and total test samples per task j < n_tasks_seen (argmax over all seen classes), summed over
    processes."""
    method.eval()
    correct = torch.zeros(n_tasks_seen, dtype=torch.long, device=device)
    total = torch.zeros(n_tasks_seen, dtype=torch.long, device=device)
    for x, y in _progress(loader, len(loader), "eval", info):
        x, y = batch_to(x, device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(cfg, device):
            pred = method(x).argmax(1)
        groups = task_of_pos[y]
        total += torch.bincount(groups, minlength=n_tasks_seen)
        correct += torch.bincount(groups[pred == y], minlength=n_tasks_seen)
    _all_reduce_sum(correct, info)
    _all_reduce_sum(total, info)
    return correct.tolist(), total.tolist()


def _train_task(method: Method, ctx: TaskContext, train_set: SeededAugment, rt: Runtime) -> dict[str, Any]:
    tcfg, info, device = rt.train, rt.info, rt.device
    epochs = ctx.epochs
    params = method.trainable_parameters()
    if not method.trains or epochs == 0 or not params:
        return {"epochs": 0, "steps": 0, "loss": None}
    opt = _optimizer(params, tcfg, tcfg.lr_for(ctx.task))
    sched = _scheduler(opt, tcfg, epochs)
    sampler = GlobalBatchSampler(
        len(train_set), tcfg.batch_size, seed=rt.seed * 1000 + ctx.task, rank=info.rank, world=info.world
    )
    loader = _loader(train_set, sampler, tcfg.batch_size, rt.workers, device.type == "cuda")
    # DDP is built per task: the trainable set (current A_t, B_t, magnitudes, new head block) changes at each
    # task boundary, and DDP registers its gradient hooks for the parameters that require grad when it is built.
    # (A DDP built once would keep hooks on the previous task's A_t/B_t and on magnitude Parameters that
    # begin_task/end_task have since replaced: SD-LoRA re-creates alpha_prev/alpha_cur each task and turns them
    # into buffers in between, and the head grows a new block.) Building it also broadcasts rank 0's
    # parameters and buffers, which are identical anyway (same seed, same updates; checked after each task).
    model: nn.Module = method
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, **_ddp_kwargs()
        )
    steps, last_loss = 0, float("nan")
    method.train()
    for epoch in range(epochs):
        sampler.epoch = epoch
        train_set.epoch = epoch
        running, count = 0.0, 0
        for x, y in _progress(loader, len(loader), f"task {ctx.task + 1} epoch {epoch + 1}/{epochs}", info):
            x, y = batch_to(x, device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(tcfg, device):
                logits = model(x)
            loss = method.training_loss(logits.float(), y, ctx)
            shard_loss = loss  # mean over this process's shard, for the log
            # Under torchrun each process holds a shard of the global batch; DDP averages gradients over
            # processes, so scaling by shard/global*world makes the step equal to the single-process one.
            if info.enabled:
                loss = loss * (len(y) * info.world / _global_len(len(y), info, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            steps += 1
            running += float(shard_loss.detach()) * len(y)
            count += len(y)
        if sched is not None:
            sched.step()
        if info.enabled:
            # Sum over processes: the logged loss is the epoch mean over all samples, as with one process, and
            # every process takes the same decision on divergence below (one raising alone would hang the rest).
            sums = torch.tensor([running, count], dtype=torch.float64, device=_comm_device(device))
            _all_reduce_sum(sums, info)
            running, count = float(sums[0]), int(sums[1])
        last_loss = running / max(count, 1)
        if not math.isfinite(last_loss):
            raise RunError(
                f"training diverged in task {ctx.task + 1}, epoch {epoch + 1} (loss {last_loss}); "
                "lower train.lr or set train.grad_clip"
            )
    return {"epochs": epochs, "steps": steps, "loss": last_loss}


def _global_len(n_local: int, info: DistInfo, device: torch.device) -> float:
    t = torch.tensor([n_local], dtype=torch.float64, device=_comm_device(device))
    _all_reduce_sum(t, info)
    return float(t.item())


# ------------------------------------------------------------------------------------------ run state
@dataclass
class RunState:
    """What the task loop carries from one task to the next; saved in every checkpoint.

    Attributes:
        correct: ``correct[i][j]``: correctly classified test samples of task ``j`` after training task ``i``;
            ``None`` for an earlier task whose test data was not available then (``sdlora learn``).
        totals: test samples of every task seen so far (the totals of earlier tasks never change).
        trainable_per_task: scalars that learned in each task (``method.parameter_counts()["trainable"]`` right
            after ``begin_task``).
        task_log: one entry per finished task (see :func:`run_task`).
        wall_time_s: wall time of the run up to the last finished task, over all sessions.
        next_task: the 0-based task to run next (= tasks finished).
        elapsed_before: wall time of earlier sessions (restored from the checkpoint; not saved on its own).
        session_start: ``time.time()`` when this session started (not saved).
    """

    correct: list[list[int | None]] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    trainable_per_task: list[int] = field(default_factory=list)
    task_log: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    next_task: int = 0
    elapsed_before: float = field(default=0.0, repr=False, compare=False)
    session_start: float = field(default_factory=time.time, repr=False, compare=False)

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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"checkpoint record without a valid engine state ({type(e).__name__}: {e})") from None
        if session_start is not None:
            state.session_start = session_start
        return state


# ------------------------------------------------------------------------------------------ one task
@dataclass
class Runtime:
    """How and where tasks train: the train config, the run's seed, the device, the process layout.

    Attributes:
        train: optimisation settings.
        seed: the run's seed (seeds each task's augmentation and batch order).
        device: where the model and batches live.
        info: process layout (a single process by default).
        workers: DataLoader worker processes.
    """

    train: TrainConfig
    seed: int
    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    workers: int = 0


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
        loader = _loader(
            task.statistics,
            None,
            tcfg.eval_batch_size,
            rt.workers,
            device.type == "cuda",
            indices=_shard(len(task.statistics), info),  # type: ignore[arg-type]
        )
        for x, y in loader:
            yield batch_to(x, device), y.to(device)

    ctx = TaskContext(
        task=t,
        num_tasks=num_tasks,
        class_start=task.class_start,
        class_end=task.class_end,
        device=device,
        epochs=tcfg.epochs_for(t),
        statistics_batches=statistics_batches,
        all_reduce=lambda x: _all_reduce_sum(x, info),
        seed=rt.seed,
    )
    method.begin_task(ctx)
    trainable = int(method.parameter_counts()["trainable"])
    train_set = SeededAugment(task.train, base_seed=rt.seed * 1000 + t)
    train_stats = _train_task(method, ctx, train_set, rt)
    end_report = method.end_task(ctx)
    end_report.update(method.after_task(ctx))  # optional classifier alignment (method.align)
    check_ranks_agree(method, info, device, t)
    t_train = time.time() - t0
    test_loader = _loader(
        task.test,
        None,
        tcfg.eval_batch_size,
        rt.workers,
        device.type == "cuda",
        indices=_shard(len(task.test), info),  # type: ignore[arg-type]
    )
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
        metrics = state.metrics()
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
    return entry


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
    defaults filled in (``config.resolve_method_config``, applied to ``cfg`` in place).

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
    try:
        return _run(cfg, cfg_dict, out, resume, info, t_start, listeners)
    finally:
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
    state = RunState(session_start=t_start)
    results: dict[str, Any] | None = None
    if resume:
        ck = latest_checkpoint(out)
        if ck is not None:
            state = _restore(ck, out, method, data, device, t_start)
            log.info("resuming after task %d of %d from %s", state.next_task, n_tasks, ck)
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

    rt = Runtime(train=tcfg, seed=cfg.seed, device=device, info=info, workers=cfg.data.num_workers)
    for t in range(state.next_task, n_tasks):
        run_task(method, state, task_data(scenario, data, t), rt, num_tasks=n_tasks)
        results = build_results(cfg, method, backbone, data, scenario, state).to_dict()
        if info.main:
            atomic_write_json(out / RESULTS_FILE, results)
            _emit(listeners, RunEvent("task_end", out, t, results))
            if tcfg.checkpoint:
                save_checkpoint(out, t, method, state.to_checkpoint(), keep=None, data_identity=data.identity)
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
        inference_passes=int(type(method).inference_passes),
    )
