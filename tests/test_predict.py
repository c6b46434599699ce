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


# ------------------------------------------------------------------------------------ Hugging Face backbones
TEXT_CLASSES = ["c0", "c1", "c2", "c3"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert_dir) -> Path:
    """A two-task SD-LoRA run on a tiny BERT over a text file of four classes (split here)."""
    from hf_helpers import class_texts, hf_text_config, write_jsonl

    base = tmp_path_factory.mktemp("predict-text")
    data = write_jsonl(base / "d.jsonl", [(t, TEXT_CLASSES[c]) for t, c in class_texts(4, 8, seed=3)])
    run = base / "run"
    assert (
        main(["-q", "run", str(write_config(base / "c.yaml", hf_text_config(tiny_bert_dir, data))), "--out", str(run)])
        == 0
    )
    return run


def _engine_eval(method, x) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method(x)


def test_text_predict_equals_the_engine_evaluation(text_run, tmp_path):
    from sdlora.backbones.hf import load_tokenizer
    from sdlora.data import load_raw_dataset
    from sdlora.predict import collect_texts

    results = json.loads((text_run / "results.json").read_text())
    method, cfg, _ = build_method_from_run(text_run)
    tokenizer = load_tokenizer(cfg.backbone)
    data = build_dataset(cfg.data, mean=[0.0] * 3, std=[1.0] * 3, seed=cfg.seed, tokenizer=tokenizer)
    texts = load_raw_dataset(cfg.data, cfg.seed).test.texts
    assert texts is not None and len(texts) == len(data.test) == 8
    # The engine's evaluation: the unmerged method on the run's tokenised test split; it is the accuracy recorded.
    batch = {k: torch.stack([data.test[i][0][k] for i in range(len(texts))]) for k in data.test[0][0]}
    engine_logits = _engine_eval(method, batch)
    position = {c: i for i, c in enumerate(results["class_order"])}
    labels = [position[int(t)] for t in data.test_targets]
    correct = [0, 0]
    for pred, y in zip(engine_logits.argmax(1).tolist(), labels):
        correct[y // 2] += int(pred == y)
    assert [100.0 * c / 4 for c in correct] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-6)
    # predict on the same texts, one per line of a file (blank lines skipped, line numbers kept)
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"{t}\n\n" for t in texts), encoding="utf-8")
    loaded = load_run(text_run, device="cpu")
    assert loaded.modality == "text" and loaded.method.adapter.merged
    items, problems = collect_texts([str(notes)], loaded.config.data)
    assert not problems and [i.source for i in items] == [f"{notes}:{2 * k + 1}" for k in range(8)]
    preds = Predictor(loaded, batch_size=3).predict_texts(items, top_k=2)
    assert [p.indices[0] for p in preds] == engine_logits.argmax(1).tolist()
    top = torch.softmax(engine_logits, 1).topk(2, 1)
    torch.testing.assert_close(torch.tensor([p.scores for p in preds]), top.values, atol=1e-5, rtol=1e-5)
    names = [TEXT_CLASSES[c] for c in results["class_order"][:4]]
    assert loaded.class_names == names and [p.text for p in preds] == texts


