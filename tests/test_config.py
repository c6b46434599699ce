"""The run config: values that would train wrongly or fail late are refused at load time, with their key path."""

from __future__ import annotations

import pytest

from engine_helpers import tiny_config, write_config
from sdlora.configtools import ConfigError
from sdlora.methods import load_run_config


@pytest.mark.parametrize(
    "patch,path,fragment",
    [
        ({"train": {"scheduler": "cosine", "min_lr": -0.01}}, "train.min_lr", ">= 0"),
        ({"train": {"scheduler": "cosine", "min_lr": 0.5}}, "train.min_lr", "below"),
        ({"train": {"scheduler": "multistep", "milestones": [2], "gamma": -0.5}}, "train.gamma", "positive"),
        ({"train": {"scheduler": "multistep", "milestones": [0, 2]}}, "train.milestones", "positive"),
        ({"train": {"lr": float("nan")}}, "train.lr", "finite"),
        ({"train": {"lr": float("inf")}}, "train.lr", "finite"),
        ({"train": {"first_lr": float("nan")}}, "train.first_lr", "finite"),
        ({"train": {"betas": [0.9, 1.0]}}, "train.betas", "[0, 1)"),
        ({"train": {"betas": [-0.1, 0.999]}}, "train.betas", "[0, 1)"),
        ({"train": {"momentum": -0.9}}, "train.momentum", "[0, 1)"),
        ({"train": {"weight_decay": -1e-4}}, "train.weight_decay", ">= 0"),
        ({"train": {"weight_decay": float("nan")}}, "train.weight_decay", "finite"),
        ({"train": {"grad_clip": float("inf")}}, "train.grad_clip", "finite"),
        ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints", "or null (keep all)"),
        ({"seed": -1}, "seed", "[0, 2**32)"),
        ({"seed": 2**32}, "seed", "[0, 2**32)"),
        ({"scenario": {"seed": -3}}, "scenario.seed", "[0, 2**32)"),
        ({"scenario": {"init_cls": 0}}, "scenario.init_cls", "positive"),
    ],
)
def test_bad_values_refused_at_load_with_key_path(tmp_path, patch, path, fragment):
    file = write_config(tmp_path / "c.yaml", tiny_config(**patch))
    with pytest.raises(ConfigError) as exc:
        load_run_config(str(file))
    assert exc.value.path == path
    assert fragment in str(exc.value)
    assert str(exc.value).startswith(f"{file}: {path}: ")  # file, then the key path once


def test_good_values_still_load(tmp_path):
    cfg = tiny_config(
        train={"scheduler": "cosine", "min_lr": 0.0, "momentum": 0.0, "betas": [0.0, 0.99], "weight_decay": 0.05},
        seed=0,
    )
    load_run_config(str(write_config(tmp_path / "c.yaml", cfg)))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "{}\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    """An empty file used to start the heavy defaults (224 px, 20 epochs per task, the real backbone)."""
    file = tmp_path / "empty.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml.*sets no keys"):
        load_run_config(str(file))


def test_errors_name_file_and_key_path_once(tmp_path):
    """The key path used to appear before and after the file name: 'train.lrr: FILE: train.lrr: unknown key'."""
    cfg = tiny_config()
    cfg["train"]["lrr"] = 0.1
    file = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as exc:
        load_run_config(str(file))
    assert str(exc.value).startswith(f"{file}: train.lrr: unknown key 'lrr'")
    assert str(exc.value).count("train.lrr") == 1


@pytest.mark.parametrize(
    "override,path",
    [
        ("train.lr=-1", "train.lr"),
        ("method.name=nope", "method.name"),
        ("train.lr=abc", "train.lr"),
        ("train.optimiser=adam", "train.optimiser"),
    ],
)
def test_override_errors_name_the_override_not_the_file(tmp_path, override, path):
    file = write_config(tmp_path / "c.yaml", tiny_config())
    with pytest.raises(ConfigError) as exc:
        load_run_config(str(file), [override])
    msg = str(exc.value)
    assert msg.startswith(f"--set {override}: {path}: "), msg
    assert str(file) not in msg


def test_file_errors_are_not_blamed_on_an_unrelated_override(tmp_path):
    cfg = tiny_config(train={"lr": -1.0})
    file = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as exc:
        load_run_config(str(file), ["train.epochs=1"])
    assert str(exc.value).startswith(f"{file}: train.lr: ")


def test_config_layer_leaves_the_method_to_the_methods(tmp_path):
    """config.py sits below the methods: its loader types the tree, the methods' loader checks the method."""
    from sdlora.config import load_config

    file = write_config(tmp_path / "c.yaml", tiny_config(method={"name": "inflora", "options": {"rank": 3}}))
    cfg, _ = load_config(str(file), ["method.name=nope"])
    assert cfg.method.name == "nope"
    _, resolved = load_run_config(str(file))
    assert resolved["method"]["options"] == {"lamb": 0.98, "lame": 1.0, "rank": 3, "max_batches": None}
    assert load_config(str(file))[1]["method"]["options"] == {"rank": 3}
    with pytest.raises(ConfigError) as exc:
        load_run_config(str(file), ["method.name=nope"])
    assert str(exc.value).startswith("--set method.name=nope: method.name: unknown method 'nope'; known methods: ")
