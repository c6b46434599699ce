"""A process killed at any write of ``run``, ``learn`` or ``export`` leaves a run every command reads alike.

Every file sdlora writes is published by the ``os.replace`` of an atomic write (``fileio``), so "killed at write k"
is simulated by raising ``KeyboardInterrupt`` in the k-th ``os.replace``: the new content never appears, as after a
``kill -9`` there. After each kill the run must read as one task with one model (the checkpoint ``results.json``
commits to: the model the reference run had after that task, bit for bit), and continuing (``--resume``, the same
``learn``, the same ``export``) must end where an uninterrupted process ends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine_helpers import tiny_config, write_config
from sdlora.cli import main
from sdlora.export import export_peft
from sdlora.learn import learn
from sdlora.predict import load_run
from sdlora.rundir import RunError, build_method_from_run, load_checkpoint
from test_learn import ALL, _folder

_REAL_REPLACE = os.replace


class _KillAt:
    """``os.replace`` that 'kills the process' (raises KeyboardInterrupt) at its ``k``-th call (counting from 0)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0

    def __call__(self, src, dst) -> None:
        if self.calls == self.k:
            self.calls += 1
            raise KeyboardInterrupt(f"killed at write {self.k}: {dst}")
        self.calls += 1
        _REAL_REPLACE(src, dst)


def _config(tmp_path: Path) -> Path:
    cfg = tiny_config(
        data={"name": "imagefolder", "root": str(tmp_path / "first4"), "train_per_class": None},
        scenario={"shuffle": False},
        train={"epochs": 1, "threads": 1},
    )
    cfg["data"]["test_per_class"] = None
    return write_config(tmp_path / "run.yaml", cfg)


def _tensors_sha(run: Path, task: int) -> str:
    return load_checkpoint(run / "checkpoints" / f"task_{task:03d}.json")[1]["tensors_sha256"]


def _reads_alike(run: Path, reference: Path) -> int:
    """Check that every reader sees one task with one model; returns the tasks the run's record commits to."""
    try:
        results = json.loads((run / "results.json").read_text())
    except FileNotFoundError:
        with pytest.raises(RunError):  # nothing committed yet: refused, not a half run
            build_method_from_run(run)
        return 0
    done = int(results["completed_tasks"])
    method, _, record = build_method_from_run(run)
    assert int(record["task"]) + 1 == done  # the checkpoint results.json commits to
    assert record["tensors_sha256"] == _tensors_sha(reference, done - 1)  # the model it had after that task
    names = load_run(run, device="cpu").class_names
    assert names == results["class_names"][: method.num_seen_classes()]
    assert len(names) == sum(len(t) for t in results["tasks"][:done])
    return done


def _run_kills(tmp_path: Path, config: Path, reference: Path) -> None:
    k = 0
    while True:
        out = tmp_path / f"killed{k}"
        kill = _KillAt(k)
        os.replace = kill
        try:
            rc = main(["-q", "run", str(config), "--out", str(out)])
        finally:
            os.replace = _REAL_REPLACE
        if kill.calls <= k:  # the run made fewer than k + 1 writes: every write point was tried
            assert rc == 0
            return
        assert rc == 130
        _reads_alike(out, reference)
        assert main(["-q", "run", str(config), "--out", str(out), "--resume"]) == 0
        ref = json.loads((reference / "results.json").read_text())
        assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == ref["accuracy_matrix"]
        assert _tensors_sha(out, 1) == _tensors_sha(reference, 1)
        shutil.rmtree(out)
        k += 1


def test_a_run_killed_at_any_write_reads_as_one_task_and_resumes_to_the_same_end(tmp_path):
    """Issue 22, item 6: killed between the final results.json and the final checkpoint, a run was 'finished'
    without its last model, and predict and export served the previous task's model with fewer classes."""
    _folder(tmp_path / "first4", ALL[:4])
    config = _config(tmp_path)
    reference = tmp_path / "reference"
    assert main(["-q", "run", str(config), "--out", str(reference)]) == 0
    _run_kills(tmp_path, config, reference)


def test_a_learn_killed_at_any_write_leaves_the_run_as_before_or_as_after(tmp_path):
    _folder(tmp_path / "first4", ALL[:4])
    new = _folder(tmp_path / "new", ["c4", "c5"])
    config = _config(tmp_path)
    base = tmp_path / "base"
    assert main(["-q", "run", str(config), "--out", str(base)]) == 0
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    learn(reference, new)
    k = 0
    while True:
        out = tmp_path / f"killed{k}"
        shutil.copytree(base, out)
        kill = _KillAt(k)
        os.replace = kill
        try:
            rc = main(["-q", "learn", str(out), "--data", str(new)])
        finally:
            os.replace = _REAL_REPLACE
        if kill.calls <= k:
            assert rc == 0
            return
        assert rc == 130
        assert _reads_alike(out, reference) in (2, 3)
        if json.loads((out / "results.json").read_text())["completed_tasks"] == 2:
            assert main(["-q", "learn", str(out), "--data", str(new)]) == 0  # the same learn again
        assert _reads_alike(out, reference) == 3
        ref = json.loads((reference / "results.json").read_text())
        assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == ref["accuracy_matrix"]
        assert main(["report", str(out)]) == 0
        shutil.rmtree(out)
        k += 1


def test_an_export_killed_at_any_write_leaves_the_old_export_or_the_new_one(tmp_path):
    _folder(tmp_path / "first4", ALL[:4])
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["-q", "run", str(config), "--out", str(run)]) == 0
    target = tmp_path / "exports" / "peft"
    export_peft(run, target, include_base=False)
    old = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    (target / "labels.txt").write_text("an earlier export\n")  # tell the old export from the new one
    old[Path("labels.txt")] = b"an earlier export\n"
    k = 0
    while True:
        kill = _KillAt(k)
        os.replace = kill
        try:
            export_peft(run, target, include_base=False)
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            os.replace = _REAL_REPLACE
        now = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
        if finished:
            assert kill.calls <= k and now[Path("labels.txt")] == b"c0\nc1\nc2\nc3\n"
            assert sorted(p.name for p in target.parent.iterdir()) == ["peft"]
            return
        assert now == old  # killed before the install: the earlier export, whole
        export_peft(run, target, include_base=False)  # the next export cleans up after the killed one
        assert sorted(p.name for p in target.parent.iterdir()) == ["peft"]
        (target / "labels.txt").write_text("an earlier export\n")
        k += 1
