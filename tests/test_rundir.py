"""The run directory: status, refusing to overwrite, checkpoints (commit marker, damage), RNG state."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdlora.fileio import atomic_write_json
from sdlora.rundir import (
    CONFIG_HEADER,
    LOCK_FILE,
    RunError,
    committed_checkpoint,
    config_changes,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    prune_checkpoints,
    restore_rng_state,
    rng_state,
    run_dir_lock,
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
    (out / "config.yaml").write_text(CONFIG_HEADER + "seed: 1\ntrain: {device: cpu, lr: 0.1}\n")  # as sdlora writes it
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
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {"next": task + 1})
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "task_002.json"
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


def _checkpoint_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_prune_keeps_the_newest_committed_checkpoints_only(tmp_path):
    for task in range(4):
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {"next": task + 1})
    every = _checkpoint_names(tmp_path)
    assert prune_checkpoints(tmp_path, 1) == []  # no results.json: nothing is known to be committed
    assert prune_checkpoints(tmp_path, None) == [] and _checkpoint_names(tmp_path) == every
    # The record counts 3 tasks: task_003 is a killed learn's, never a candidate; of the committed, the newest 2 stay.
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 3})
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["task_000.json"]
    assert _checkpoint_names(tmp_path) == [f"task_00{t}.{x}" for t in (1, 2, 3) for x in ("json", "safetensors")]
    prune_checkpoints(tmp_path, 1)
    assert committed_checkpoint(tmp_path).name == "task_002.json"
    assert _checkpoint_names(tmp_path) == [f"task_00{t}.{x}" for t in (2, 3) for x in ("json", "safetensors")]
    assert prune_checkpoints(tmp_path, 1) == []  # the committed one is never removed
    load_checkpoint(committed_checkpoint(tmp_path))


def test_prune_orders_tasks_by_number_and_sweeps_orphaned_tensors(tmp_path):
    for task in (998, 999, 1000):  # task_1000 sorts before task_999 by name
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {})
    (tmp_path / "checkpoints" / "task_500.safetensors").write_bytes(b"x")  # a kill between the two deletions
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 1001})
    assert committed_checkpoint(tmp_path).name == latest_checkpoint(tmp_path).name == "task_1000.json"
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["task_998.json", "task_999.json"]
    assert _checkpoint_names(tmp_path) == ["task_1000.json", "task_1000.safetensors"]


def test_a_reader_retries_when_a_writer_prunes_its_checkpoint(tmp_path, monkeypatch):
    import sdlora.rundir as rundir

    save_checkpoint(tmp_path, 0, _Tiny(0.0), {"next": 1})
    atomic_write_json(tmp_path / "results.json", {"completed_tasks": 1})
    real = rundir.load_checkpoint
    calls = []

    def writer_commits_and_prunes_first(path):
        if not calls:  # between the reader's lookup and its load, a run with keep_checkpoints: 1 moves on
            save_checkpoint(tmp_path, 1, _Tiny(1.0), {"next": 2})
            atomic_write_json(tmp_path / "results.json", {"completed_tasks": 2})
            prune_checkpoints(tmp_path, 1)
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(rundir, "load_checkpoint", writer_commits_and_prunes_first)
    path, tensors, record = rundir.load_committed_checkpoint(tmp_path)
    assert calls == ["task_000.json", "task_001.json"] and path.name == "task_001.json" and record["task"] == 1
    assert torch.equal(tensors["w"], torch.full((2, 3), 1.0))


def test_damage_advice_depends_on_an_older_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 0, _Tiny(0.0), {})
    save_checkpoint(tmp_path, 1, _Tiny(1.0), {})
    for task, advice in ((1, "to resume from the previous task"), (0, "no older checkpoint remains")):
        ck = tmp_path / "checkpoints" / f"task_00{task}.json"
        ck.write_text("{")
        with pytest.raises(RunError, match=advice):
            load_checkpoint(ck)


def test_missing_tensors_advice_depends_on_an_older_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 0, _Tiny(0.0), {})
    save_checkpoint(tmp_path, 1, _Tiny(1.0), {})
    for task, advice in ((1, "to resume from the previous task"), (0, "no older checkpoint remains")):
        ck = tmp_path / "checkpoints" / f"task_00{task}.json"
        ck.with_suffix(".safetensors").unlink()
        with pytest.raises(RunError, match=f"has no tensors file .*{advice}"):
            load_checkpoint(ck)


def test_committed_checkpoint_is_the_one_results_json_describes(tmp_path):
    """A checkpoint newer than the record (a ``sdlora learn`` killed before its commit) is not loaded."""
    assert committed_checkpoint(tmp_path) is None
    for task in range(3):
        save_checkpoint(tmp_path, task, _Tiny(float(task)), {})
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


# ------------------------------------------------------------------------------------------------ the lock
def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    out = tmp_path / "run"
    with run_dir_lock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # A second taker (another open file description: what another process does) is refused.
        with pytest.raises(RunError, match=rf"{out} is in use by process {os.getpid()} on host"), run_dir_lock(out):
            pass
    assert not (out / LOCK_FILE).exists()
    with run_dir_lock(out):  # released: it can be taken again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "sdlora run x"}))
    with caplog.at_level(logging.WARNING, logger="sdlora"), run_dir_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {dead}" in caplog.text and "no longer runs" in caplog.text


def test_lock_file_of_a_live_process_is_not_taken_over(tmp_path):
    """A lock file naming a live process of this host that holds no flock (say, a filesystem without flock) is
    refused: the process may be writing."""
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        (out / LOCK_FILE).write_text(json.dumps({"pid": live.pid, "host": host, "command": "sdlora run x"}))
        with pytest.raises(RunError, match=rf"locked by process {live.pid} on host"), run_dir_lock(out):
            pass
    finally:
        live.kill()
        live.wait()


def test_lock_of_another_host_is_refused_with_advice(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1234, "host": "elsewhere", "command": "sdlora run x"}))
    with (
        pytest.raises(
            RunError, match=rf"process 1234 on host elsewhere.*if no run is going there, delete .*{LOCK_FILE}"
        ),
        run_dir_lock(out),
    ):
        pass
    assert json.loads((out / LOCK_FILE).read_text())["host"] == "elsewhere"  # left as it was


def test_lock_on_a_path_that_cannot_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(RunError, match="cannot use .* as a run directory"), run_dir_lock(out):
            pass


# ----------------------------------------------------------------------------------------- hygiene
def _sdlora_run_dir(out):
    """A run directory holding every file sdlora writes, as sdlora writes it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(CONFIG_HEADER + "seed: 1\n")
    atomic_write_json(out / "results.json", {"status": "finished", "sdlora_version": "0"})
    (out / "metrics.csv").write_text("task,new_classes,classes_seen,acc_after_task\n1,2,2,50.0\n")
    (out / "accuracy_matrix.csv").write_text("after_task,task_1\n1,50.0\n")
    (out / "log.txt").write_text("2026-01-01 10:00:00,123 INFO sdlora 0.1.0 | method sdlora\n")
    atomic_write_json(out / "split.json", {"dataset": "imagefolder", "seed": 1, "train": [], "test": []})
    save_checkpoint(out, 0, _Tiny(1.0), {"next": 1})
    (out / "plots").mkdir()
    for name in ("accuracy_matrix.png", "accuracy_curve.png"):
        (out / "plots" / name).write_bytes(b"\x89PNG")


