"""The run directory: status, refusing to overwrite, checkpoints (commit marker, damage), RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sdlora.fileio import atomic_write_json
from sdlora.rundir import (
    RunError,
    committed_checkpoint,
    config_changes,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    restore_rng_state,
    rng_state,
    run_state,
    save_checkpoint,
)


class _Tiny:
    """The part of a Method that checkpoints use."""

    def __init__(self, value: float) -> None:
        self.w = torch.full((2, 3), value)

    def state(self):
        return {"w": self.w.clone()}, {"method": "tiny"}


def test_status_and_prepare(tmp_path):
    out = tmp_path / "run"
    assert run_state(out) == "empty"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\ntrain: {device: cpu, lr: 0.1}\n")
    assert run_state(out) == "unfinished"
    atomic_write_json(out / "results.json", {"status": "finished"})
    assert run_state(out) == "finished"
    saved = {"seed": 1, "train": {"device": "cpu", "lr": 0.1}}
    with pytest.raises(RunError, match="already holds a finished run"):
        prepare_run_dir(out, saved, resume=False, overwrite=False)
    with pytest.raises(RunError, match=r"train\.lr"):
        prepare_run_dir(out, {"seed": 1, "train": {"device": "cpu", "lr": 0.2}}, resume=True, overwrite=False)
    assert config_changes(out, {"seed": 1, "train": {"device": "cuda", "lr": 0.1}}) == []  # a resume-free key
    prepare_run_dir(out, saved, resume=True, overwrite=False)  # the same config resumes
    prepare_run_dir(out, {"seed": 2}, resume=False, overwrite=True)
    assert run_state(out) == "empty" and not (out / "results.json").exists()


def test_checkpoints_commit_and_detect_damage(tmp_path):
    for task in range(3):
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {"next": task + 1}, keep=2)
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "task_002.json"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "task_001.json",
        "task_001.safetensors",
        "task_002.json",
        "task_002.safetensors",
    ]
    tensors, record = load_checkpoint(ck)
    assert torch.equal(tensors["w"], torch.full((2, 3), 2.0)) and "rng.torch" in tensors
    assert record["task"] == 2 and record["engine"] == {"next": 3} and record["method"] == {"method": "tiny"}
    blob = ck.with_suffix(".safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(RunError, match="sha256"):
        load_checkpoint(ck)
    ck.write_text("{")
    with pytest.raises(RunError, match="corrupt checkpoint"):
        load_checkpoint(ck)


def test_committed_checkpoint_is_the_one_results_json_describes(tmp_path):
    """A checkpoint newer than the record (a ``sdlora learn`` killed before its commit) is not loaded."""
    assert committed_checkpoint(tmp_path) is None
    for task in range(3):
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {}, keep=None)
    assert committed_checkpoint(tmp_path).name == "task_002.json"  # no record: the newest
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 2})
    assert committed_checkpoint(tmp_path).name == "task_001.json"
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 3})
    assert committed_checkpoint(tmp_path) == latest_checkpoint(tmp_path)
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 0})
    assert committed_checkpoint(tmp_path) is None


def test_rng_state_roundtrip():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    tensors, meta = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
