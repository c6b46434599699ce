"""``sdlora compare``: one run directory per (method, seed), finished runs reused, unfinished resumed, failures
isolated."""

from __future__ import annotations

import csv
import json

import pytest
from method_helpers import two_task_config

import sdlora.engine as engine
from engine_helpers import write_config
from sdlora.compare import run_compare, run_dir_for
from sdlora.engine import RunError


@pytest.fixture
def config_file(tmp_path):
    cfg = two_task_config("sdlora", data={"train_per_class": 6, "test_per_class": 3}, train={"epochs": 1})
    return str(write_config(tmp_path / "tiny.yaml", cfg))


def _spy(monkeypatch):
    calls = []
    real = engine.run_experiment

    def spy(cfg, out, **kw):
        calls.append((cfg.method.name, cfg.seed, kw.get("resume", False)))
        return real(cfg, out, **kw)

    monkeypatch.setattr(engine, "run_experiment", spy)
    return calls


def test_compare_runs_each_method_and_seed_then_reuses_them(tmp_path, config_file, monkeypatch):
    calls = _spy(monkeypatch)
    out = tmp_path / "cmp"
    table = run_compare(config_file, ["simplecil", "seq_lora"], [1, 2], out, ["train.lr=0.02"])
    assert sorted(calls) == [
        ("seq_lora", 1, False),
        ("seq_lora", 2, False),
        ("simplecil", 1, False),
        ("simplecil", 2, False),
    ]
    for method in ("simplecil", "seq_lora"):
        for seed in (1, 2):
            saved = json.loads((run_dir_for(out, method, seed) / "results.json").read_text())
            assert saved["status"] == "finished" and saved["seed"] == seed and saved["method"] == method
    assert (out / "compare.md").read_text() == table
    assert "simplecil" in table and "seq_lora" in table
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["simplecil", "seq_lora"] and all(r["n_runs"] == "2" for r in rows)
    assert (out / "plots" / "compare_curves.png").is_file()

    # Second call: nothing is recomputed.
    calls.clear()
    mtime = (run_dir_for(out, "seq_lora", 1) / "results.json").stat().st_mtime_ns
    again = run_compare(config_file, ["simplecil", "seq_lora"], [1, 2], out, ["train.lr=0.02"])
    assert calls == [] and again == table
    assert (run_dir_for(out, "seq_lora", 1) / "results.json").stat().st_mtime_ns == mtime

    # An unfinished run (killed after task 1) is resumed, not restarted.
    run_dir = run_dir_for(out, "seq_lora", 2)
    saved = json.loads((run_dir / "results.json").read_text())
    saved["status"] = "running"
    (run_dir / "results.json").write_text(json.dumps(saved))
    (run_dir / "checkpoints" / "task_001.json").unlink()
    run_compare(config_file, ["simplecil", "seq_lora"], [1, 2], out, ["train.lr=0.02"])
    assert calls == [("seq_lora", 2, True)]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"

    # A finished run made with another config is not silently reused.
    with pytest.raises(RunError, match="another config"):
        run_compare(config_file, ["simplecil"], [1], out, ["train.lr=0.05"])


def test_compare_keeps_the_others_when_one_method_fails(tmp_path, config_file, monkeypatch):
    real = engine.run_experiment

    def failing(cfg, out, **kw):
        if cfg.method.name == "seq_lora":
            raise RuntimeError("boom")
        return real(cfg, out, **kw)

    monkeypatch.setattr(engine, "run_experiment", failing)
    out = tmp_path / "cmp"
    with pytest.raises(RunError, match=r"(?s)1 compare run\(s\) failed.*seq_lora.*boom"):
        run_compare(config_file, ["seq_lora", "simplecil"], None, out)
    table = (out / "compare.md").read_text()
    assert "simplecil" in table and "seq_lora" not in table
    # No --seeds: the config's seed (7) names the run directory.
    assert (run_dir_for(out, "simplecil", 7) / "results.json").is_file()


def test_compare_rejects_unknown_or_repeated_methods(tmp_path, config_file):
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(config_file, ["sdlora", "nope"], None, tmp_path / "x")
    with pytest.raises(ValueError, match="more than once"):
        run_compare(config_file, ["sdlora", "sdlora"], None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