def test_overwrite_deletes_only_what_sdlora_wrote(tmp_path):
    """--overwrite used to delete the whole plots/ and checkpoints/ trees, whatever they held."""
    out = tmp_path / "run"
    _sdlora_run_dir(out)
    (out / "notes.md").write_text("my notes")
    (out / "plots" / "my_figure.png").write_bytes(b"mine")
    (out / "checkpoints" / "best_model.pt").write_bytes(b"mine")
    prepare_run_dir(out, {"seed": 1}, resume=False, overwrite=True)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["checkpoints/best_model.pt", "notes.md", "plots/my_figure.png"]
    assert run_state(out) != "finished"


def test_overwrite_refuses_to_replace_a_file_sdlora_did_not_write(tmp_path):
    out = tmp_path / "run"
    _sdlora_run_dir(out)
    (out / "config.yaml").write_text("# my own experiment notes\nseed: 1\n")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RunError, match=r"would replace files that sdlora did not write: .*config\.yaml"):
        prepare_run_dir(out, {"seed": 1}, resume=False, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing deleted


def test_temporary_files_of_killed_writes_are_swept_on_resume(tmp_path):
    out = tmp_path / "run"
    _sdlora_run_dir(out)
    temps = [
        out / ".results.json.0123456789ab.tmp",
        out / "checkpoints" / ".task_001.safetensors.abcdef012345.tmp",
        out / "plots" / ".accuracy_curve.png.00000000ffff.tmp",
    ]
    for p in temps:
        p.write_bytes(b"half a file")
    (out / ".my.hidden.tmp").write_text("not one of ours (no 12-hex id)")
    prepare_run_dir(out, {"seed": 1}, resume=True, overwrite=False)
    assert not any(p.exists() for p in temps)
    assert (out / ".my.hidden.tmp").exists() and (out / "results.json").exists()


# ---------------------------------------------------------------------------------- checkpoint records
def _rewrite(ck, edit):
    record = json.loads(ck.read_text())
    edit(record)
    ck.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["engine"].update(next=7),  # valid JSON, plausible value: used to resume with it
        lambda r: r.update(task=5),
        lambda r: r["rng"].update(numpy=[1, 2]),
    ],
)
def test_edited_checkpoint_record_is_refused_with_advice(tmp_path, edit):
    save_checkpoint(tmp_path, 0, _Tiny(1.0), {"next": 1})
    ck = tmp_path / "checkpoints" / "task_000.json"
    _rewrite(ck, edit)
    with pytest.raises(
        RunError, match=r"corrupt checkpoint .*task_000\.json.*no older checkpoint remains.*deleting .* start over"
    ):
        load_checkpoint(ck)


