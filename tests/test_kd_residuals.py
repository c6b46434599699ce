"""benchmarks/kd_residuals.py on a tiny finished SD-LoRA-KD run: the residuals it prints are the run's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine_helpers import tiny_config
from sdlora.config import RunConfig
from sdlora.configtools import from_dict
from sdlora.engine import run_experiment

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kd_residuals.py"
_spec = importlib.util.spec_from_file_location("kd_residuals", _PATH)
assert _spec is not None and _spec.loader is not None
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)


def test_kd_residuals_prints_what_the_run_compared_with_tau(tmp_path, capsys):
    cfg = tiny_config(
        method={"name": "sdlora_kd"}, data={"train_per_class": 8, "test_per_class": 4}, train={"epochs": 2}
    )
    results = run_experiment(from_dict(RunConfig, cfg), tmp_path / "run")
    assert kr.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "direction" not in line]
    assert [int(r[0]) for r in rows] == [1, 2]  # 3 tasks: directions 1 and 2 are fitted by the earlier ones
    # Nothing was absorbed in the run, so direction j is task j's, and its smallest residual is the one the run
    # reported at the end of task j.
    reports = [t["method_report"] for t in results["task_log"]]
    assert all(r["absorbed"] == 0 for r in reports)
    for row, report in zip(rows, reports[1:]):
        assert float(row[2]) == round(report["kd_residual_min"], 4)
        assert int(row[5]) == 0
    assert "kd_log" in out
    # --tau 2 counts every projection (a relative residual is at most 1).
    assert kr.main([str(tmp_path / "run"), "--tau", "2"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert all(int(r[5]) == int(r[1]) for r in rows if "direction" not in r[0])


def test_kd_residuals_refuses_what_it_cannot_read(tmp_path, capsys):
    cfg = tiny_config(method={"name": "simplecil"}, data={"train_per_class": 4, "test_per_class": 2})
    run_experiment(from_dict(RunConfig, cfg), tmp_path / "ncm")
    assert kr.main([str(tmp_path / "ncm"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "has no SD-LoRA adapter" in err and "missing is not a run directory (no config.yaml)" in err
