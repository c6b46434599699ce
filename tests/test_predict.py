"""``sdlora predict``: the merged run classifies files as the engine's evaluation did; bad inputs are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_helpers import tiny_config, write_config
from sdlora.cli import main
from sdlora.data import build_dataset
from sdlora.engine import build_method_from_run
from sdlora.predict import PredictError, Prediction, Predictor, collect_inputs, load_run, write_predictions

CLASSES = ["apple", "bus", "cat", "dog"]


def _write_folder(root: Path, per_class: dict[str, int], seed: int) -> None:
    """Class-dependent colour plus noise, PNG (lossless, so file and engine inputs are the same pixels)."""
    rng = np.random.default_rng(seed)
    for ci, (name, n) in enumerate(per_class.items()):
        for i in range(n):
            img = rng.integers(0, 90, size=(20, 24, 3)).astype(np.int64)
            img[..., ci % 3] += 60 + 40 * ci
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A two-task SD-LoRA run on a tiny pre-split image folder (4 classes)."""
    base = tmp_path_factory.mktemp("predict")
    data = base / "data"
    _write_folder(data / "train", dict.fromkeys(CLASSES, 6), seed=0)
    _write_folder(data / "test", dict.fromkeys(CLASSES, 3), seed=1)
    cfg = tiny_config(
        data={"name": "imagefolder", "root": str(data), "train_per_class": None, "test_per_class": None},
        scenario={"num_tasks": 2},
        train={"epochs": 3, "threads": 1},
    )
    run = base / "run"
    assert main(["-q", "run", str(write_config(base / "cfg.yaml", cfg)), "--out", str(run)]) == 0
    return run, data


def test_predict_equals_the_engine_evaluation(trained):
    run, _ = trained
    results = json.loads((run / "results.json").read_text())
    # The engine's evaluation path: the method as trained (not merged), the run's test dataset and transform.
    method, cfg, _ = build_method_from_run(run)
    method.eval()
    info = method.backbone_info
    data = build_dataset(cfg.data, mean=info["mean"], std=info["std"], seed=cfg.seed)
    position = {c: i for i, c in enumerate(results["class_order"])}
    paths = list(data.test.paths)
    labels = [position[int(t)] for t in data.test_targets]
    with torch.no_grad():
        engine_logits = torch.cat([method(data.test[i][0][None]) for i in range(len(paths))])
    engine_pred = engine_logits.argmax(1).tolist()
    # The engine's own accuracy (results.json) agrees with these predictions ...
    correct = [0, 0]
    for pred, y in zip(engine_pred, labels):
        correct[y // 2] += int(pred == y)
    assert [100.0 * c / 6 for c in correct] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-6)
    # ... and predict, with its merged model, gives the same classes, named as in the training data.
    loaded = load_run(run, device="cpu")
    assert loaded.method.adapter.merged
    preds, failures = Predictor(loaded, batch_size=5).predict(paths, top_k=3)
    assert not failures and [p.input for p in preds] == paths
    assert [p.indices[0] for p in preds] == engine_pred
    # same scores too (softmax of the same logits; merged vs unmerged differ only by float rounding)
    top = torch.softmax(engine_logits, 1).topk(3, 1)
    torch.testing.assert_close(torch.tensor([p.scores for p in preds]), top.values, atol=1e-5, rtol=1e-5)
    names = [CLASSES[c] for c in results["class_order"]]
    assert loaded.class_names == names
    assert all(p.labels == [names[i] for i in p.indices] for p in preds)
    assert all(p.scores == sorted(p.scores, reverse=True) and 0 < p.score <= 1 for p in preds)


def test_unreadable_inputs_are_named(trained, tmp_path, capsys):
    run, data = trained
    good = sorted((data / "test" / "cat").glob("*.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = tmp_path / "pred.csv"
    args = ["predict", str(run), str(good[0]), str(corrupt), str(text), str(tmp_path / "missing.png")]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 unreadable input(s)" in err
    for bad in ("corrupt.png", "notes.txt", "missing.png"):
        assert bad in err
    assert "Traceback" not in err
    rows = out.read_text().splitlines()
    assert rows[0] == "input,label,score" and len(rows) == 2 and rows[1].startswith(str(good[0]))
    # --strict: an error naming the file, exit code 2, nothing written
    out2 = tmp_path / "strict.csv"
    assert main(["predict", str(run), str(good[0]), str(corrupt), "--strict", "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "Traceback" not in err and not out2.exists()
    # nothing readable at all: exit 2
    assert main(["predict", str(run), str(text)]) == 2
    assert "none of the 1 input file(s) could be read" in capsys.readouterr().err


def test_folders_globs_and_output_formats(trained, tmp_path, capsys):
    run, data = trained
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((data / "test" / "dog").glob("*.png"))[:2]):
        (tmp_path / "in" / "sub" / f"d{i}.png").write_bytes(src.read_bytes())
    (tmp_path / "in" / "README.md").write_text("ignored inside folders")
    files, problems = collect_inputs([str(tmp_path / "in"), str(tmp_path / "in" / "sub" / "*.png"), "nope*.png"])
    assert [Path(f).name for f in files] == ["d0.png", "d1.png"]  # recursive, deduplicated, README ignored
    assert problems == [("nope*.png", "pattern matches no file")]
    assert main(["predict", str(run), str(tmp_path / "in"), "--top-k", "2", "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.count("(") == 2 for line in lines)
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), str(tmp_path / "in"), "--top-k", "9", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["top_k"]) == 4 for r in records)  # k capped at the seen classes
    assert all(r["label"] == r["top_k"][0]["label"] for r in records)


def test_write_predictions_formats(tmp_path):
    preds = [Prediction("a.png", ["x", "y"], [0.75, 0.25], [1, 0]), Prediction("b,c.png", ["y", "x"], [0.5, 0.5])]
    write_predictions(preds, tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "input,label,score,label_2,score_2",
        "a.png,x,0.750000,y,0.250000",
        '"b,c.png",y,0.500000,x,0.500000',
    ]
    with pytest.raises(PredictError, match=".csv or .jsonl"):
        write_predictions(preds, tmp_path / "p.txt")
    with pytest.raises(PredictError, match="does not exist"):
        write_predictions(preds, tmp_path / "no" / "p.csv")


def test_simplecil_run_predicts(tmp_path):
    data = tmp_path / "data"
    _write_folder(data / "train", dict.fromkeys(CLASSES[:2], 4), seed=0)
    _write_folder(data / "test", dict.fromkeys(CLASSES[:2], 2), seed=1)
    cfg = tiny_config(
        method={"name": "simplecil"},
        data={"name": "imagefolder", "root": str(data), "train_per_class": None, "test_per_class": None},
        scenario={"init_cls": 1, "increment": 1},
    )
    run = tmp_path / "run"
    assert main(["-q", "run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run)]) == 0
    loaded = load_run(run, device="cpu")
    preds, _ = Predictor(loaded).predict([str(p) for p in sorted((data / "test").rglob("*.png"))])
    assert {p.label for p in preds} <= set(CLASSES[:2]) and len(preds) == 4
