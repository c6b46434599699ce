"""End-to-end runs of the engine on a tiny model: files, metrics consistency, determinism, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from engine_helpers import folder_config, tiny_config, write_config, write_image_folder
from sdlora.batches import GlobalBatchSampler, SeededAugment
from sdlora.config import RunConfig
from sdlora.configtools import ConfigError, from_dict
from sdlora.engine import (
    RunError,
    build_results,
    build_run,
    run_experiment,
    run_task,
    task_data,
)
from sdlora.methods import load_run_config
from sdlora.metrics import compute_metrics
from sdlora.results import REQUIRED_KEYS
from sdlora.rundir import latest_checkpoint, load_checkpoint, restore_rng_state
from sdlora.runstate import RunState
from sdlora.training import Runtime


def _run(tmp_path, cfg_dict, out_name="run", **kw):
    cfg = from_dict(RunConfig, cfg_dict)
    return run_experiment(cfg, tmp_path / out_name, **kw)


def test_run_writes_every_artifact_consistently(tmp_path):
    events = []
    results = _run(tmp_path, tiny_config(), on_event=events.append)
    out = tmp_path / "run"
    for name in [
        "config.yaml",
        "results.json",
        "metrics.csv",
        "accuracy_matrix.csv",
        "log.txt",
        "plots/accuracy_matrix.png",
        "plots/accuracy_curve.png",
    ]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "finished" and saved["completed_tasks"] == saved["num_tasks"] == 3
    for key in REQUIRED_KEYS:
        assert key in saved, key
    # Metrics recomputed from the matrix and per-task counts match results.json.
    mat = saved["accuracy_matrix"]
    assert all(v is None for i, row in enumerate(mat) for v in row[i + 1 :])
    totals = saved["test_samples_per_task"]
    correct = [[round(mat[i][j] * totals[j] / 100) for j in range(i + 1)] for i in range(3)]
    again = compute_metrics(correct, totals)
    for key in ["acc", "aaa", "mean_task_acc", "forgetting", "bwt"]:
        assert math.isclose(again[key], saved[key], abs_tol=1e-6), key
    assert saved["acc"] == saved["acc_after_task"][-1]
    assert saved["protocol"] == "official"
    assert saved["tasks"] == [saved["class_order"][i : i + 2] for i in (0, 2, 4)]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # One checkpoint per task.
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == [f"task_00{i}.json" for i in range(3)]
    # The tiny model learns the first task (synthetic classes are separable).
    assert mat[0][0] > 75.0
    assert results["acc"] == saved["acc"]
    # Class names follow the class order (position p is class_order[p]); the data identity counts what was used.
    ident = saved["data_identity"]
    assert saved["class_names"] == [ident["class_names"][c] for c in saved["class_order"]]
    assert ident["train_counts"] == [16] * 6 and ident["test_counts"] == [6] * 6 and len(ident["sha256"]) == 64
    # Listeners hear every optimizer step and epoch (the run's global step, the epoch's loss as the task log has it)
    progress = [e for e in events if e.kind in ("step", "epoch_end")]
    steps = [e for e in progress if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, sum(t["steps"] for t in saved["task_log"]) + 1))
    assert all(set(e.scalars) == {"train/loss", "train/lr"} and e.scalars["train/lr"] == 0.01 for e in steps)
    last_epoch = [e for e in progress if e.kind == "epoch_end" and e.scalars["train/epoch"] == 6]
    assert [(e.task, e.scalars["train/epoch_loss"]) for e in last_epoch] == [
        (t["task"], t["loss"]) for t in saved["task_log"]
    ]
    events = [e for e in events if e not in progress]
    # ... every task (after results.json was written) and the end, in order.
    assert [(e.kind, e.task, e.results["completed_tasks"]) for e in events] == [
        ("task_end", 0, 1),
        ("task_end", 1, 2),
        ("task_end", 2, 3),
        ("run_end", 2, 3),
    ]
    assert events[-1].results == saved and all(e.run_dir == out for e in events)


def test_runs_are_deterministic(tmp_path):
    a = _run(tmp_path, tiny_config(), "a")
    b = _run(tmp_path, tiny_config(), "b")
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["class_order"] == b["class_order"]


def _killed_during_task_3(tmp_path, name="part"):
    """A finished tiny run made to look killed during task 3: only the first two checkpoints, status running."""
    part = tmp_path / name
    _run(tmp_path, tiny_config(), name)
    for p in (part / "checkpoints").glob("task_002.*"):
        p.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    return part


def test_resume_after_kill_gives_same_matrix(tmp_path):
    full = _run(tmp_path, tiny_config(), "full")
    part = _killed_during_task_3(tmp_path)
    assert latest_checkpoint(part).name == "task_001.json"
    resumed = _run(tmp_path, tiny_config(), "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["status"] == "finished"


def test_keep_checkpoints_deletes_older_ones_only_after_their_successor_is_committed(tmp_path):
    full = _run(tmp_path, tiny_config(), "full")
    kept = _run(tmp_path, tiny_config(train={"keep_checkpoints": 1}), "kept")
    assert kept["accuracy_matrix"] == full["accuracy_matrix"]
    assert sorted(p.name for p in (tmp_path / "kept" / "checkpoints").iterdir()) == [
        "task_002.json",
        "task_002.safetensors",
    ]
    # A resume may turn it on (it changes no result): the killed run's task_000 goes once task_002 is committed.
    part = _killed_during_task_3(tmp_path)
    resumed = _run(tmp_path, tiny_config(train={"keep_checkpoints": 2}), "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert sorted(p.name for p in (part / "checkpoints").glob("*.json")) == ["task_001.json", "task_002.json"]


def test_resume_refuses_changed_config(tmp_path):
    _run(tmp_path, tiny_config())
    changed = tiny_config(train={"lr": 0.02})
    with pytest.raises(RunError, match=r"train\.lr"):
        _run(tmp_path, changed, resume=True)


def test_resume_accepts_a_run_written_before_a_config_key_existed(tmp_path):
    """A config.yaml without a key added to sdlora later (here method.calib.features/adapted_weight) resumes:
    the missing key is its default, not a change; a real change is still refused."""
    from sdlora.configtools import dump_yaml, load_yaml

    full = _run(tmp_path, tiny_config(), "full")
    part = _killed_during_task_3(tmp_path)
    saved = load_yaml(part / "config.yaml")
    del saved["method"]["calib"]["features"], saved["method"]["calib"]["adapted_weight"]
    (part / "config.yaml").write_text(dump_yaml(saved))
    with pytest.raises(RunError, match=r"train\.lr"):
        _run(tmp_path, tiny_config(train={"lr": 0.02}), "part", resume=True)
    resumed = _run(tmp_path, tiny_config(), "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_refuses_to_overwrite_finished_run(tmp_path):
    _run(tmp_path, tiny_config())
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(RunError, match="already holds a finished run"):
        _run(tmp_path, tiny_config())
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    _run(tmp_path, tiny_config(), overwrite=True)


def test_corrupt_checkpoint_is_reported(tmp_path):
    _run(tmp_path, tiny_config())
    out = tmp_path / "run"
    st = out / "checkpoints" / "task_002.safetensors"
    st.write_bytes(st.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RunError, match="sha256"):
        _run(tmp_path, tiny_config(), resume=True)


@pytest.mark.parametrize("method", ["sdlora_rr", "sdlora_kd"])
def test_variants_run(tmp_path, method):
    res = _run(tmp_path, tiny_config(method={"name": method}))
    assert res["completed_tasks"] == 3
    assert len(res["trainable_params_per_task"]) == 3


def test_rr_trainable_params_follow_schedule(tmp_path):
    res = _run(tmp_path, tiny_config(method={"name": "sdlora_rr", "adapter": {"rank_schedule": [4, 2]}}))
    # vit_test_tiny: 2 blocks x {q, v} x (32 r + 32 r); plus the 2-class head block (2 x 32 + 2).
    head = 2 * 32 + 2
    lora = [2 * 2 * 64 * r for r in (4, 2, 2)]
    assert res["trainable_params_per_task"] == [lora[0] + head + 1, lora[1] + head + 2, lora[2] + head + 3]


def test_global_batch_sampler_shards_cover_single_process_batches():
    single = list(GlobalBatchSampler(23, 6, seed=3))
    parts = [list(GlobalBatchSampler(23, 6, seed=3, rank=r, world=2)) for r in range(2)]
    for b, (p0, p1) in zip(single, zip(*parts)):
        assert sorted(p0 + p1) == sorted(b)
    assert sorted(np.concatenate(single).tolist()) == list(range(23))


class _RandomDraws(torch.utils.data.Dataset):
    """Stands for a random transform: every item is a few draws from torch's default generator."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        return torch.rand(3), torch.randint(0, 100, (2,))


