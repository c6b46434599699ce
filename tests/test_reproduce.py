"""``sdlora reproduce``: a tiny end-to-end reproduction on generated data, the table cells, the plan, torchrun."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from engine_helpers import tiny_config, write_config
from sdlora import reproduce
from sdlora.cli import main
from sdlora.reproduce import PaperTable, Reference, Setting, resolve_tables, run_reproduction


def _tiny_table(tmp_path: Path) -> dict[str, PaperTable]:
    presets = {}
    for protocol, optimizer in (("official", "sgd"), ("paper", "adam")):
        cfg = tiny_config(
            name=f"tiny_{protocol}",
            method={"name": "sdlora", "adapter": {"rank": 2, "protocol": protocol}},
            data={"synthetic_classes": 4, "train_per_class": 4, "test_per_class": 2},
            train={"epochs": 1, "optimizer": optimizer, "checkpoint": True},
        )
        presets[protocol] = str(write_config(tmp_path / f"tiny_{protocol}.yaml", cfg))
    ref = Reference(50.0, 1.0, 60.0, 1.0, 55.0, 65.0, "tiny.log")
    return {"tiny": PaperTable("tiny", "A tiny table", (Setting("tiny_n2", "Tiny N=2", None, presets, ref),))}


def test_a_tiny_reproduction_writes_one_table_with_ours_and_the_references(tmp_path, monkeypatch):
    from sdlora.results import load_results

    tables = resolve_tables(["tiny"], _tiny_table(tmp_path))
    out = tmp_path / "out"
    text = run_reproduction(tables, tmp_path / "data", out, seeds=[1, 2])
    rows = list(csv.DictReader((out / "tables" / "tiny.csv").open()))
    assert [(r["protocol"], r["metric"]) for r in rows] == [
        ("official", "Acc"), ("official", "AAA"), ("paper", "Acc"), ("paper", "AAA"),
    ]  # fmt: skip
    for r in rows:
        metric = r["metric"].lower()
        values = [load_results(out / "runs" / f"tiny_{r['protocol']}" / "sdlora" / f"seed{s}")[metric] for s in (1, 2)]
        mean = sum(values) / 2
        assert r["ours"].startswith(f"{mean:.2f} ± ")
        assert r["seeds"] == "2/2"
        paper = 50.0 if metric == "acc" else 60.0
        assert r["ours - paper"] == f"{mean - paper:+.2f}"
        inside = min(values) <= paper <= max(values)
        assert r["paper vs seeds"] == ("within" if inside else "outside")
    assert "| Tiny N=2 | official | Acc |" in (out / "tables" / "tiny.md").read_text()
    assert text == (out / "tables" / "tiny.md").read_text()

    # a second call reuses every finished run: nothing trains again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("sdlora.engine.run_experiment", no_training)
    assert run_reproduction(tables, tmp_path / "data", out, seeds=[1, 2]) == text


def test_a_killed_reproduction_resumes_the_unfinished_run(tmp_path, monkeypatch):
    import json

    import sdlora.engine

    tables = resolve_tables(["tiny"], _tiny_table(tmp_path))
    out = tmp_path / "out"
    run_reproduction(tables, tmp_path / "data", out, seeds=[1], protocols=["official"])
    run_dir = out / "runs" / "tiny_official" / "sdlora" / "seed1"
    # as if killed after task 1: drop the later checkpoints and mark the record unfinished
    for f in sorted((run_dir / "checkpoints").iterdir()):
        if not f.name.startswith("task_000"):
            f.unlink()
    res = json.loads((run_dir / "results.json").read_text())
    res["status"] = "running"
    (run_dir / "results.json").write_text(json.dumps(res))
    original, calls = sdlora.engine.run_experiment, []

    def spy(cfg, out_dir, **kwargs):
        calls.append(kwargs["resume"])
        return original(cfg, out_dir, **kwargs)

    monkeypatch.setattr(sdlora.engine, "run_experiment", spy)
    run_reproduction(tables, tmp_path / "data", out, seeds=[1], protocols=["official"])
    assert calls == [True]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and len(res["acc_after_task"]) == 2


@pytest.mark.parametrize(
    ("values", "ref", "mark"),
    [
        ([1.0, 3.0], 2.0, "within"),
        ([1.0, 3.0], 3.0, "within"),
        ([1.0, 3.0], 3.5, "outside"),
        ([2.0], 2.0, "n/a (1 seed)"),
    ],
)
def test_a_reference_is_within_when_it_lies_in_the_seeds_range(values, ref, mark):
    assert reproduce._mark(values, ref) == mark


def test_the_reference_numbers_are_the_papers(tmp_path):
    # one spot check per table against docs/method.md §5.1 / §5.4, so an edited number is noticed
    settings = {s.key: s.reference for t in reproduce.PAPER_TABLES.values() for s in t.settings}
    assert (settings["imagenet_r_n10"].acc, settings["imagenet_r_n10"].log_acc) == (77.34, 78.17)
    assert (settings["domainnet_n5"].aaa, settings["domainnet_n5"].log_aaa) == (78.89, None)
    assert (settings["cifar100_n10"].acc_se, settings["cifar100_n10"].log_name) == (0.31, "C100")
    assert len(settings) == 7


def test_gpus_above_one_runs_each_preset_under_torchrun(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, check: calls.append(cmd) or Done())
    tables = resolve_tables(["tiny"], _tiny_table(tmp_path))
    run_reproduction(tables, tmp_path / "data", tmp_path / "out", seeds=[1, 2], gpus=4, overrides=["train.epochs=2"])
    assert len(calls) == 2
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == [
        "-m", "sdlora", "compare", str(tmp_path / "tiny_official.yaml"), "--methods", "sdlora", "--seeds", "1,2",
        "--out", str(tmp_path / "out" / "runs" / "tiny_official"), "--set", "train.epochs=2",
    ]  # fmt: skip
    # nothing finished: the table says so instead of inventing numbers
    assert "not finished" in (tmp_path / "out" / "tables" / "tiny.md").read_text()


def test_dry_run_on_the_paper_tables_prints_the_plan(tmp_path, capsys):
    assert main(["reproduce", "table1", "--root", str(tmp_path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "imagenet_r: 3 file(s)" in text
    assert text.count("seed 199") == 18  # 3 settings x 2 protocols x 3 seeds
    assert "PROJECTED, NOT MEASURED" in text
    assert not (tmp_path / "o").exists()
    # data already there is not counted again
    (tmp_path / "imagenet-r").mkdir()
    assert main(["reproduce", "table1", "--root", str(tmp_path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "imagenet-r exists (not made by 'sdlora data get'" in text and "about 0.0 GB" in text


def test_missing_data_names_the_data_get_command(tmp_path, capsys):
    assert main(["reproduce", "table3", "--root", str(tmp_path), "--seeds", "1993", "--out", str(tmp_path / "o")]) == 2
    assert "sdlora data get imagenet_a --root" in capsys.readouterr().err


def test_unknown_table_and_protocol_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown table 'table9'"):
        resolve_tables(["table9"])
    with pytest.raises(ValueError, match="unknown protocol"):
        run_reproduction(resolve_tables(["table2"]), tmp_path, tmp_path / "o", protocols=["mine"], dry_run=True)
