"""``sdlora diagnose``: per-block statistics by hand, and agreement with the run's own accuracy matrix."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import tiny_config
from sdlora.cli import main
from sdlora.config import RunConfig
from sdlora.configtools import from_dict
from sdlora.diagnose import block_statistics, diagnose_run
from sdlora.engine import run_experiment
from sdlora.rundir import RunError


def test_block_statistics_by_hand():
    # Task 2 (positions 2-3) of two blocks: sample 0 right, sample 1 wrong inside its block, sample 2 pulled to
    # block 1 although its own block ranks it right.
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [0.0, 0.0, 3.0, 1.0], [9.0, 0.0, 1.0, 4.0]])
    labels = torch.tensor([2, 3, 3])
    r = block_statistics(logits, labels, [(0, 2), (2, 4)])
    assert r["n"] == 3
    assert r["acc"] == pytest.approx(100 / 3)
    assert r["within"] == pytest.approx(200 / 3)
    assert r["to_block"] == pytest.approx([100 / 3, 200 / 3])
    assert r["max_logit"] == pytest.approx([(1 + 0 + 9) / 3, (5 + 3 + 4) / 3])
    with pytest.raises(ValueError, match="one task"):
        block_statistics(logits, torch.tensor([0, 3, 3]), [(0, 2), (2, 4)])


def test_diagnose_agrees_with_the_run(tmp_path, capsys):
    cfg = from_dict(RunConfig, tiny_config(data={"train_per_class": 8, "test_per_class": 4}, train={"epochs": 2}))
    results = run_experiment(cfg, tmp_path / "run")
    d = diagnose_run(tmp_path / "run")
    assert d["after_task"] == 3 and len(d["tasks"]) == 3
    for t, row in enumerate(d["tasks"]):
        assert row["acc"] == pytest.approx(results["accuracy_matrix"][-1][t])
        assert sum(row["to_block"]) == pytest.approx(100.0)
        assert row["within"] >= row["acc"] - 1e-9  # knowing the task can only help
    first = diagnose_run(tmp_path / "run", task=1)
    assert first["after_task"] == 1 and first["tasks"][0]["acc"] == pytest.approx(results["accuracy_matrix"][0][0])
    with pytest.raises(RunError, match="--task 7: .* has completed 3 task"):
        diagnose_run(tmp_path / "run", task=7)
    assert main(["diagnose", str(tmp_path / "run"), "--task", "2", "--json", str(tmp_path / "d.json")]) == 0
    printed = capsys.readouterr().out
    assert "after task 2 of 3" in printed and "within" in printed
    assert json.loads((tmp_path / "d.json").read_text())["after_task"] == 2
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    for p in (tmp_path / "run" / "checkpoints").glob("task_000.*"):  # what train.keep_checkpoints: 2 leaves
        p.unlink()
    with pytest.raises(RunError, match="no checkpoint after task 1 .*keep_checkpoints.*omit --task"):
        diagnose_run(tmp_path / "run", task=1)


def test_diagnose_a_text_run(tmp_path, tiny_bert_dir):
    """Text batches are dicts of token tensors: diagnose must move them to the device like the engine does."""
    from hf_helpers import class_texts, hf_text_config, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", class_texts(4, 8))
    cfg = from_dict(RunConfig, hf_text_config(tiny_bert_dir, data))
    results = run_experiment(cfg, tmp_path / "run")
    d = diagnose_run(tmp_path / "run")
    assert [row["acc"] for row in d["tasks"]] == pytest.approx(results["accuracy_matrix"][-1])


def test_diagnose_reads_learned_tasks_and_only_committed_checkpoints(tmp_path, monkeypatch):
    """Issue 22, item 4: diagnose raised IndexError on a run that had learned a task (its scenario has no such
    task) and read a learn checkpoint that results.json does not commit to."""
    from sdlora.learn import learn
    from test_learn import ALL, _folder, _run

    run = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    new = _folder(tmp_path / "new", ["c4", "c5"])
    import sdlora.learn

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed after the checkpoint, before results.json (the commit)
        m.setattr(sdlora.learn, "atomic_write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            learn(run, new)
    assert (run / "checkpoints" / "task_002.json").exists()
    d = diagnose_run(run)
    assert d["after_task"] == 2 and len(d["tasks"]) == 2
    with pytest.raises(RunError, match="--task 3: .* has completed 2 task"):
        diagnose_run(run, task=3)

    learn(run, new)
    results = json.loads((run / "results.json").read_text())
    d = diagnose_run(run)
    assert d["after_task"] == 3 and [r["n"] for r in d["tasks"]] == [6, 6, 6]
    for t, row in enumerate(d["tasks"]):  # the same test images, the same model: the row learn recorded
        assert row["acc"] == pytest.approx(results["accuracy_matrix"][2][t])


def test_diagnose_a_calibrated_run_shows_its_head(tmp_path, capsys):
    """With ``method.calib`` the table is the calibrated head's (what the run evaluated) and the trained linear
    head is reported beside it on the same features."""
    cfg = from_dict(
        RunConfig,
        tiny_config(
            method={"name": "sdlora_calib", "calib": {"projection_dim": 16}},
            data={"train_per_class": 8, "test_per_class": 4},
            train={"epochs": 2},
        ),
    )
    results = run_experiment(cfg, tmp_path / "run")
    plain = run_experiment(
        from_dict(RunConfig, tiny_config(data={"train_per_class": 8, "test_per_class": 4}, train={"epochs": 2})),
        tmp_path / "plain",
    )
    d = diagnose_run(tmp_path / "run")
    assert d["head"].startswith("calibrated head: ridge") and "drift compensation linear" in d["head"]
    for t, row in enumerate(d["tasks"]):
        assert row["acc"] == pytest.approx(results["accuracy_matrix"][-1][t])
    # sdlora_calib trains as sdlora: its trained head scores what plain SD-LoRA's run scored
    for t, row in enumerate(d["trained_head_tasks"]):
        assert row["acc"] == pytest.approx(plain["accuracy_matrix"][-1][t])
    assert main(["diagnose", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "predicting with the calibrated head: ridge" in printed and "trained linear head on the same" in printed
    assert diagnose_run(tmp_path / "plain")["head"] == "trained linear head"