def test_seeded_augment_draws_per_sample_and_leaves_the_global_stream_alone(monkeypatch):
    ds = SeededAugment(_RandomDraws(), base_seed=7)
    ds.epoch = 2
    # The seed of sample i, as the engine has always drawn it (torch.manual_seed inside fork_rng).
    expected = []
    for i in range(5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((7 * 1_000_003 + 2 * 7_919 + i) % (2**63 - 1))
            expected.append(_RandomDraws()[i])
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    monkeypatch.setattr(torch, "manual_seed", None)  # only the CPU generator may be touched (not CUDA's)
    items = [ds[i] for i in (3, 0, 4, 1, 2)]  # any order, any worker: the same sample gets the same draws
    after = torch.rand(4)
    monkeypatch.undo()
    for got, i in zip(items, (3, 0, 4, 1, 2)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected[i]))
    assert torch.equal(before, after), "the caller's random stream moved"
    ds.epoch = 3
    assert not torch.equal(ds[0][0], items[1][0]), "another epoch must draw another transform"


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"scenario": {"init_cls": 2, "increment": 3}}, "increment"),
        ({"scenario": {"init_cls": 8, "increment": 2}}, "init_cls|classes"),
        ({"method": {"name": "nope"}}, "known methods"),
        ({"data": {"name": "nope"}}, "unknown dataset"),
        ({"backbone": {"name": "nope_vit", "pretrained": False}}, "nope_vit"),
    ],
)
def test_bad_scenario_or_names(tmp_path, patch, match):
    with pytest.raises((ValueError, KeyError, RuntimeError), match=match):
        _run(tmp_path, tiny_config(**patch))
    assert not (tmp_path / "run" / "results.json").exists()


