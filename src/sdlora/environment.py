"""What a run ran on: the interpreter, the versions of the packages that decide its numbers, the accelerator, and
sdlora's own version and git commit.

Recorded in every ``results.json`` (``environment``) and shown by ``sdlora report``; ``--resume`` warns when the
environment differs from the one the run was started in (pretrained-weight and library drift change reported
accuracies, so a reader must be able to tell). Reads only; imports only the standard library and torch.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["PACKAGES", "capture_environment", "environment_changes", "continue_environments", "short_environment"]

#: The packages whose versions are recorded, in this order.
PACKAGES: tuple[str, ...] = ("torch", "timm", "transformers", "peft", "numpy")

_SHORT = {"transformers": "tf"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout sdlora runs from, or (None, None) for an installed copy or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None, None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # Tracked files only: a run directory or a venv inside the checkout does not make it dirty.
        dirty = (
            subprocess.run(
                ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=10
            ).returncode
            != 0
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head or None, dirty


def capture_environment(device: torch.device | None = None) -> dict[str, Any]:
    """The environment of this process, as recorded in ``results.json``.

    Keys: ``python``, ``platform``, one per :data:`PACKAGES` (None when not installed), ``cuda`` (torch's CUDA
    build, None for a CPU build), ``device`` (``cpu``, or the CUDA device's name for a ``cuda`` device),
    ``sdlora``, ``git_commit`` and ``git_dirty`` (None outside a git checkout).
    """
    from . import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine().lower()}",
    }
    for name in PACKAGES:
        env[name] = _version(name)
    env["torch"] = torch.__version__  # with its build tag (2.14.1+cu130): CPU and CUDA builds differ numerically
    env["cuda"] = torch.version.cuda
    if device is not None and device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = device.type if device is not None else "cpu"
    env["sdlora"] = __version__
    env["git_commit"], env["git_dirty"] = _git_commit()
    return env


def environment_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every recorded key whose value differs (keys missing on one side included)."""
    keys = list(old) + [k for k in new if k not in old]
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


def continue_environments(
    recorded: dict[str, Any], earlier: list[dict[str, Any]], current: dict[str, Any], completed_tasks: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """A run continues (``--resume``, ``learn``) in ``current`` after being recorded in ``recorded``.

    Returns:
        The new ``earlier_environments`` (``earlier`` plus ``recorded`` with ``until_task=completed_tasks`` when it
        differs from ``current``; unchanged when they agree or nothing was recorded) and the differences as
        :func:`environment_changes` lines, for a warning. ``git_dirty`` alone does not count as a change.
    """
    if not recorded:
        return list(earlier), []
    changes = [c for c in environment_changes(recorded, current) if not c.startswith("git_dirty:")]
    if not changes:
        return list(earlier), []
    return [*earlier, {**recorded, "until_task": completed_tasks}], changes


def short_environment(env: dict[str, Any]) -> str:
    """One cell for a report table: ``py3.11.7 torch 2.14.1 timm 1.0.31 tf 5.25.0 peft 0.21.2 numpy 2.4.6 cpu``."""
    if not env:
        return "n/a"
    parts = [f"py{env.get('python')}"]
    parts += [f"{_SHORT.get(p, p)} {env[p]}" for p in PACKAGES if env.get(p)]
    parts.append(str(env.get("device", "?")))
    return " ".join(parts)
