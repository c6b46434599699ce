"""The run directory on disk: its status, preparing it, checkpoints, RNG state, rebuilding a run's method.

A run directory (``sdlora run --out DIR``) holds::

    config.yaml          the resolved config (engine, before the first task)
    split.json           the file lists of a split made here (engine; ``imagefolder`` single tree only)
    results.json         the run record, rewritten after every task (engine; :class:`sdlora.results.RunResults`)
    metrics.csv, accuracy_matrix.csv, plots/   derived tables and plots (:mod:`sdlora.report`)
    log.txt              the run's log (engine)
    checkpoints/task_NNN.{safetensors,json}    method state + engine state + RNG after each task (this module)

Everything here runs on one process (under torchrun: rank 0); the engine decides who calls it. Used by
``engine``, ``compare`` and ``cli export``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .configtools import diff, load_yaml
from .fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from .results import RESULTS_FILE

if TYPE_CHECKING:
    from .config import RunConfig
    from .methods import Method

__all__ = [
    "RESUME_FREE_KEYS",
    "RunError",
    "build_method_from_run",
    "committed_checkpoint",
    "config_changes",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_run_dir",
    "restore_rng_state",
    "rng_state",
    "run_state",
    "save_checkpoint",
    "seed_everything",
]

log = logging.getLogger(__name__)

#: Config keys that may change on ``--resume`` without changing results.
RESUME_FREE_KEYS = ("data.num_workers", "train.device", "train.threads", "train.checkpoint")

#: Files of a run that ``--overwrite`` removes (with ``checkpoints/`` and ``plots/``).
_RUN_ARTIFACTS = (RESULTS_FILE, "metrics.csv", "accuracy_matrix.csv", "config.yaml", "log.txt", "split.json")


class RunError(RuntimeError):
    """A run cannot start or continue (bad run directory, mismatched resume, corrupt checkpoint)."""


# ---------------------------------------------------------------------------------------------- status
def run_state(out: Path) -> str:
    """``empty``, ``finished`` or ``unfinished`` (something of an earlier run is there)."""
    results = out / RESULTS_FILE
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


# ------------------------------------------------------------------------------------------------ RNG
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (parameter initialisation draws from these)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The global RNG states: torch (and CUDA) as tensors, numpy and Python as JSON-able data."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Undo :func:`rng_state` (a CUDA state is restored only where CUDA is available)."""
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, task: int, method: Method, engine_state: dict[str, Any], keep: int | None) -> None:
    """Write ``checkpoints/task_NNN.{safetensors,json}`` atomically; the JSON (written last, with the
    tensors' sha256) is the commit marker, so a run killed while writing leaves the previous one valid.

    Args:
        out: run directory.
        task: the 0-based task just finished.
        method: its ``state()`` is saved.
        engine_state: the engine's JSON-able state (``RunState.to_checkpoint()``), stored under ``engine``.
        keep: keep only the newest ``keep`` checkpoints (None: all).
    """
    from safetensors.torch import save

    tensors, meta = method.state()
    rng_t, rng_meta = rng_state()
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


def committed_checkpoint(out: Path) -> Path | None:
    """The checkpoint that ``results.json`` describes: the newest one whose task the record counts as completed.

    ``sdlora learn`` writes its checkpoint before ``results.json`` (the commit point of a learn); a learn killed in
    between leaves a checkpoint of a task the record does not have, which must not be loaded (its classes have no
    names, its row no place in the matrix). The engine writes ``results.json`` before each checkpoint, so for a
    run it made this is :func:`latest_checkpoint`. Without a readable ``results.json`` it is the newest checkpoint.
    """
    done = sorted((out / "checkpoints").glob("task_*.json")) if (out / "checkpoints").exists() else []
    try:
        completed = int(read_json(out / RESULTS_FILE)["completed_tasks"])
    except Exception:  # no or unreadable record: nothing to check against
        return done[-1] if done else None
    committed = [p for p in done if _checkpoint_task(p) < completed]
    return committed[-1] if committed else None


def _checkpoint_task(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: ``(tensors, record)`` with the record as :func:`save_checkpoint` wrote it.

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


# ------------------------------------------------------------------------------------- rebuild a method
def build_method_from_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[Method, RunConfig, dict[str, Any]]:
    """Rebuild a run's method from its ``config.yaml`` and newest committed checkpoint (:func:`committed_checkpoint`;
    for export, inspection, prediction).

    Returns:
        ``(method, cfg, record)``: the method with the checkpoint's state on ``device``, the run's config and the
        checkpoint record (``record["task"]`` is the last finished task, 0-based).

    Raises:
        RunError: not a run directory, or no checkpoint yet.
    """
    from .backbones import create_backbone
    from .config import load_config
    from .methods import create_method

    out = Path(run_dir)
    if not (out / "config.yaml").exists():
        raise RunError(f"{out} is not a run directory (no config.yaml)")
    cfg, _ = load_config(str(out / "config.yaml"))
    ck = committed_checkpoint(out)
    if ck is None:
        raise RunError(f"{out} has no checkpoint yet (checkpoints/task_*.json); finish a task first")
    tensors, record = load_checkpoint(ck)
    seed_everything(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    method = create_method(cfg.method, backbone).to(torch.device(device))
    method.load_state(tensors, record["method"])
    return method, cfg, record