def test_load_config_rejects_unknown_and_mistyped_keys(tmp_path):
    cfg = tiny_config()
    cfg["train"]["lrr"] = 0.1
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ValueError, match=r"train\.lrr"):
        load_run_config(str(path))
    cfg = tiny_config(train={"epochs": "two"})
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ValueError, match=r"train\.epochs"):
        load_run_config(str(path))
    path = write_config(tmp_path / "c.yaml", tiny_config())
    cfg_obj, _ = load_run_config(str(path), ["train.lr=1e-3", "method.adapter.rank_schedule=[4,2]"])
    assert cfg_obj.train.lr == 1e-3 and cfg_obj.method.adapter.rank_schedule == [4, 2]
    with pytest.raises(ValueError, match="rank"):
        load_run_config(str(path), ["method.adapter.rank=0"])


def test_shipped_presets_load():
    from sdlora.config import preset_names

    names = preset_names()
    assert "demo" in names and "demo-full" in names
    for name in names:
        load_run_config(name)


def test_training_changes_adapter_not_backbone(tmp_path):
    from sdlora.engine import build_method_from_run

    _run(tmp_path, tiny_config())
    method, cfg, record = build_method_from_run(tmp_path / "run")
    torch.manual_seed(cfg.seed)
    from sdlora.backbones import create_backbone

    torch.manual_seed(cfg.seed)
    fresh = create_backbone(cfg.backbone, cfg.data.image_size).model
    plain = method.export_backbone()
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed)


