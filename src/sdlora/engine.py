"""The one training loop: tasks, epochs, batches, evaluation, metrics, checkpoints, resume, torchrun.

Everything that touches a device, a file or another process lives here or in ``cli.py``; methods only
implement hooks (``methods/base.py``).

Determinism. Each training sample's augmentation is drawn from its own generator seeded by
``(seed, task, epoch, index)``, and batches come from a seeded global permutation, so results do not depend on
``num_workers``, on the number of processes under torchrun, or on whether a run was resumed. The global RNG
state is also saved in every checkpoint and restored on resume (it drives parameter initialisation).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from .backbones import create_backbone
from .config import RunConfig, TrainConfig
from .configtools import diff, dump_yaml, load_yaml
from .data import batch_to, build_dataset, make_scenario
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file
from .methods import Method, TaskContext, create_method
from .metrics import compute_metrics

__all__ = ["RunError", "DistInfo", "run_experiment", "build_method_from_run", "load_checkpoint"]

log = logging.getLogger(__name__)
#: the package logger: the run's log.txt handler goes here, so every sdlora module's messages reach it
_pkg_log = logging.getLogger("sdlora")

#: Config keys that may change on ``--resume`` without changing results.
RESUME_FREE_KEYS = ("data.num_workers", "train.device", "train.threads", "train.checkpoint")


class RunError(RuntimeError):
    """A run cannot start or continue (bad run directory, mismatched resume, corrupt checkpoint)."""


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

    This makes augmentation independent of worker count, process count and resume point.
    """

    def __init__(self, dataset: Dataset, base_seed: int) -> None:
        self.dataset = dataset
        self.base_seed = base_seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.base_seed * 1_000_003 + self.epoch * 7_919 + int(i)) % (2**63 - 1))
            return self.dataset[i]


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


# ----------------------------------------------------------------------------------------- run dir
def run_state(out: Path) -> str:
    """``empty``, ``finished`` or ``unfinished`` (something of an earlier run is there)."""
    results = out / "results.json"
    if results.exists():
        try:
            status = read_json(results).get("status")
        except Exception:  # a corrupt results file still marks an earlier run
            status = None
        return "finished" if status == "finished" else "unfinished"
    if (out / "checkpoints").exists() or (out / "config.yaml").exists():
        return "unfinished"
    return "empty"


def config_changes(out: Path, cfg_dict: dict[str, Any]) -> list[str]:
    """Keys whose value saved in ``out/config.yaml`` differs from ``cfg_dict`` (``RESUME_FREE_KEYS`` excepted)."""
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return [f"{saved_path} is missing"]
    return [d for d in diff(load_yaml(saved_path), cfg_dict) if not d.split(":")[0].startswith(RESUME_FREE_KEYS)]


_RUN_ARTIFACTS = ("results.json", "metrics.csv", "accuracy_matrix.csv", "config.yaml", "log.txt", "split.json")