def test_text_predict_cli_tables_and_unreadable_files(text_run, tmp_path, capsys):
    texts = ["the cat and a dog", ("a new boat " * 12).strip(), "old food"]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("id,text\n1,the cat and a dog\n2,old food\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "old food", "label": "ignored"}\n', encoding="utf-8")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "nocol.csv").write_text("sentence\nhello\n")
    inputs = [str(tmp_path / n) for n in ("a.txt", "b.csv", "c.jsonl", "bin.txt", "empty.txt", "nocol.csv")]
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(text_run), *inputs, "--top-k", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 unreadable input(s)" in err and "Traceback" not in err
    assert "bin.txt: not UTF-8" in err and "empty.txt: no text" in err
    assert "nocol.csv:1: header has no column 'text'" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == [
        f"{tmp_path}/a.txt:1", f"{tmp_path}/a.txt:2", f"{tmp_path}/a.txt:3",
        f"{tmp_path}/b.csv:2", f"{tmp_path}/b.csv:3", f"{tmp_path}/c.jsonl:1",
    ]  # fmt: skip
    assert [r["text"] for r in rows] == [*texts, texts[0], texts[2], texts[2]]
    # the same text gets the same prediction whichever file holds it (and whichever batch)
    assert rows[0]["top_k"] == rows[3]["top_k"] and rows[2]["top_k"] == rows[4]["top_k"] == rows[5]["top_k"]
    assert all(len(r["top_k"]) == 2 and r["label"] in TEXT_CLASSES for r in rows)
    # terminal: file:line, the text cut short, the labels
    assert main(["predict", str(text_run), str(tmp_path / "a.txt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith(f"{tmp_path}/a.txt:2\t'a new boat") and "...'\t" in lines[1]
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(text_run), str(tmp_path / "b.csv"), "--out", str(csv_out)]) == 0
    assert csv_out.read_text().splitlines()[0] == "input,text,label,score"
    # --strict: the unreadable file is named, nothing written; nothing readable at all: exit 2
    assert main(["predict", str(text_run), inputs[0], inputs[3], "--strict", "--out", str(tmp_path / "s.csv")]) == 2
    assert "bin.txt" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()
    assert main(["predict", str(text_run), inputs[4]]) == 2
    assert "no input to classify" in capsys.readouterr().err


def test_hf_vision_predict_uses_the_runs_preprocessing(tmp_path, tiny_vit_dir):
    """An HF ViT whose image processor normalises with its own mean/std: predict equals the engine's evaluation."""
    data = tmp_path / "data"
    _write_folder(data / "train", dict.fromkeys(CLASSES[:2], 4), seed=0)
    _write_folder(data / "test", dict.fromkeys(CLASSES[:2], 3), seed=1)
    cfg = tiny_config(
        backbone={"name": f"hf:{tiny_vit_dir}", "pretrained": True, "normalize": "backbone"},
        data={"name": "imagefolder", "root": str(data), "train_per_class": None, "test_per_class": None},
        scenario={"init_cls": 1, "increment": 1},
        train={"epochs": 2, "threads": 1},
    )
    run = tmp_path / "run"
    assert main(["-q", "run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run)]) == 0
    method, rcfg, _ = build_method_from_run(run)
    info = method.backbone_info
    assert info["mean"] != [0.0, 0.0, 0.0] and info["library"] == "transformers"
    ds = build_dataset(rcfg.data, mean=info["mean"], std=info["std"], seed=rcfg.seed)
    engine_logits = _engine_eval(method, torch.stack([ds.test[i][0] for i in range(len(ds.test))]))
    preds, failures = Predictor(load_run(run, device="cpu")).predict(list(ds.test.paths), top_k=2)
    assert not failures and [p.indices[0] for p in preds] == engine_logits.argmax(1).tolist()
    top = torch.softmax(engine_logits, 1).topk(2, 1)
    torch.testing.assert_close(torch.tensor([p.scores for p in preds]), top.values, atol=1e-5, rtol=1e-5)


def _with_alarm(seconds: int, fn, *args):
    """``fn(*args)``, failed (instead of hanging the suite) when it runs longer than ``seconds``."""
    import signal

    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_looping_directory_links_do_not_hang_folder_or_glob_inputs(tmp_path, monkeypatch):
    """Issue 22, item 2: ``up -> ..`` links made predict's folder walk and ``**`` glob run for minutes."""
    import os

    for d in ("a", "a/b"):
        (tmp_path / "imgs" / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / d / "x.png")
    os.symlink("..", tmp_path / "imgs" / "a" / "b" / "up")
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "a" / "top")
    want = [str(tmp_path / "imgs" / "a" / "b" / "x.png"), str(tmp_path / "imgs" / "a" / "x.png")]
    files, problems = _with_alarm(20, collect_inputs, [str(tmp_path / "imgs")])
    assert sorted(files) == want and not problems
    files, problems = _with_alarm(20, collect_inputs, [str(tmp_path / "imgs" / "**" / "*.png")])
    assert sorted(files) == want and not problems
    monkeypatch.chdir(tmp_path / "imgs")
    files, _ = _with_alarm(20, collect_inputs, ["**/*.png"])
    assert sorted(files) == ["a/b/x.png", "a/x.png"]


def test_out_is_checked_before_the_work_and_write_errors_are_one_line(trained, tmp_path, monkeypatch, capsys):
    """Issue 22, item 9: --out was checked only after every input was classified (a wrong path threw the job away)
    and a read-only folder gave a raw OSError."""
    import sdlora.predict

    run, data = trained
    image = str(next((data / "test").rglob("*.png")))

    def no_work(*args, **kwargs):
        raise AssertionError("the run was loaded before --out was checked")

    with monkeypatch.context() as m:
        m.setattr(sdlora.predict, "load_run", no_work)
        for bad, why in ((tmp_path / "missing" / "p.csv", "does not exist"), (tmp_path / "p.txt", ".csv or .jsonl")):
            assert main(["predict", str(run), image, "--device", "cpu", "--out", str(bad)]) == 2
            assert why in capsys.readouterr().err

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sdlora.predict, "atomic_write_text", read_only)
    assert main(["predict", str(run), image, "--device", "cpu", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the predictions: Permission denied" in err and "Traceback" not in err