class _RandomSample(torch.utils.data.Dataset):
    """Each item is a fresh draw from the global torch RNG, like a random training transform."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3)


def test_seeded_augment_depends_on_seed_epoch_and_index_only():
    aug = SeededAugment(_RandomSample(), base_seed=5)
    first = [aug[i] for i in range(4)]
    torch.rand(10)  # the global RNG state must not matter
    assert all(torch.equal(a, aug[i]) for i, a in enumerate(first))
    assert not torch.equal(first[0], first[1])  # index
    aug.epoch = 1
    assert all(not torch.equal(a, aug[i]) for i, a in enumerate(first))  # epoch
    other = SeededAugment(_RandomSample(), base_seed=6)
    assert not torch.equal(other[0], first[0])  # seed (and task: base_seed is seed * 1000 + task)


def _augmented_config():
    return tiny_config(
        data={"augment": True, "train_per_class": 8, "test_per_class": 4},
        train={"epochs": 2, "threads": 1},
    )


def test_augmented_runs_are_deterministic_resumable_and_vary_by_epoch(tmp_path, monkeypatch):
    seen: set[tuple[int, int]] = set()
    original = SeededAugment.__getitem__

    def spy(self, i):
        seen.add((self.base_seed, self.epoch))
        return original(self, i)

    monkeypatch.setattr(SeededAugment, "__getitem__", spy)
    a = _run(tmp_path, _augmented_config(), "a")
    # Every task draws its own augmentations in every epoch (seed 7: base seeds 7000 + task).
    assert seen == {(7000 + t, e) for t in range(3) for e in range(2)}
    b = _run(tmp_path, _augmented_config(), "b")
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    fa, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    fb, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # Killed during task 3, resumed: the same augmentations, the same final state.
    part = tmp_path / "b"
    for p in (part / "checkpoints").glob("task_002.*"):
        p.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    resumed = _run(tmp_path, _augmented_config(), "b", resume=True)
    assert resumed["accuracy_matrix"] == a["accuracy_matrix"]
    fr, _ = load_checkpoint(latest_checkpoint(part))
    assert all(torch.equal(fa[k], fr[k]) for k in fa if not k.startswith("rng."))


def test_run_state_checkpoint_roundtrip():
    state = RunState(
        correct=[[5], [4, 6]],
        totals=[6, 6],
        trainable_per_task=[10, 12],
        task_log=[{"task": 0}, {"task": 1}],
        wall_time_s=12.5,
        next_task=2,
    )
    record = {"task": 1, "engine": json.loads(json.dumps(state.to_checkpoint()))}
    back = RunState.from_checkpoint(record, session_start=100.0)
    assert back == state  # every saved field comes back (the session fields are not compared)
    assert back.elapsed_before == 12.5 and back.session_start == 100.0
    assert back.metrics() == compute_metrics([[5], [4, 6]], [6, 6])
    with pytest.raises(RunError, match="engine state"):
        RunState.from_checkpoint({"task": 1, "engine": {"correct": []}})


def test_run_task_adds_a_task_to_a_finished_run(tmp_path):
    """What ``sdlora learn`` needs: a finished 2-task run plus ``run_task`` on task 3 gives the 3-task run."""
    full = _run(tmp_path, tiny_config(), "full")
    _run(tmp_path, tiny_config(scenario={"num_tasks": 2}), "two")
    cfg = from_dict(RunConfig, tiny_config())
    device = torch.device("cpu")
    backbone, data, scenario, method = build_run(cfg, device)
    tensors, record = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    method.load_state(tensors, record["method"])
    restore_rng_state(tensors, record["rng"])
    state = RunState.from_checkpoint(record)
    assert state.next_task == 2
    rt = Runtime(train=cfg.train, seed=cfg.seed, device=device)
    with pytest.raises(RunError, match="next task is task 3"):
        run_task(method, state, task_data(scenario, data, 1), rt, num_tasks=3)
    entry = run_task(method, state, task_data(scenario, data, 2), rt, num_tasks=3)
    assert entry["task"] == 2 and entry["classes"] == [4, 6] and state.next_task == 3
    res = build_results(cfg, method, backbone, data, scenario, state).to_dict()
    assert res["status"] == "finished"
    assert res["accuracy_matrix"] == full["accuracy_matrix"]
    assert res["trainable_params_per_task"] == full["trainable_params_per_task"]


# ------------------------------------------------------------------------------------- reliability of resume
def _kill_after_task(out, task):
    """Make ``out`` look like a run killed right after ``task`` (0-based) was checkpointed."""
    for p in (out / "checkpoints").glob("task_*"):
        if int(p.stem.split("_")[1]) > task:
            p.unlink()
    res = json.loads((out / "results.json").read_text())
    res["status"] = "running"
    (out / "results.json").write_text(json.dumps(res))


def test_resume_of_a_finished_run_rebuilds_results_tables_and_plots(tmp_path):
    """A kill while plotting, or a lost results.json, used to leave the run without them for good."""
    full = _run(tmp_path, tiny_config(scenario={"num_tasks": 2}))
    out = tmp_path / "run"
    tables = {n: (out / n).read_text() for n in ("metrics.csv", "accuracy_matrix.csv")}
    for name in ("results.json", "metrics.csv", "accuracy_matrix.csv", "plots/accuracy_curve.png"):
        (out / name).unlink()
    events = []
    again = _run(tmp_path, tiny_config(scenario={"num_tasks": 2}), resume=True, on_event=events.append)
    assert again == full  # the same record, rebuilt from the last checkpoint
    assert json.loads((out / "results.json").read_text()) == full
    assert {n: (out / n).read_text() for n in tables} == tables
    assert (out / "plots" / "accuracy_curve.png").is_file()
    assert [(e.kind, e.task) for e in events] == [("resumed", 1), ("run_end", 1)]  # no task ran: no step events


def test_resume_rewrites_a_stale_record_from_the_checkpoint(tmp_path):
    """results.json ahead of the last checkpoint (killed between the two writes) is replaced at once."""
    _run(tmp_path, tiny_config())
    out = tmp_path / "run"
    _kill_after_task(out, 0)
    seen = []

    def listener(event):
        if event.kind == "resumed":
            seen.append(json.loads((out / "results.json").read_text())["completed_tasks"])

    _run(tmp_path, tiny_config(), resume=True, on_event=listener)
    assert seen == [1]


def test_resume_refuses_changed_data_saying_what_changed(tmp_path):
    """Adding class folders between a kill and --resume used to resume with a new class order under the old head."""
    root = write_image_folder(tmp_path / "data", {"a": 3, "b": 3, "c": 3}, {"a": 2, "b": 2, "c": 2})
    cfg = folder_config(root)
    _run(tmp_path, cfg)
    out = tmp_path / "run"
    _kill_after_task(out, 0)
    write_image_folder(tmp_path / "extra", {"d": 3}, {"d": 2})
    (tmp_path / "extra" / "train" / "d").rename(root / "train" / "d")
    (tmp_path / "extra" / "test" / "d").rename(root / "test" / "d")
    with pytest.raises(RunError, match=r"(?s)not the data this run started with.*classes added: d"):
        _run(tmp_path, cfg, resume=True)
    shutil.rmtree(root / "train" / "d")
    shutil.rmtree(root / "test" / "d")
    (root / "train" / "b" / "2.png").unlink()
    with pytest.raises(RunError, match=r"train images per class changed: b 3 -> 2"):
        _run(tmp_path, cfg, resume=True)
    (root / "train" / "a" / "0.png").rename(root / "train" / "b" / "2.png")
    (root / "train" / "a" / "3.png").write_bytes((root / "train" / "a" / "1.png").read_bytes())
    with pytest.raises(RunError, match=r"training samples changed with the same counts"):
        _run(tmp_path, cfg, resume=True)
    assert json.loads((out / "results.json").read_text())["completed_tasks"] == 2  # nothing written by refusals


def test_class_without_test_images_is_refused_before_training(tmp_path):
    """A class without test images used to be silently dropped from the accuracy matrix."""
    root = write_image_folder(tmp_path / "data", {"a": 3, "b": 3, "c": 3}, {"a": 2, "b": 2})
    with pytest.raises(ConfigError) as exc:
        _run(tmp_path, folder_config(root))
    assert exc.value.path == "data"
    assert re.search(r"class 'c' \(label 2, task \d\) has no test images", str(exc.value))
    assert "check-data" in str(exc.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()


def test_wrong_data_root_is_reported_before_the_backbone_is_built(tmp_path, monkeypatch):
    import sdlora.engine as engine

    built = []
    monkeypatch.setattr(engine, "create_backbone", lambda *a, **k: built.append(a) or pytest.fail("backbone built"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        _run(tmp_path, folder_config(tmp_path / "nowhere"))
    assert built == []


def test_checkpoint_that_does_not_fit_gives_delete_advice(tmp_path):
    """A record that passes its own checks but does not fit the method used to leak a KeyError or TypeError."""
    from sdlora import rundir

    _run(tmp_path, tiny_config())
    out = tmp_path / "run"
    ck = out / "checkpoints" / "task_002.json"
    record = json.loads(ck.read_text())
    record["method"] = {"unexpected": 1}
    record["record_sha256"] = rundir._record_digest(record)  # as if written that way: the shape is what is wrong
    ck.write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"checkpoint .*task_002\.json does not fit this run.*delete it"):
        _run(tmp_path, tiny_config(), resume=True)


def test_runs_record_their_environment_and_resume_warns_when_it_changed(tmp_path, monkeypatch, caplog):
    """results.json says what a run ran on; a resume under other versions keeps the earlier one and warns."""
    import sdlora.engine as engine_mod
    from sdlora.environment import capture_environment

    _run(tmp_path, tiny_config(scenario={"num_tasks": 2}))
    out = tmp_path / "run"
    first = json.loads((out / "results.json").read_text())
    assert first["environment"] == capture_environment(torch.device("cpu"))
    assert first["earlier_environments"] == []

    _kill_after_task(out, 0)
    other = dict(first["environment"], torch="0.0.0-other")
    monkeypatch.setattr(engine_mod, "capture_environment", lambda device: dict(other))
    with caplog.at_level("WARNING", logger="sdlora"):
        _run(tmp_path, tiny_config(scenario={"num_tasks": 2}), resume=True)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["environment"] == other
    assert resumed["earlier_environments"] == [dict(first["environment"], until_task=1)]
    assert any("another environment" in r.message and "0.0.0-other" in r.message for r in caplog.records)