def prepare_run_dir(out: Path, cfg_dict: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse to write over earlier results unless asked; on resume, refuse a changed config.

    Raises:
        RunError: the directory holds a run and neither ``--resume`` nor ``--overwrite`` was given, or the
            resumed config differs (the message lists the keys).
    """
    state = run_state(out) if out.exists() else "empty"
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if state != "empty" and not resume and not overwrite:
        raise RunError(
            f"{out} already holds a{' finished' if state == 'finished' else 'n unfinished'} run; "
            "pass --resume to continue it or --overwrite to replace it, or choose another --out"
        )
    if resume and state != "empty":
        changes = config_changes(out, cfg_dict)
        if changes:
            raise RunError(
                f"cannot resume with a different config; these keys differ from {out / 'config.yaml'}:\n  "
                + "\n  ".join(changes)
            )
    if overwrite and state != "empty":
        for name in _RUN_ARTIFACTS:
            (out / name).unlink(missing_ok=True)
        for name in ("checkpoints", "plots"):
            shutil.rmtree(out / name, ignore_errors=True)


# -------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(out: Path, task: int, method: Method, engine_state: dict[str, Any], keep: int | None) -> None:
    """Write ``checkpoints/task_NNN.{safetensors,json}`` atomically; the JSON (written last, with the
    tensors' sha256) is the commit marker, so a run killed while writing leaves the previous one valid."""
    from safetensors.torch import save

    tensors, meta = method.state()
    rng_t, rng_meta = _rng_state()
    tensors.update(rng_t)
    blob = save({k: v.contiguous() for k, v in tensors.items()})
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    stem = ckdir / f"task_{task:03d}"
    atomic_write_bytes(stem.with_suffix(".safetensors"), blob)
    record = {
        "task": task,
        "method": meta,
        "engine": engine_state,
        "rng": rng_meta,
        "tensors_sha256": sha256_file(stem.with_suffix(".safetensors")),
        "sdlora_version": __version__,
    }
    atomic_write_json(stem.with_suffix(".json"), record)
    if keep is not None:
        done = sorted(ckdir.glob("task_*.json"))
        for old in done[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest committed checkpoint (its JSON exists), or None."""
    done = sorted((out / "checkpoints").glob("task_*.json")) if (out / "checkpoints").exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint.

    Raises:
        RunError: missing tensors file, corrupt JSON, or a sha256 mismatch (the file was damaged).
    """
    from safetensors.torch import load_file

    try:
        record = read_json(path)
    except Exception as e:
        raise RunError(f"corrupt checkpoint {path}: {e}; delete it to resume from the previous task") from None
    tpath = path.with_suffix(".safetensors")
    if not tpath.exists():
        raise RunError(f"checkpoint {path} has no tensors file {tpath}; delete {path} to use the previous one")
    if sha256_file(tpath) != record.get("tensors_sha256"):
        raise RunError(f"checkpoint {tpath} does not match its recorded sha256 (damaged); delete {path} and retry")
    return load_file(str(tpath)), record


# -------------------------------------------------------------------------------------------- training
def _optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


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


def _train_task(
    method: Method,
    ctx: TaskContext,
    train_set: SeededAugment,
    cfg: RunConfig,
    info: DistInfo,
    device: torch.device,
    workers: int,
) -> dict[str, Any]:
    tcfg = cfg.train
    epochs = ctx.epochs
    params = method.trainable_parameters()
    if not method.trains or epochs == 0 or not params:
        return {"epochs": 0, "steps": 0, "loss": None}
    opt = _optimizer(params, tcfg, tcfg.lr_for(ctx.task))
    sched = _scheduler(opt, tcfg, epochs)
    sampler = GlobalBatchSampler(
        len(train_set), tcfg.batch_size, seed=cfg.seed * 1000 + ctx.task, rank=info.rank, world=info.world
    )
    loader = _loader(train_set, sampler, tcfg.batch_size, workers, device.type == "cuda")
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


# ------------------------------------------------------------------------------------------ the run
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _build(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, Any, Method]:
    _seed_everything(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    data = build_dataset(cfg.data, mean=backbone.mean, std=backbone.std, seed=cfg.seed, tokenizer=backbone.tokenizer)
    sc = cfg.scenario
    scenario = make_scenario(
        data.num_classes,
        sc.init_cls,
        sc.increment,
        seed=cfg.seed if sc.seed is None else sc.seed,
        shuffle=sc.shuffle,
        class_order=sc.class_order,
        num_tasks=sc.num_tasks,
    )
    method = create_method(cfg.method, backbone).to(device)
    return backbone, data, scenario, method


def build_method_from_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[Method, RunConfig, dict]:
    """Rebuild a run's method from its ``config.yaml`` and newest checkpoint (for export and inspection)."""
    from .config import load_config

    out = Path(run_dir)
    if not (out / "config.yaml").exists():
        raise RunError(f"{out} is not a run directory (no config.yaml)")
    cfg, _ = load_config(str(out / "config.yaml"))
    ck = latest_checkpoint(out)
    if ck is None:
        raise RunError(f"{out} has no checkpoint yet (checkpoints/task_*.json); finish a task first")
    tensors, record = load_checkpoint(ck)
    dev = torch.device(device)
    _seed_everything(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    method = create_method(cfg.method, backbone).to(dev)
    method.load_state(tensors, record["method"])
    return method, cfg, record


def run_experiment(
    cfg: RunConfig,
    cfg_dict: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a class-incremental experiment and write its run directory.

    Args:
        cfg: the typed config; ``cfg_dict`` its plain form (saved as ``config.yaml``).
        out_dir: run directory.
        resume: continue after the last completed task (same config required).
        overwrite: replace an earlier run in ``out_dir``.

    Returns:
        The results dict (also in ``results.json``).
    """
    t_start = time.time()
    info = init_distributed(cfg.train.device)
    out = Path(out_dir)
    if not info.enabled:
        out.mkdir(parents=True, exist_ok=True)
        prepare_run_dir(out, cfg_dict, resume, overwrite)
    else:
        _prepare_run_dir_distributed(out, cfg_dict, resume, overwrite, info)
    file_handler = None
    if info.main:
        file_handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        _pkg_log.addHandler(file_handler)
    level = _pkg_log.level
    if not info.main:  # progress lines come from rank 0 only; other processes still report warnings
        _pkg_log.setLevel(max(logging.WARNING, _pkg_log.getEffectiveLevel()))
    try:
        results = _run(cfg, cfg_dict, out, resume, info, t_start)
    finally:
        _pkg_log.setLevel(level)
        if file_handler is not None:
            _pkg_log.removeHandler(file_handler)
            file_handler.close()
    if info.owns_group:
        # Every process got here through the same collectives, so none has a pending operation. (On an
        # error the process exits without this; torchrun then stops the others.)
        dist.destroy_process_group()
    return results


def _prepare_run_dir_distributed(
    out: Path, cfg_dict: dict[str, Any], resume: bool, overwrite: bool, info: DistInfo
) -> None:
    """Rank 0 checks and prepares the run directory; every process learns the outcome, so a refused run
    (existing results, changed config on resume) stops all of them with the same message instead of leaving
    the others waiting in a collective."""
    error: BaseException | None = None
    if info.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
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
    cfg: RunConfig, cfg_dict: dict[str, Any], out: Path, resume: bool, info: DistInfo, t_start: float
) -> dict[str, Any]:
    from . import report

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
    backbone, data, scenario, method = _build(cfg, device)
    if info.enabled and info.main:
        dist.barrier()
    if info.main:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg_dict))
        if data.split_record is not None:
            atomic_write_json(out / "split.json", data.split_record)
    n_tasks = scenario.num_tasks
    task_of_pos = torch.tensor(
        [t for t in range(n_tasks) for _ in range(len(scenario.tasks[t]))], dtype=torch.long, device=device
    )
    correct_rows: list[list[int]] = []
    totals: list[int] = []
    trainable_per_task: list[int] = []
    task_log: list[dict[str, Any]] = []
    elapsed_before = 0.0
    start_task = 0
    if resume:
        ck = latest_checkpoint(out)
        if ck is not None:
            tensors, record = load_checkpoint(ck)
            method.load_state(tensors, record["method"])
            method.to(device)
            eng = record["engine"]
            correct_rows, totals = eng["correct"], eng["totals"]
            trainable_per_task, task_log = eng["trainable_per_task"], eng["task_log"]
            elapsed_before = eng["wall_time_s"]
            start_task = record["task"] + 1
            _set_rng_state(tensors, record["rng"])
            log.info("resuming after task %d of %d from %s", start_task, n_tasks, ck)
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

    workers = cfg.data.num_workers
    train_eval = copy.copy(data.train)
    if hasattr(train_eval, "transform") and hasattr(data.test, "transform"):
        train_eval.transform = data.test.transform  # statistics use evaluation transforms

    results: dict[str, Any] = {}
    for t in range(start_task, n_tasks):
        t0 = time.time()
        start, end = scenario.task_range(t)
        train_sub = scenario.subset(data.train, data.train_targets, [t])
        stats_sub = scenario.subset(train_eval, data.train_targets, [t])

        def statistics_batches(stats_sub: Dataset = stats_sub) -> Iterator[tuple[Tensor, Tensor]]:
            loader = _loader(
                stats_sub,
                None,
                tcfg.eval_batch_size,
                workers,
                device.type == "cuda",
                indices=_shard(len(stats_sub), info),
            )  # type: ignore[arg-type]
            for x, y in loader:
                yield batch_to(x, device), y.to(device)

        ctx = TaskContext(
            task=t,
            num_tasks=n_tasks,
            class_start=start,
            class_end=end,
            device=device,
            epochs=tcfg.epochs_for(t),
            statistics_batches=statistics_batches,
            all_reduce=lambda x: _all_reduce_sum(x, info),
        )
        method.begin_task(ctx)
        counts = method.parameter_counts()
        trainable_per_task.append(int(counts["trainable"]))
        train_set = SeededAugment(train_sub, base_seed=cfg.seed * 1000 + t)
        train_stats = _train_task(method, ctx, train_set, cfg, info, device, workers)
        end_report = method.end_task(ctx)
        check_ranks_agree(method, info, device, t)
        t_train = time.time() - t0
        test_sub = scenario.subset(data.test, data.test_targets, list(range(t + 1)))
        test_loader = _loader(
            test_sub, None, tcfg.eval_batch_size, workers, device.type == "cuda", indices=_shard(len(test_sub), info)
        )
        correct, total = evaluate(method, test_loader, task_of_pos, t + 1, device, tcfg, info)
        correct_rows.append(correct)
        totals = total  # totals of earlier tasks do not change
        entry = {
            "task": t,
            "classes": [start, end],
            "train_time_s": round(t_train, 3),
            "eval_time_s": round(time.time() - t0 - t_train, 3),
            **train_stats,
            "method_report": end_report,
        }
        task_log.append(entry)
        wall = elapsed_before + (time.time() - t_start)
        metrics = compute_metrics(correct_rows, totals)
        results = _results(
            cfg,
            method,
            backbone,
            data,
            scenario,
            metrics,
            trainable_per_task,
            task_log,
            wall,
            status="finished" if t == n_tasks - 1 else "running",
        )
        if info.main:
            atomic_write_json(out / "results.json", results)
            report.write_run_tables(out, results)
            log.info(
                "task %d/%d | classes %d-%d | acc on %d seen classes %.2f%% | per task %s | %.1fs",
                t + 1,
                n_tasks,
                start,
                end - 1,
                end,
                metrics["acc_after_task"][-1],
                " ".join(f"{v:.1f}" for v in metrics["accuracy_matrix"][-1][: t + 1]),
                t_train,
            )
            if tcfg.checkpoint:
                engine_state = {
                    "correct": correct_rows,
                    "totals": totals,
                    "trainable_per_task": trainable_per_task,
                    "task_log": task_log,
                    "wall_time_s": wall,
                }
                save_checkpoint(out, t, method, engine_state, keep=None)
        if info.enabled:
            dist.barrier()
    if not results:  # resumed a finished run
        results = read_json(out / "results.json")
    elif info.main:
        report.plot_run(out, results)
    return results


def _results(
    cfg: RunConfig,
    method: Method,
    backbone: Any,
    data: Any,
    scenario: Any,
    metrics: dict[str, Any],
    trainable_per_task: list[int],
    task_log: list[dict[str, Any]],
    wall: float,
    status: str,
) -> dict[str, Any]:
    counts = method.parameter_counts()
    return {
        "status": status,
        "name": cfg.name,
        "method": cfg.method.name,
        "protocol": method.protocol,
        "backbone": backbone.info(),
        "dataset": data.info,
        "seed": cfg.seed,
        "class_order": list(scenario.class_order),
        "tasks": [list(t) for t in scenario.tasks],
        "num_tasks": scenario.num_tasks,
        "completed_tasks": len(metrics["acc_after_task"]),
        **metrics,
        "trainable_params_per_task": trainable_per_task,
        "stored_params_total": int(counts["stored"]),
        "task_log": task_log,
        "wall_time_s": round(wall, 3),
        "reference": dict(cfg.reference),
        "sdlora_version": __version__,
    }
