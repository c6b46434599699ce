"""Processes under torchrun: the process layout, the device each process uses, the collectives the engine needs
(sums, the check that every process holds the same method state) and DDP's settings.

A single process (no ``WORLD_SIZE`` > 1) is the default: every collective here is then a no-op.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .methods import Method
from .rundir import RunError

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "check_ranks_agree",
    "comm_device",
    "ddp_kwargs",
    "global_len",
    "init_distributed",
    "select_device",
    "state_fingerprint",
]


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
    """The device of ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for this process."""
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


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """``t`` summed over processes, in place (unchanged with one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def comm_device(device: torch.device) -> torch.device:
    """Where small tensors for collectives live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


def ddp_kwargs() -> dict[str, Any]:
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
        device=comm_device(device),
    )
    both = torch.cat([h, -h])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[:4], -both[4:]):
        raise RunError(
            f"after task {task + 1} the {info.world} processes hold different model states (rank {info.rank}: "
            f"{digest.hex()[:16]}); something in training or end_task is not deterministic across processes"
        )


def global_len(n_local: int, info: DistInfo, device: torch.device) -> float:
    """``n_local`` summed over processes (the global batch size of a step)."""
    t = torch.tensor([n_local], dtype=torch.float64, device=comm_device(device))
    all_reduce_sum(t, info)
    return float(t.item())
