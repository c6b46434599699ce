"""The shell scripts of scripts/ (what the README's two commands run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="setup.sh targets Linux (df -P, bash)")


def _fake_venv(tmp_path: Path) -> Path:
    """A venv whose python hashes files as the real one does but refuses to run pip (exit 99)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$1" in -m) echo "pip was started" >&2; exit 99;; esac\nexec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    return venv


def _setup(venv: Path, min_free: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDLORA_VENV": str(venv), "SDLORA_SETUP_MIN_FREE_GIB": min_free}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120
    )


def test_setup_refuses_before_installing_when_the_disk_is_short(tmp_path):
    venv = _fake_venv(tmp_path)
    proc = _setup(venv, str(10**9))
    assert proc.returncode == 1, proc.stderr
    assert "GiB free on the disk of" in proc.stderr and "SDLORA_SETUP_MIN_FREE_GIB" in proc.stderr
    assert "pip was started" not in proc.stderr
    assert not (venv / ".sdlora-setup").exists()  # nothing recorded as installed


@pytest.mark.parametrize("case", ["threshold 0", "torch already there"])
def test_setup_goes_on_to_pip_when_the_check_does_not_apply(tmp_path, case):
    venv = _fake_venv(tmp_path)
    if case == "torch already there":  # a set-up venv being updated: no first-install check
        (venv / "lib" / "python3.11" / "site-packages" / "torch").mkdir(parents=True)
    proc = _setup(venv, "0" if case == "threshold 0" else str(10**9))
    assert proc.returncode == 99 and "pip was started" in proc.stderr, proc.stderr


def test_setup_rejects_a_threshold_that_is_not_a_number(tmp_path):
    proc = _setup(_fake_venv(tmp_path), "9.5")
    assert proc.returncode == 2 and "must be a whole number of GiB, got '9.5'" in proc.stderr