@pytest.mark.parametrize(
    "record",
    [[1, 2], {"task": "0"}, {"task": 0, "method": [], "engine": {}, "rng": {}, "tensors_sha256": "x"}],
)
def test_malformed_checkpoint_record_gives_advice_not_a_traceback(tmp_path, record):
    """A record of the wrong shape used to leak AttributeError / IndexError / TypeError."""
    save_checkpoint(tmp_path, 0, _Tiny(1.0), {"next": 1})
    ck = tmp_path / "checkpoints" / "task_000.json"
    ck.write_text(json.dumps(record))
    with pytest.raises(RunError, match="corrupt checkpoint.*no older checkpoint remains"):
        load_checkpoint(ck)


def test_checkpoint_record_without_its_sha256_is_refused(tmp_path):
    """Issue 22, item 9: a record without ``record_sha256`` was trusted, so an edit that also dropped the digest
    resumed with whatever the record said."""
    save_checkpoint(tmp_path, 0, _Tiny(1.0), {"next": 1})
    ck = tmp_path / "checkpoints" / "task_000.json"
    load_checkpoint(ck)  # as written: accepted
    _rewrite(ck, lambda r: (r.pop("record_sha256"), r["engine"].update(next=7)))
    with pytest.raises(RunError, match=r"task_000\.json: it has no 'record_sha256'.*no older checkpoint remains"):
        load_checkpoint(ck)


def test_saved_config_states_what_a_registry_entry_sets(tmp_path):
    """``sdlora_calib``'s head and ``sdlora_ca``'s alignment are written into the resolved config; a calibrated
    run saved before that (its config says ``head: linear``) shows the difference instead of passing as equal."""
    from sdlora.configtools import dump_yaml, to_dict
    from sdlora.methods import load_run_config
    from sdlora.rundir import normalised_config

    calib, _ = load_run_config("demo", ["method.name=sdlora_calib"])
    c = calib.method.calib
    assert (c.head, c.drift, c.features, c.covariance, c.projection_dim) == ("ridge", "linear", "both", "shared", 4096)
    assert load_run_config("demo", ["method.name=sdlora_ca"])[0].method.align.enabled
    plain, _ = load_run_config("demo", ["method.name=sdlora"])
    assert plain.method.calib.head == "linear" and not plain.method.align.enabled
    current = to_dict(calib)
    assert normalised_config(current) == current  # written by this version: nothing to report
    legacy = to_dict(calib)
    legacy["method"]["calib"] = to_dict(plain.method.calib)  # as sdlora_calib runs were saved before
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(CONFIG_HEADER + dump_yaml(legacy))
    changes = config_changes(out, current)
    assert any(d.startswith("method.calib.head") for d in changes), changes
    assert any(d.startswith("method.calib.projection_dim") for d in changes), changes
    legacy_ca = to_dict(load_run_config("demo", ["method.name=sdlora_ca"])[0])
    legacy_ca["method"]["align"]["enabled"] = False  # an alignment entry saved before: same behaviour, no change
    assert normalised_config(legacy_ca)["method"]["align"]["enabled"] is True
