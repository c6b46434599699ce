"""The run directory on disk: its status, preparing it, checkpoints, RNG state, rebuilding a run's method.

A run directory (``sdlora run --out DIR``) holds::

    config.yaml          the resolved config (engine, before the first task)
    split.json           the file lists of a split made here (engine; ``imagefolder`` single tree, ``emoji_r``)
    results.json         the run record, rewritten after every task (engine; :class:`sdlora.results.RunResults`)
    metrics.csv, accuracy_matrix.csv, plots/   derived tables and plots (:mod:`sdlora.report`)
    log.txt              the run's log (engine)
    checkpoints/task_NNN.{safetensors,json}    method state + engine state + RNG after each task, or after the
                         newest N with ``train.keep_checkpoints: N`` (this module)
    tracking.json        the tracked runs' ids with ``train.log_to`` (:mod:`sdlora.tracking`)
    .sdlora.lock         held while a process writes the run (:func:`run_dir_lock`)

One writer at a time: ``run``, ``--resume``, ``--overwrite`` and ``compare`` hold :func:`run_dir_lock` for the
whole run (under torchrun, rank 0 holds it for all processes), and a second process is refused naming the holder.
Everything here runs on one process (under torchrun: rank 0); the engine decides who calls it. Used by the engine,
``learn`` and every command that reads a run (``compare``, ``predict``, ``export``, ``diagnose``, ``report``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .configtools import diff, load_yaml
from .fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file, to_jsonable
from .results import RESULTS_FILE

if TYPE_CHECKING:
    from .config import RunConfig
    from .data import TextEncoder
    from .methods import Method

__all__ = [
    "CONFIG_HEADER",
    "LOCK_FILE",
    "RESUME_FREE_KEYS",
    "RunError",
    "build_method_from_run",
    "committed_checkpoint",
    "config_changes",
    "normalised_config",
    "prune_checkpoints",
    "ensure_run_dir",
    "latest_checkpoint",
    "learned_task_count",
    "load_checkpoint",
    "load_committed_checkpoint",
    "prepare_run_dir",
    "regenerate_run_files",
    "restore_rng_state",
    "rng_state",
    "run_dir_lock",
    "run_state",
    "save_checkpoint",
    "seed_everything",
    "sweep_temp_files",
    "text_encoder_for_run",
]

log = logging.getLogger(__name__)

#: Config keys that may change on ``--resume`` without changing results.
RESUME_FREE_KEYS = (
    "data.num_workers",
    "train.device",
    "train.threads",
    "train.checkpoint",
    "train.keep_checkpoints",
    "train.log_to",
)

#: The lock file of a run directory (:func:`run_dir_lock`).
LOCK_FILE = ".sdlora.lock"

#: First line of the ``config.yaml`` sdlora writes (how ``--overwrite`` tells it from a user's file).
CONFIG_HEADER = "# the resolved config of this sdlora run (written by sdlora; --overwrite replaces it)\n"

#: Names of the temporary files of ``fileio``'s atomic writes (``.<name>.<12 hex>.tmp``).
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_CHECKPOINT_FILE = re.compile(r"^task_\d{3,}\.(json|safetensors)$")
_PLOT_FILES = ("accuracy_matrix.png", "accuracy_curve.png")


class RunError(RuntimeError):
    """A run cannot start or continue (bad run directory, mismatched resume, corrupt checkpoint)."""


def ensure_run_dir(out: Path) -> None:
    """Create the run directory; a path that cannot be one (a file, a read-only place) is a :class:`RunError`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot use {out} as a run directory: {e.strerror or e}") from None
    if not out.is_dir():
        raise RunError(f"cannot use {out} as a run directory: it is not a directory")


