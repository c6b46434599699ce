"""Every registered method on Hugging Face backbones: a tiny BERT on text, a tiny HF ViT on images, two tasks each."""

from pathlib import Path

import pytest
import torch
from method_helpers import run_tiny

from engine_helpers import tiny_config
from hf_helpers import class_texts, hf_text_config, write_jsonl
from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.config import MethodConfig
from sdlora.configtools import from_dict
from sdlora.engine import build_method_from_run
from sdlora.methods import METHODS, create_method
from sdlora.methods.inflora import InfLoRALinear


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("text") / "d.jsonl", class_texts(4, 12))


#: Methods that prefix the attention of timm ViT blocks: on other backbones they refuse with a clear error.
TIMM_ONLY = {"l2p", "coda_prompt"}


@pytest.mark.parametrize("method", sorted(TIMM_ONLY))
def test_prompt_methods_refuse_a_text_backbone_clearly(method, tiny_bert_dir, text_file, tmp_path):
    cfg = hf_text_config(tiny_bert_dir, text_file, method=method)
    with pytest.raises(ValueError, match=r"timm ViT blocks.*ranpac, simplecil, seq_lora"):
        run_tiny(tmp_path / "run", cfg)


def test_compare_all_skips_what_cannot_run_on_the_backbone(tiny_bert_dir, text_file, tmp_path, monkeypatch):
    import sdlora.methods
    from engine_helpers import write_config
    from sdlora.compare import run_compare
    from sdlora.rundir import RunError

    # "all" is every registered method; two of them keep the test short: one that runs, one that refuses text
    monkeypatch.setattr(sdlora.methods, "METHODS", {m: METHODS[m] for m in ("simplecil", "l2p")})
    config = str(write_config(tmp_path / "text.yaml", hf_text_config(tiny_bert_dir, text_file, method="simplecil")))
    table = run_compare(config, ["all"], [1, 2], tmp_path / "all")
    assert "| simplecil |" in table and "| l2p |" not in table
    assert "Not run (the method cannot work on this backbone):\n\n- l2p: l2p prefixes the attention" in table
    assert not (tmp_path / "all" / "l2p" / "seed1" / "config.yaml").exists()
    # Named explicitly, it is a failed compare run, reported once for every seed; the others' table is written.
    with pytest.raises(RunError, match=r"1 compare run\(s\) failed.*\n  l2p \(every seed\): UnsupportedBackbone"):
        run_compare(config, ["simplecil", "l2p"], [1, 2], tmp_path / "all")
    with pytest.raises(ValueError, match="all stands alone"):
        run_compare(config, ["all", "l2p"], [1], tmp_path / "all")


@pytest.mark.parametrize("method", sorted(set(METHODS) - TIMM_ONLY))
def test_every_method_runs_two_tasks_on_a_text_backbone(method, tiny_bert_dir, text_file, tmp_path):
    cfg = hf_text_config(tiny_bert_dir, text_file, method=method)
    if method == "full_ft":
        cfg["train"]["lr"] = 1e-3
    trained_tasks = 2
    if method == "ranpac":  # a small projection (the default M = 10,000 is minutes on CPU); LoRA on task 1 only
        cfg["method"]["options"] = {"projection_dim": 64, "adapt_first_task": True}
        trained_tasks = 1
    if method.endswith("_calib"):  # a small projection of the frozen block (the default is 4,096)
        cfg["method"]["calib"] = {"projection_dim": 16}
    res = run_tiny(tmp_path / "run", cfg)
    assert res["status"] == "finished" and res["completed_tasks"] == 2
    assert res["backbone"]["modality"] == "text" and res["dataset"]["modality"] == "text"
    assert len(res["accuracy_matrix"]) == 2 and all(0.0 <= a <= 100.0 for a in res["acc_after_task"])
    if METHODS[method].trains:
        assert all(n > 0 for n in res["trainable_params_per_task"][:trained_tasks])
        assert all(entry["steps"] > 0 for entry in res["task_log"][:trained_tasks])
    # The checkpoint restores the same predictions (what export and --resume use).
    restored, run_cfg, _ = build_method_from_run(tmp_path / "run")
    assert run_cfg.backbone.name == f"hf:{tiny_bert_dir}"


@pytest.mark.parametrize("method", ["sdlora", "inflora", "simplecil", "full_ft"])
def test_methods_run_two_tasks_on_an_hf_vision_backbone(method, tiny_vit_dir, tmp_path):
    cfg = tiny_config(
        method={"name": method},
        backbone={"name": f"hf:{tiny_vit_dir}", "pretrained": True},
        scenario={"num_tasks": 2},
        data={"train_per_class": 8, "test_per_class": 4},
        train={"epochs": 1, "threads": 1, "lr": 1e-3 if method == "full_ft" else 0.01},
    )
    res = run_tiny(tmp_path / "run", cfg)
    assert res["status"] == "finished" and res["completed_tasks"] == 2
    assert res["backbone"]["library"] == "transformers" and res["backbone"]["modality"] == "image"


def test_inflora_adapts_key_and_value_of_a_bert(tiny_bert_dir):
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name=f"hf:{tiny_bert_dir}"), 32)
    method = create_method(from_dict(MethodConfig, {"name": "inflora"}), backbone)
    adapted = sorted(n for n, m in method.model.named_modules() if isinstance(m, InfLoRALinear))
    assert adapted == [f"hf.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("key", "value")]


def test_inflora_without_key_value_projections_says_why(tiny_bert_dir):
    backbone = create_backbone(BackboneConfig(name=f"hf:{tiny_bert_dir}"), 32)
    backbone.attention_targets = {}
    with pytest.raises(ValueError, match="inflora adapts the attention key and value projections"):
        create_method(from_dict(MethodConfig, {"name": "inflora"}), backbone)


def test_sdlora_on_bert_learns_a_text_task(tiny_bert_dir, tmp_path):
    """Not only runs: a separable two-class text task is learned (guards a silently broken text path: all-[UNK]
    tokens or pooling over padding give near-constant features, chance accuracy and a loss near ln 2)."""
    data = write_jsonl(tmp_path / "d.jsonl", class_texts(2, 40, seed=3))
    no_dropout = {"kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
    cfg = hf_text_config(
        tiny_bert_dir, data, train={"epochs": 8, "lr": 0.03}, scenario={"num_tasks": 1}, backbone=no_dropout
    )
    res = run_tiny(tmp_path / "run", cfg)
    assert res["task_log"][0]["loss"] < 0.5 and res["accuracy_matrix"][0][0] >= 75.0


def test_inflora_covariance_leaves_out_padding(tiny_bert_dir):
    """A batch of a short and a long text gives the covariance of the two texts' own tokens: the sum of the
    covariances of each text alone (batches of one have no padding)."""
    from method_helpers import make_ctx

    from sdlora.data import encode_texts

    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name=f"hf:{tiny_bert_dir}"), 32)
    method = create_method(from_dict(MethodConfig, {"name": "inflora"}), backbone)
    texts = ["cat", "the small red dog and a large blue boat of the tree"]
    both = encode_texts(backbone.tokenizer, texts, 16)
    alone = [encode_texts(backbone.tokenizer, [t], 16) for t in texts]
    y = torch.tensor([0, 1])
    cov_both = method.input_covariances(make_ctx(0, 0, 2, [(both, y)]))
    cov_alone = method.input_covariances(make_ctx(0, 0, 2, [(a, y[i : i + 1]) for i, a in enumerate(alone)]))
    for a, b in zip(cov_both, cov_alone):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
