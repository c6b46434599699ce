"""Runs on Hugging Face datasets (``data.name: hf``), offline: ``sdlora run``, ``--resume``, ``learn --data
hf:...``, ``predict RUN hf:...`` and ``check-data``. The reference is the same samples read from an image folder
or a JSON-lines file: the run must give exactly the same accuracy matrix."""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: it reads these once
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine_helpers import folder_config, write_config, write_image_folder  # noqa: E402
from sdlora.cli import main  # noqa: E402
from sdlora.config import RunConfig  # noqa: E402
from sdlora.configtools import from_dict  # noqa: E402
from sdlora.engine import run_experiment  # noqa: E402
from sdlora.learn import learn  # noqa: E402
from sdlora.predict import Predictor, collect_dataset_images, collect_texts, load_run  # noqa: E402
from sdlora.rundir import RunError  # noqa: E402

datasets = pytest.importorskip("datasets", reason="the hf data source needs `pip install sdlora[hf]`")

from data.test_hf_data import folder_as_hf  # noqa: E402


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _run(base: Path, name: str, cfg: dict, *extra: str) -> Path:
    out = base / name
    assert main(["-q", "run", str(write_config(base / f"{name}.yaml", cfg)), "--out", str(out), *extra]) == 0
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_image_run_learn_predict_and_resume_on_a_saved_dataset(tmp_path, capsys):
    counts = {"a": 3, "b": 3, "c": 3}
    folder = write_image_folder(tmp_path / "folder", counts, dict.fromkeys(counts, 2))
    folder_as_hf(folder).save_to_disk(str(tmp_path / "disk"))
    ref = _run(tmp_path, "ref", folder_config(folder))
    hf_cfg = folder_config(folder, data={"name": "hf", "root": str(tmp_path / "disk")})
    assert main(["check-data", str(write_config(tmp_path / "check.yaml", hf_cfg))]) == 0
    assert "decoded 15 dataset images: 0 unreadable" in capsys.readouterr().out
    run = _run(tmp_path, "hf", hf_cfg)
    got, want = _results(run), _results(ref)
    assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["class_names"] == want["class_names"]
    assert got["dataset"]["format"] == "disk" and got["data_identity"]["name"] == "hf"

    # learn: new classes from a parquet file with one split (split here), named with hf:
    new = write_image_folder(tmp_path / "new", {"d": 4, "e": 4}, {"d": 1, "e": 1})
    folder_as_hf(new)["train"].to_parquet(str(tmp_path / "new.parquet"))
    report = learn(run, f"hf:{tmp_path / 'new.parquet'}")
    assert report.class_names == ["d", "e"] and not report.skipped
    res = _results(run)
    assert res["learned_tasks"][0]["dataset"] == "hf" and res["learned_tasks"][0]["format"] == "files"
    assert res["class_names"][-2:] == ["d", "e"] and len(res["accuracy_matrix"]) == 3

    # predict on a dataset split: the same predictions as on the image files themselves
    loaded = load_run(run, device="cpu")
    rows, problems = collect_dataset_images([f"hf:{tmp_path / 'disk'}:test"], loaded.config.data)
    assert not problems and len(rows) == 6
    files = sorted(str(p) for p in (folder / "test").rglob("*.png"))
    by_rows, _ = Predictor(loaded).predict(rows, top_k=2)
    by_files, _ = Predictor(loaded).predict(files, top_k=2)
    assert [p.indices for p in by_rows] == [p.indices for p in by_files]
    assert by_rows[0].input == f"hf:{tmp_path / 'disk'}:test#0"
    assert main(["predict", str(run), f"hf:{tmp_path / 'disk'}", "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 7
    assert main(["predict", str(run), f"hf:{tmp_path / 'disk'}:nope"]) == 2
    assert "no split 'nope' (splits: train, test)" in capsys.readouterr().err

    # resume: a dataset whose pixels changed is refused, naming what changed
    killed = _run(tmp_path, "killed", hf_cfg)
    for p in (killed / "checkpoints").glob("task_001*"):
        p.unlink()
    res = _results(killed)
    (killed / "results.json").write_text(json.dumps({**res, "status": "running"}))
    edited = folder_as_hf(folder)
    edited["train"] = edited["train"].map(
        lambda row, i: {"image": row["image"].rotate(90)} if i == 0 else {}, with_indices=True
    )
    edited.save_to_disk(str(tmp_path / "disk2"))
    (tmp_path / "disk").rename(tmp_path / "disk0")
    (tmp_path / "disk2").rename(tmp_path / "disk")
    with pytest.raises(RunError, match=r"(?s)not the data this run started with.*training samples changed"):
        run_experiment(from_dict(RunConfig, hf_cfg), killed, resume=True)
    shutil.rmtree(tmp_path / "disk")
    (tmp_path / "disk0").rename(tmp_path / "disk")
    run_experiment(from_dict(RunConfig, hf_cfg), killed, resume=True)  # the same data resumes
    assert _results(killed)["accuracy_matrix"] == want["accuracy_matrix"]


def test_text_run_and_learn_on_hf_text(tmp_path, tiny_bert_dir):
    from hf_helpers import class_texts, hf_text_config, write_jsonl

    rows = [(t, f"c{c}") for t, c in class_texts(4, 6)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}, features=feats
    ).to_parquet(str(tmp_path / "d.parquet"))
    ref = _run(tmp_path, "ref", hf_text_config(tiny_bert_dir, tmp_path / "d.jsonl", scenario={"shuffle": False}))
    cfg = hf_text_config(tiny_bert_dir, tmp_path / "d.parquet", scenario={"shuffle": False})
    cfg["data"]["name"] = "hf"
    run = _run(tmp_path, "hf", cfg)
    assert _results(run)["accuracy_matrix"] == _results(ref)["accuracy_matrix"]
    new = [(t, f"c{c}") for t, c in class_texts(6, 6, seed=3) if c >= 4]
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in new], "label": [lab for _, lab in new]}, features=feats)
    datasets.DatasetDict(train=ds, test=ds.select(range(0, len(ds), 3))).save_to_disk(str(tmp_path / "new"))
    report = learn(run, tmp_path / "new")  # a save_to_disk directory: read as hf without the prefix
    assert report.class_names == ["c4", "c5"] and _results(run)["learned_tasks"][0]["dataset"] == "hf"
    loaded = load_run(run, device="cpu")
    texts, problems = collect_texts([f"hf:{tmp_path / 'new'}"], loaded.config.data)
    assert not problems and len(texts) == 4 and texts[0].source == f"hf:{tmp_path / 'new'}:test#0"
    preds = Predictor(loaded).predict_texts(texts)
    assert len(preds) == 4 and all(p.label in loaded.class_names for p in preds)