# ------------------------------------------------------------------------------------------------ lock
def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), which tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote ``holder`` still runs (only answerable on the same host)."""
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except (KeyError, TypeError, ValueError, OSError):
        return False
    start = holder.get("start")
    return start is None or _proc_start(pid) in (None, start)


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    pid, host, command = holder.get("pid", "?"), holder.get("host", "?"), holder.get("command", "?")
    return f"process {pid} on host {host} (since {when}: {command})"


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return {"pid": "?", "host": "?", "command": f"unreadable lock file ({len(data)} bytes)"}
    return holder if isinstance(holder, dict) else None


def _in_use(out: Path, holder: dict[str, Any]) -> RunError:
    return RunError(
        f"{out} is in use by {_describe(holder)}; wait for it to finish or stop it, or choose another --out"
    )


def _acquire(path: Path) -> int:
    """Open and lock ``path``; returns the descriptor of the locked file (the one at ``path`` now)."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write to the run directory {path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or {}
            os.close(fd)
            raise _in_use(path.parent, holder) from None
        # The previous holder may have removed the file between our open and our lock: lock the file that is at
        # ``path`` now, not an unlinked one.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire_exclusive(path: Path, host: str) -> int:  # pragma: no cover - platforms without fcntl (Windows)
    """Create ``path`` with ``O_EXCL``; a file left by a dead process of this host is removed first."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == host and not _alive(holder):
                log.warning("%s: taking over the lock of %s, which no longer runs", path.parent, _describe(holder))
                path.unlink(missing_ok=True)
                continue
            raise _in_use(path.parent, holder) from None
        except OSError as e:
            raise RunError(f"cannot write to the run directory {path.parent}: {e.strerror or e}") from None


@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of run directory ``out`` (created if needed) for the duration of the ``with`` block.

    The lock is ``out/.sdlora.lock``, locked with ``fcntl.flock`` (the kernel releases it when the process dies,
    even by ``kill -9``) and holding the holder's pid, host, process start time and command line, so a refused
    process can name the holder. A lock file left behind by a process that no longer runs on this host is taken
    over with a warning; one written on another host is refused, since that process cannot be checked from here
    (the message says to delete the file if no run is going there). Without ``fcntl`` (Windows) the file is
    created with ``O_EXCL`` and the pid check alone decides.

    Raises:
        RunError: another process holds the lock, or the directory cannot be written.
    """
    ensure_run_dir(out)
    path = out / LOCK_FILE
    host = socket.gethostname()
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        fd = _acquire_exclusive(path, host)
    else:
        fd = _acquire(path)
    try:
        holder = _read_holder(fd)
        if holder:  # left by a process that did not release it (killed), or one this host cannot see
            if holder.get("host") != host:
                raise RunError(
                    f"{out} is locked by {_describe(holder)}, which sdlora cannot check from here; if no run is "
                    f"going there, delete {path}"
                )
            if _alive(holder):  # alive without holding the flock: a filesystem without flock, another namespace
                raise RunError(
                    f"{out} is locked by {_describe(holder)}, which still runs; wait for it or stop it (if it does "
                    f"not write this run, delete {path})"
                )
            log.warning("%s: taking over the lock of %s, which no longer runs", out, _describe(holder))
        me = {
            "pid": os.getpid(),
            "host": host,
            "start": _proc_start(os.getpid()),
            "started": round(time.time(), 3),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        # Remove the file while still holding it (a process waiting on the old file then sees a new inode and
        # retries), then release.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        os.close(fd)


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
    """Keys whose value saved in ``out/config.yaml`` differs from ``cfg_dict`` (``RESUME_FREE_KEYS`` excepted).

    The saved config is read as the current version reads a config (:func:`normalised_config`), so a key added
    to sdlora after the run was written counts as its default, not as a change."""
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return [f"{saved_path} is missing"]
    saved = normalised_config(load_yaml(saved_path))
    return [d for d in diff(saved, cfg_dict) if not d.split(":")[0].startswith(RESUME_FREE_KEYS)]


def normalised_config(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` through the typed config and the method's options (defaults filled in for keys it lacks), as
    ``run_experiment`` derives the ``config.yaml`` it saves; ``data`` unchanged when it is not a whole run config
    (every top-level section) or no longer parses (an unknown or mistyped key then shows in the diff). The
    exceptions: a saved ``method.calib`` that the registry entry's settings would change stays as saved (see the
    comment), and a method option the saved config lacks gets the value the run used, where it differs from
    today's default (``methods.with_legacy_options``)."""
    from dataclasses import fields

    from .config import RunConfig
    from .configtools import ConfigError, from_dict, to_dict
    from .methods.options import resolve_method_config, with_legacy_options

    if set(data) != {f.name for f in fields(RunConfig)}:
        return data
    data = with_legacy_options(data)
    try:
        cfg = from_dict(RunConfig, data)
        written = cfg.method.calib
        resolve_method_config(cfg)
    except (ConfigError, TypeError, ValueError):
        return data
    if cfg.method.calib != written:
        # A calibrated registry entry (sdlora_calib) whose config was saved before the entry's settings were
        # written into it (this version's are, and resolving them again changes nothing): what head it used
        # depends on the version that ran it, so keep the saved keys and let the difference show (resume and
        # compare refuse it with the diff). Alignment entries (sdlora_ca) are normalised: their setting is one
        # flag whose meaning has not changed.
        cfg.method.calib = written
    return cast("dict[str, Any]", to_dict(cfg))


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline()


def _json_dict(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_sdlora_config(path: Path) -> bool:
    if _first_line(path) == CONFIG_HEADER:
        return True
    # Written before the header existed: sdlora writes the whole resolved config, every top-level section.
    from dataclasses import fields

    from .config import RunConfig

    try:
        data = load_yaml(path)
    except Exception:
        return False
    return set(data) == {f.name for f in fields(RunConfig)}


#: How ``--overwrite`` recognises each file sdlora writes at the top of a run directory.
_OWN_FILES = {
    RESULTS_FILE: lambda p: bool({"status", "sdlora_version"} & set(_json_dict(p))),
    "split.json": lambda p: {"dataset", "seed", "train", "test"} <= set(_json_dict(p)),
    "metrics.csv": lambda p: _first_line(p).startswith("task,new_classes,classes_seen,"),
    "accuracy_matrix.csv": lambda p: _first_line(p).startswith("after_task"),
    "log.txt": lambda p: re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", _first_line(p)) is not None,
    "config.yaml": _is_sdlora_config,
}


def _own_files(out: Path) -> tuple[list[Path], list[Path]]:
    """(files sdlora wrote into ``out``, files under sdlora's names that it did not write)."""
    own: list[Path] = []
    foreign: list[Path] = []
    for name, is_own in _OWN_FILES.items():
        p = out / name
        if p.is_file():
            # An empty file loses nothing (a run's log.txt stays empty when nothing was logged at INFO).
            (own if p.stat().st_size == 0 or is_own(p) else foreign).append(p)
        elif p.exists():
            foreign.append(p)
    ckdir = out / "checkpoints"
    if ckdir.is_dir():
        own += [p for p in ckdir.iterdir() if p.is_file() and _CHECKPOINT_FILE.match(p.name)]
    own += [out / "plots" / n for n in _PLOT_FILES if (out / "plots" / n).is_file()]
    return own, foreign


def sweep_temp_files(out: Path) -> list[Path]:
    """Remove the temporary files of atomic writes that a killed process left in ``out``, ``out/checkpoints`` and
    ``out/plots`` (``.<name>.<12 hex>.tmp``: never read, since the rename that publishes a file never happened).
    Call it only while holding :func:`run_dir_lock`. Returns the removed paths."""
    removed = []
    for d in (out, out / "checkpoints", out / "plots"):
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and _TEMP_FILE.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes in %s", len(removed), out)
    return removed


def prepare_run_dir(out: Path, cfg_dict: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse to write over earlier results unless asked; on resume, refuse a changed config. Call it while holding
    :func:`run_dir_lock`.

    ``--overwrite`` removes only what sdlora wrote (recognised by name and content: ``results.json``,
    ``config.yaml``, the CSV tables, ``log.txt``, ``split.json``, ``checkpoints/task_NNN.*``, the two run plots)
    and leaves every other file; a file under one of sdlora's names that sdlora did not write stops it (it would be
    overwritten). Resume and overwrite also sweep the temporary files of interrupted writes.

    Raises:
        RunError: the directory holds a run and neither ``--resume`` nor ``--overwrite`` was given, the resumed
            config differs (the message lists the keys), or ``--overwrite`` would replace a file sdlora did not write.
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
        learned = learned_task_count(out)
        if learned:
            raise RunError(
                f"{out} holds {learned} task(s) added by sdlora learn; --resume rebuilds a run from its config's "
                "scenario and would drop them. The run is finished: sdlora report rewrites its tables and plots, "
                "sdlora learn adds more classes (to start over, use --overwrite or another --out)"
            )
        changes = config_changes(out, cfg_dict)
        if changes:
            raise RunError(
                f"cannot resume with a different config; these keys differ from {out / 'config.yaml'}:\n  "
                + "\n  ".join(changes)
            )
    if (resume or overwrite) and out.is_dir():
        sweep_temp_files(out)
    if overwrite and state != "empty":
        own, foreign = _own_files(out)
        if foreign:
            raise RunError(
                f"--overwrite would replace files that sdlora did not write: {', '.join(map(str, foreign))}; move "
                "them away (sdlora writes its own files under these names) or choose another --out"
            )
        for p in own:
            p.unlink(missing_ok=True)
        for d in (out / "checkpoints", out / "plots"):
            with contextlib.suppress(OSError):  # kept when it holds files sdlora did not write
                d.rmdir()
        kept = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if kept:
            log.info("--overwrite kept what sdlora did not write in %s: %s", out, ", ".join(kept))


def regenerate_run_files(run_dir: str | os.PathLike) -> bool:
    """Rewrite a run's tables and plots from its ``results.json`` while holding its lock (``sdlora report``).

    ``results.json`` is read again under the lock, so a run that a live process writes is not given tables older
    than its record. A run in use by another process (which keeps its own tables current) or one that cannot be
    written (a read-only archive) is left as it is, with a warning. Returns whether the files were rewritten.
    """
    from .report import plot_run, write_run_tables
    from .results import load_results

    out = Path(run_dir)
    try:
        with run_dir_lock(out):
            results = load_results(out)
            write_run_tables(out, results)
            plot_run(out, results)
    except (RunError, OSError) as e:
        log.warning("%s: tables and plots not rewritten: %s", out, e)
        return False
    return True


def learned_task_count(out: Path) -> int:
    """How many tasks ``sdlora learn`` added to the run in ``out``: the ``learned_tasks`` of its ``results.json``,
    or, when that record is missing or unreadable, whether its newest checkpoint is a learned one (its record holds
    ``learned``)."""
    record = _json_dict(out / RESULTS_FILE)
    if record:
        learned = record.get("learned_tasks")
        return len(learned) if isinstance(learned, list) else 0
    ck = latest_checkpoint(out)  # no or unreadable record: the checkpoints tell
    if ck is None:
        return 0
    return 1 if "learned" in _json_dict(ck) else 0


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
def _record_digest(record: dict[str, Any]) -> str:
    """sha256 of a checkpoint record without its own ``record_sha256`` (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(to_jsonable(body), sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(
    out: Path,
    task: int,
    method: Method,
    engine_state: dict[str, Any],
    data_identity: dict[str, Any] | None = None,
    learned: dict[str, Any] | None = None,
) -> None:
    """Write ``checkpoints/task_NNN.{safetensors,json}`` atomically; the JSON (written last, with the
    tensors' sha256) is the commit marker, so a run killed while writing leaves the previous one valid.

    The JSON also holds its own sha256 (``record_sha256``, over the rest of the record), so an edited or damaged
    record is refused on load rather than resumed with a wrong accuracy matrix.

    Args:
        out: run directory.
        task: the 0-based task just finished.
        method: its ``state()`` is saved.
        engine_state: the engine's JSON-able state (``RunState.to_checkpoint()``), stored under ``engine``.
        data_identity: the run's ``data_identity`` (what ``--resume`` compares the data with).
        learned: for a task ``sdlora learn`` added, its ``learned_tasks`` entry (folder, class names, the identity
            of the folder's data): such a checkpoint is not one of the config's scenario, and ``--resume`` refuses
            it (:func:`learned_task_count`).
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
    record: dict[str, Any] = {
        "task": task,
        "method": meta,
        "engine": engine_state,
        "rng": rng_meta,
        "tensors_sha256": sha256_file(stem.with_suffix(".safetensors")),
        "sdlora_version": __version__,
    }
    if data_identity is not None:
        record["data_identity"] = data_identity
    if learned is not None:
        record["learned"] = learned
    record = to_jsonable(record)
    record["record_sha256"] = _record_digest(record)
    atomic_write_json(stem.with_suffix(".json"), record)


def prune_checkpoints(out: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` committed checkpoints (``train.keep_checkpoints``; None: keep all).

    Call it after ``results.json`` commits a task, never between a checkpoint and its commit: only checkpoints of
    tasks the record counts are candidates, and the newest of them (the one :func:`committed_checkpoint` returns,
    what ``--resume``, ``predict``, ``learn`` and ``export`` read) is always among those kept, so a process killed
    at any point leaves a loadable run. A checkpoint of an uncommitted task (a killed ``learn``) is left alone.
    Returns the removed JSON records.
    """
    if keep is None:
        return []
    # No readable record: nothing is known to be committed, so nothing may go.
    committed = [p for p in _committed_records(out) or [] if _checkpoint_task(p) >= 0]
    removed = committed[: max(len(committed) - keep, 0)]
    for old in removed:
        # The record first: a kill between the two deletions leaves tensors without a record, which nothing reads
        # (and the sweep below removes next time).
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    kept = committed[len(removed) :]
    if kept:
        oldest_kept = _checkpoint_task(kept[0])
        for orphan in (out / "checkpoints").glob("task_*.safetensors"):
            if 0 <= _checkpoint_task(orphan) < oldest_kept and not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
    if removed:
        log.info("train.keep_checkpoints=%d: removed %s", keep, ", ".join(p.stem for p in removed))
    return removed


def latest_checkpoint(out: Path) -> Path | None:
    """The newest committed checkpoint (its JSON exists), or None."""
    done = _checkpoint_records(out)
    return done[-1] if done else None


def _schema_problem(record: Any, path: Path) -> str | None:
    """What is wrong with the shape of a checkpoint record (None: nothing)."""
    if not isinstance(record, dict):
        return f"the record is a {type(record).__name__}, not a mapping"
    expect = {"task": int, "method": dict, "engine": dict, "rng": dict, "tensors_sha256": str}
    for key, kind in expect.items():
        if not isinstance(record.get(key), kind) or (kind is int and isinstance(record.get(key), bool)):
            return f"'{key}' is missing or not a {kind.__name__}"
    m = re.match(r"^task_(\d+)$", path.stem)
    if m and int(m.group(1)) != record["task"]:
        return f"it says task {record['task'] + 1} but its name is {path.name}"
    rng = record["rng"]
    if not (isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5 and isinstance(rng.get("python"), list)):
        return "'rng' does not hold the numpy and Python generator states"
    return None


def committed_checkpoint(out: Path) -> Path | None:
    """The checkpoint that ``results.json`` describes: the newest one whose task the record counts as completed.

    ``sdlora run`` and ``sdlora learn`` both write a task's checkpoint before ``results.json`` (the commit point);
    a process killed in between leaves a checkpoint of a task the record does not have, which must not be loaded
    (its classes have no names, its row no place in the matrix): every reader of a run and ``--resume`` use this
    function, so all of them see the same task. Without a readable ``results.json`` it is the newest checkpoint
    (what ``--resume`` rebuilds a lost record from; :func:`build_method_from_run` refuses such a run).
    """
    committed = _committed_records(out)
    if committed is None:  # no or unreadable record: nothing to check against
        done = _checkpoint_records(out)
        return done[-1] if done else None
    return committed[-1] if committed else None


def _committed_records(out: Path) -> list[Path] | None:
    """The checkpoint records of the tasks ``results.json`` counts as completed, in task order; None without a
    readable ``results.json``."""
    try:
        completed = int(read_json(out / RESULTS_FILE)["completed_tasks"])
    except Exception:
        return None
    return [p for p in _checkpoint_records(out) if _checkpoint_task(p) < completed]


def _checkpoint_records(out: Path) -> list[Path]:
    """``out/checkpoints/task_*.json`` in task order (by number: ``task_1000`` after ``task_999``)."""
    ckdir = out / "checkpoints"
    return sorted(ckdir.glob("task_*.json"), key=_checkpoint_task) if ckdir.is_dir() else []


def _checkpoint_task(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: ``(tensors, record)`` with the record as :func:`save_checkpoint` wrote it.

    Raises:
        RunError: missing tensors file, corrupt or edited JSON (not JSON, a wrong shape, or content that does not
            match its recorded sha256), or tensors that do not match theirs. The message says to delete the
            checkpoint to resume from the previous one, or that no older one remains.
    """
    from safetensors.torch import load_file

    def advice() -> str:  # looked up only when the checkpoint is refused
        task = _checkpoint_task(path)
        if any(0 <= _checkpoint_task(p) < task for p in _checkpoint_records(path.parent.parent)):
            return f"delete {path} (and its .safetensors) to resume from the previous task"
        return (
            "no older checkpoint remains (the first task's, or train.keep_checkpoints removed them): deleting "
            f"{path} makes --resume start over from the first task, and a run with tasks added by sdlora learn "
            "cannot be continued"
        )

    try:
        record = read_json(path)
    except Exception as e:
        raise RunError(f"corrupt checkpoint {path}: {e}; {advice()}") from None
    problem = _schema_problem(record, path)
    if problem is None and not isinstance(record.get("record_sha256"), str):
        # Every record sdlora writes carries its own digest; one without it cannot be told from an edited one.
        problem = (
            "it has no 'record_sha256' (sdlora writes one into every checkpoint record: this one was edited, or "
            "written by a development version before records carried it), so its content cannot be checked"
        )
    if problem is None and record["record_sha256"] != _record_digest(record):
        problem = "its content does not match its recorded sha256 (edited or damaged after it was written)"
    if problem is not None:
        raise RunError(f"corrupt checkpoint {path}: {problem}; {advice()}")
    tpath = path.with_suffix(".safetensors")
    if not tpath.exists():
        raise RunError(f"checkpoint {path} has no tensors file {tpath}; {advice()}")
    if sha256_file(tpath) != record.get("tensors_sha256"):
        raise RunError(f"checkpoint {tpath} does not match its recorded sha256 (damaged); {advice()}")
    return load_file(str(tpath)), record


def load_committed_checkpoint(out: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any]] | None:
    """:func:`committed_checkpoint` and :func:`load_checkpoint` for a reader that does not hold the run's lock
    (``predict``, ``export``, ``diagnose``): ``(path, tensors, record)``, or None without a checkpoint.

    A run that is still training with ``train.keep_checkpoints`` may remove the chosen checkpoint between the two
    steps (after committing a newer one): the lookup is then made once more rather than the vanished file reported
    as damaged.
    """
    ck = committed_checkpoint(out)
    if ck is None:
        return None
    try:
        return (ck, *load_checkpoint(ck))
    except RunError:
        if ck.exists():  # damaged, not pruned: the error says what to do
            raise
        again = committed_checkpoint(out)
        if again is None or again == ck:
            raise
        return (again, *load_checkpoint(again))


# ------------------------------------------------------------------------------------- rebuild a method
def build_method_from_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[Method, RunConfig, dict[str, Any]]:
    """Rebuild a run's method from its ``config.yaml`` and the checkpoint its ``results.json`` commits to
    (:func:`committed_checkpoint`; for export, inspection, prediction). A run without ``results.json`` is refused.

    Returns:
        ``(method, cfg, record)``: the method with the checkpoint's state on ``device``, the run's config and the
        checkpoint record (``record["task"]`` is the last finished task, 0-based).

    Raises:
        RunError: not a run directory, or no checkpoint yet.
    """
    from .backbones import create_backbone
    from .methods import create_method, load_run_config

    out = Path(run_dir)
    if not (out / "config.yaml").exists():
        raise RunError(f"{out} is not a run directory (no config.yaml)")
    if not (out / RESULTS_FILE).is_file():
        # results.json commits the checkpoints (both run and learn write it after the checkpoint): without it no
        # task is known to be complete, and class names and tasks are unknown.
        raise RunError(
            f"{out} has no {RESULTS_FILE} (killed before its first task was recorded, or the file was lost); "
            f"sdlora run CONFIG --out {out} --resume rebuilds it from the checkpoints"
        )
    cfg, _ = load_run_config(str(out / "config.yaml"), saved_run=True)
    loaded = load_committed_checkpoint(out)
    if loaded is None:
        raise RunError(f"{out} has no checkpoint yet (checkpoints/task_*.json); finish a task first")
    _, tensors, record = loaded
    seed_everything(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    method = create_method(cfg.method, backbone).to(torch.device(device))
    method.load_state(tensors, record["method"])
    return method, cfg, record


def text_encoder_for_run(cfg: RunConfig) -> TextEncoder:
    """The tokenisation a text run trained with, for new strings: its backbone's tokenizer (loaded without the model)
    and its ``data.max_length``. ``encoder(["a text", ...])`` returns the model-input batch (a dict of tensors).

    Args:
        cfg: the run's config (``build_method_from_run(run_dir)[1]``, or
            ``load_run_config(run_dir / "config.yaml")[0]``).

    Raises:
        ValueError: the run's backbone is not a Hugging Face text backbone.
    """
    from .backbones.hf import load_tokenizer
    from .data import TextEncoder

    return TextEncoder(load_tokenizer(cfg.backbone), cfg.data.max_length)
