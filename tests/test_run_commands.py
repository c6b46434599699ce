"""Every command that reads a run, on a run of every registered method, before and after ``sdlora learn``.

``predict``, ``export`` (merged and PEFT), ``diagnose``, ``report``, ``learn`` and ``run --resume`` must each read
the run as the same task with the same model: the class names and tasks of ``results.json``, the checkpoint that
``results.json`` commits to. A method a command cannot serve is refused with exit 2 and one line, never a
traceback (the prompt methods have no merged backbone; methods without a low-rank update no PEFT adapter).
Three methods (one per kind of classifier: a linear head, prototypes, a closed-form ridge head) run by
default, the others with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_helpers import tiny_config, write_config
from sdlora.cli import main
from sdlora.distributed import state_fingerprint
from sdlora.engine import build_method_from_run
from sdlora.methods import METHODS
from sdlora.predict import load_run
from test_learn import ALL, TINY_OPTIONS, _folder

FAST = {"sdlora", "simplecil", "ranpac"}
METHOD_PARAMS = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHODS)]


def _config(tmp_path: Path, method: str) -> Path:
    cfg = tiny_config(
        method={
            "name": method,
            **TINY_OPTIONS.get(method, {}),
        },
        data={"name": "imagefolder", "root": str(tmp_path / "first4"), "train_per_class": None},
        scenario={"shuffle": False},
        train={"epochs": 1, "threads": 1},
    )
    cfg["data"]["test_per_class"] = None
    return write_config(tmp_path / "run.yaml", cfg)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _every_reader(run: Path, tmp_path: Path, tag: str, names: list[str], capsys) -> None:
    """Run every command that reads ``run`` and check that each sees ``names`` (the classes ``results.json``
    commits to) and the committed model; none of them changes the run's record."""
    record = (run / "results.json").read_bytes()
    method, _, ck = build_method_from_run(run)
    assert int(ck["task"]) + 1 == _results(run)["completed_tasks"]
    fingerprint = state_fingerprint(method)
    loaded = load_run(run, device="cpu")
    assert loaded.class_names == names and loaded.completed_tasks == _results(run)["completed_tasks"]

    images = sorted(str(p) for p in (tmp_path / "first4" / "test").rglob("*.png"))[:3]
    out = tmp_path / f"pred-{tag}.csv"
    assert main(["-q", "predict", str(run), *images, "--device", "cpu", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 3 and all(r.split(",")[1] in names for r in rows)

    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"after task {len(_results(run)['tasks'])} of" in shown
    assert sum(line.startswith("task ") for line in shown.splitlines()) == len(_results(run)["tasks"])

    capsys.readouterr()
    rc = main(["-q", "export", str(run), "--out", str(tmp_path / f"merged-{tag}.safetensors")])
    err = capsys.readouterr().err
    if rc == 0:
        assert (tmp_path / f"merged-{tag}.safetensors").is_file()
    else:  # prompt methods: no merged backbone, refused in one line
        assert rc == 2 and err.count("\n") == 1 and "sdlora: error:" in err
    rc = main(["-q", "export", str(run), "--format", "peft", "--no-base", "--out", str(tmp_path / f"peft-{tag}")])
    err = capsys.readouterr().err
    if rc == 0:
        assert (tmp_path / f"peft-{tag}" / "labels.txt").read_text().splitlines() == names
    else:
        assert rc == 2 and err.count("\n") == 1 and "sdlora: error:" in err

    assert main(["report", str(run)]) == 0
    assert len((run / "accuracy_matrix.csv").read_text().strip().splitlines()) == len(_results(run)["tasks"]) + 1
    assert (run / "results.json").read_bytes() == record
    assert state_fingerprint(build_method_from_run(run)[0]) == fingerprint


@pytest.mark.parametrize("method", METHOD_PARAMS)
def test_every_command_reads_a_run_of_every_method_before_and_after_learn(tmp_path, method, capsys):
    _folder(tmp_path / "first4", ALL[:4])
    config = _config(tmp_path, method)
    run = tmp_path / "run"
    assert main(["-q", "run", str(config), "--out", str(run)]) == 0
    _every_reader(run, tmp_path, "before", ALL[:4], capsys)
    before = _results(run)

    # --resume of a finished run: nothing to train, the record rewritten with the same content
    assert main(["-q", "run", str(config), "--out", str(run), "--resume"]) == 0
    after_resume = _results(run)
    for key in ("class_names", "tasks", "class_order", "accuracy_matrix", "completed_tasks", "status"):
        assert after_resume[key] == before[key], key

    rc = main(["-q", "learn", str(run), "--data", str(_folder(tmp_path / "new", ["c4", "c5"]))])
    if rc != 0:  # a method that cannot learn past its scenario says so in one line and leaves the run as it was
        err = capsys.readouterr().err
        assert rc == 2 and "sdlora: error:" in err and _results(run) == after_resume
        return
    learned = _results(run)
    assert learned["class_names"] == ALL[:6] and learned["learned_tasks"][0]["class_names"] == ["c4", "c5"]
    _every_reader(run, tmp_path, "after", ALL[:6], capsys)

    # --resume on a learned run never rebuilds the record from the config's scenario: refused, nothing changed
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert main(["-q", "run", str(config), "--out", str(run), "--resume"]) == 2
    assert "sdlora learn" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"} == snapshot
    _every_reader(run, tmp_path, "again", ALL[:6], capsys)
