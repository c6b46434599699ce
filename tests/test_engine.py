"""End-to-end runs of the engine on a tiny model: files, metrics consistency, determinism, resume, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from engine_helpers import tiny_config, write_config
from sdlora.config import RunConfig, load_config
from sdlora.configtools import from_dict
from sdlora.engine import (
    GlobalBatchSampler,
    RunError,
    RunState,
    Runtime,
    build_results,
    build_run,
    run_experiment,
    run_task,
    task_data,
)
from sdlora.metrics import compute_metrics
from sdlora.results import REQUIRED_KEYS
from sdlora.rundir import latest_checkpoint, load_checkpoint, restore_rng_state


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
    # Listeners hear every task (after results.json was written) and the end, in order.
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


def test_resume_after_kill_gives_same_matrix(tmp_path):
    full = _run(tmp_path, tiny_config(), "full")
    # Simulate a run killed during task 3: keep only the first two checkpoints.
    part = tmp_path / "part"
    _run(tmp_path, tiny_config(), "part")
    for p in (part / "checkpoints").glob("task_002.*"):
        p.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    assert latest_checkpoint(part).name == "task_001.json"
    resumed = _run(tmp_path, tiny_config(), "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["status"] == "finished"


def test_resume_refuses_changed_config(tmp_path):
    _run(tmp_path, tiny_config())
    changed = tiny_config(train={"lr": 0.02})
    with pytest.raises(RunError, match=r"train\.lr"):
        _run(tmp_path, changed, resume=True)


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
        load_config(str(path))
    cfg = tiny_config(train={"epochs": "two"})
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ValueError, match=r"train\.epochs"):
        load_config(str(path))
    path = write_config(tmp_path / "c.yaml", tiny_config())
    cfg_obj, _ = load_config(str(path), ["train.lr=1e-3", "method.adapter.rank_schedule=[4,2]"])
    assert cfg_obj.train.lr == 1e-3 and cfg_obj.method.adapter.rank_schedule == [4, 2]
    with pytest.raises(ValueError, match="rank"):
        load_config(str(path), ["method.adapter.rank=0"])


def test_shipped_presets_load():
    from sdlora.config import preset_names

    names = preset_names()
    assert "demo" in names and "demo-full" in names
    for name in names:
        load_config(name)


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
