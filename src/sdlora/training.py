"""One task's optimisation and evaluation: optimiser, learning-rate schedule, autocast, the epoch loop (with DDP
under torchrun) and the per-task correct counts on the test data; :class:`Runtime` says how and where tasks train.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .batches import GlobalBatchSampler, SeededAugment, make_loader, progress
from .config import TrainConfig
from .data import batch_to
from .distributed import DistInfo, all_reduce_sum, comm_device, ddp_kwargs, global_len
from .methods import Method, TaskContext
from .rundir import RunError

__all__ = ["Runtime", "autocast", "evaluate", "make_optimizer", "make_scheduler", "param_groups", "train_task"]


@dataclass
class Runtime:
    """How and where tasks train: the train config, the run's seed, the device, the process layout.

    Attributes:
        train: optimisation settings.
        seed: the run's seed (seeds each task's augmentation and batch order).
        device: where the model and batches live.
        info: process layout (a single process by default).
        workers: DataLoader worker processes.
        progress: called on the main process with ``(kind, task, step, scalars)`` after every optimizer step
            (``kind`` ``step``) and epoch (``epoch_end``); see :class:`~sdlora.results.RunEvent` for the scalars.
    """

    train: TrainConfig
    seed: int
    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    workers: int = 0
    progress: Callable[[Literal["step", "epoch_end"], int, int, dict[str, float]], None] | None = None


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """``train.optimizer`` (sgd, adam or adamw) over ``params`` at learning rate ``lr`` (or over torch parameter
    groups, each of which may set its own ``lr``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)


def param_groups(method: Method, lr: float) -> list[dict[str, Any]]:
    """The method's ``optimizer_groups`` as torch parameter groups, each at ``lr`` times its factor (empty groups
    left out): what :func:`train_task` gives :func:`make_optimizer`."""
    return [{"params": g, "lr": lr * factor} for g, factor in method.optimizer_groups() if g]


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int) -> Any:
    """``train.scheduler`` stepped once per epoch, or ``None`` for a constant learning rate."""
    if cfg.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=cfg.min_lr)
    return None


def autocast(cfg: TrainConfig, device: torch.device) -> Any:
    """bfloat16 autocast when ``train.amp`` is set and the device is CUDA, else a context that does nothing."""
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
    for x, y in progress(loader, len(loader), "eval", info):
        x, y = batch_to(x, device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(cfg, device):
            pred = method(x).argmax(1)
        groups = task_of_pos[y]
        total += torch.bincount(groups, minlength=n_tasks_seen)
        correct += torch.bincount(groups[pred == y], minlength=n_tasks_seen)
    all_reduce_sum(correct, info)
    all_reduce_sum(total, info)
    return correct.tolist(), total.tolist()


def train_task(
    method: Method, ctx: TaskContext, train_set: SeededAugment, rt: Runtime, steps_before: int = 0
) -> dict[str, Any]:
    """The training epochs of one task (after ``begin_task``): ``{"epochs", "steps", "loss"}`` (last epoch's mean).

    ``rt.progress`` hears every step and epoch; ``steps_before`` (optimizer steps of the earlier tasks) makes
    its step numbers count over the whole run.

    Raises:
        RunError: the epoch's mean loss is not finite.
    """
    tcfg, info, device = rt.train, rt.info, rt.device
    tell = rt.progress if info.main else None
    epochs = ctx.epochs
    lr = tcfg.lr_for(ctx.task)
    groups = param_groups(method, lr)
    params = [p for g in groups for p in g["params"]]
    if not method.trains or epochs == 0 or not params:
        return {"epochs": 0, "steps": 0, "loss": None}
    opt = make_optimizer(groups, tcfg, lr)
    sched = make_scheduler(opt, tcfg, epochs)
    sampler = GlobalBatchSampler(
        len(train_set), tcfg.batch_size, seed=rt.seed * 1000 + ctx.task, rank=info.rank, world=info.world
    )
    loader = make_loader(train_set, sampler, tcfg.batch_size, rt.workers, device.type == "cuda")
    # DDP is built per task: the trainable set (current A_t, B_t, magnitudes, new head block) changes at each
    # task boundary, and DDP registers its gradient hooks for the parameters that require grad when it is built.
    # (A DDP built once would keep hooks on the previous task's A_t/B_t and on magnitude Parameters that
    # begin_task/end_task have since replaced: SD-LoRA re-creates alpha_prev/alpha_cur each task and turns them
    # into buffers in between, and the head grows a new block.) Building it also broadcasts rank 0's
    # parameters and buffers, which are identical anyway (same seed, same updates; checked after each task).
    model: nn.Module = method
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs()
        )
    steps, last_loss = 0, float("nan")
    method.train()
    for epoch in range(epochs):
        sampler.epoch = epoch
        train_set.epoch = epoch
        running, count = 0.0, 0
        for x, y in progress(loader, len(loader), f"task {ctx.task + 1} epoch {epoch + 1}/{epochs}", info):
            x, y = batch_to(x, device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(tcfg, device):
                logits = model(x)
            loss = method.training_loss(logits.float(), y, ctx)
            shard_loss = loss  # mean over this process's shard, for the log
            # Under torchrun each process holds a shard of the global batch; DDP averages gradients over
            # processes, so scaling by shard/global*world makes the step equal to the single-process one.
            if info.enabled:
                loss = loss * (len(y) * info.world / global_len(len(y), info, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            steps += 1
            step_loss = float(shard_loss.detach())
            running += step_loss * len(y)
            count += len(y)
            if tell is not None:
                lr = float(opt.param_groups[0]["lr"])
                tell("step", ctx.task, steps_before + steps, {"train/loss": step_loss, "train/lr": lr})
        if sched is not None:
            sched.step()
        if info.enabled:
            # Sum over processes: the logged loss is the epoch mean over all samples, as with one process, and
            # every process takes the same decision on divergence below (one raising alone would hang the rest).
            sums = torch.tensor([running, count], dtype=torch.float64, device=comm_device(device))
            all_reduce_sum(sums, info)
            running, count = float(sums[0]), int(sums[1])
        last_loss = running / max(count, 1)
        if not math.isfinite(last_loss):
            raise RunError(
                f"training diverged in task {ctx.task + 1}, epoch {epoch + 1} (loss {last_loss}); "
                "lower train.lr or set train.grad_clip"
            )
        if tell is not None:
            scalars = {"train/epoch_loss": last_loss, "train/epoch": float(epoch + 1)}
            tell("epoch_end", ctx.task, steps_before + steps, scalars)
    return {"epochs": epochs, "steps": steps, "loss": last_loss}
