"""The shell scripts of scripts/ (what the README's two commands run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.skipif(sys.platform != "linux", reason="setup.sh targets Linux (df -P, bash)")
def test_setup_refuses_before_installing_when_the_disk_is_short(tmp_path):
    venv = _fake_venv(tmp_path)
    env = {**os.environ, "SDLORA_VENV": str(venv), "SDLORA_SETUP_MIN_FREE_GIB": str(10**9)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "GiB free on the disk of" in proc.stderr and "SDLORA_SETUP_MIN_FREE_GIB" in proc.stderr
    assert "pip was started" not in proc.stderr
    assert not (venv / ".sdlora-setup").exists()  # nothing recorded as installed
