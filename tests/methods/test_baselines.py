"""Baselines and ablations: every method runs two tiny tasks end to end; SimpleCIL prototypes are class means;
sequential LoRA keeps training the same factors while SD-LoRA freezes earlier directions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from method_helpers import make_ctx, random_batches, run_tiny, tiny_method, two_task_config

from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.engine import build_method_from_run
from sdlora.methods import METHODS

NEW_METHODS = [
    "seq_lora",
    "seq_lora_ca",
    "sdlora_ca",
    "full_ft",
    "simplecil",
    "inflora",
    "sdlora_ablation_first",
    "sdlora_ablation_single",
    "sdlora_ablation_fixed",
]


@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_runs_two_tasks_and_exports(tmp_path, name):
    train = {"lr": 1e-3} if name == "full_ft" else {}
    results = run_tiny(tmp_path / "run", two_task_config(name, train=train))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["completed_tasks"] == saved["num_tasks"] == 2
    assert saved["method"] == name and results["acc"] == saved["acc"]
    assert len(saved["accuracy_matrix"]) == 2 and all(0.0 <= v <= 100.0 for v in saved["acc_after_task"])
    assert len(saved["trainable_params_per_task"]) == 2 and saved["stored_params_total"] > 0
    protocols = {"seq_lora": "plain", "seq_lora_ca": "plain", "full_ft": "n/a", "simplecil": "n/a", "inflora": "n/a"}
    assert saved["protocol"] == protocols.get(name, "official")
    if name == "simplecil":
        assert saved["trainable_params_per_task"] == [0, 0]
        assert saved["stored_params_total"] == 4 * 32  # four prototypes of the 32-wide tiny ViT
    else:
        assert min(saved["trainable_params_per_task"]) > 0
    # The checkpoint restores the method: same predictions, and a plain backbone with the original keys.
    method, _, _ = build_method_from_run(tmp_path / "run")
    x = torch.randn(3, 3, 32, 32)
    assert method(x).shape == (3, 4)
    plain = method.export_backbone()
    fresh = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    assert set(plain.state_dict()) == set(fresh.state_dict())
    assert type(plain) is type(fresh)


def test_registry_has_every_method():
    for name in NEW_METHODS:
        assert name in METHODS


def test_simplecil_prototypes_are_class_feature_means():
    method = tiny_method("simplecil")
    method.eval()
    b0 = random_batches(0, 2, seed=1)
    b1 = random_batches(2, 4, seed=2)
    for task, (start, end, batches) in enumerate([(0, 2, b0), (2, 4, b1)]):
        ctx = make_ctx(task, start, end, batches)
        method.begin_task(ctx)
        assert method.trainable_parameters() == []
        method.end_task(ctx)
    with torch.no_grad():
        xs = torch.cat([x for x, _ in b0 + b1])
        ys = torch.cat([y for _, y in b0 + b1])
        feats = method.features(xs)
        expected = torch.stack([feats[ys == c].mean(0) for c in range(4)])
        torch.testing.assert_close(method.prototypes, expected, rtol=1e-5, atol=1e-5)
        # Cosine nearest-class-mean prediction.
        logits = method(xs)
        cos = F.normalize(feats, dim=-1) @ F.normalize(expected, dim=-1).t()
        torch.testing.assert_close(logits, cos, rtol=1e-5, atol=1e-5)
    assert method.parameter_counts() == {"trainable": 0, "stored": 4 * 32}
    # state()/load_state() round trip keeps the prototypes.
    tensors, meta = method.state()
    other = tiny_method("simplecil", seed=3)
    other.load_state(tensors, meta)
    torch.testing.assert_close(other.prototypes, method.prototypes)


def _fake_step(method) -> None:
    """One optimisation step on random data, so every trainable tensor moves."""
    params = method.trainable_parameters()
    opt = torch.optim.Adam(params, lr=0.05)
    x = torch.randn(4, 3, 32, 32)
    loss = method(x).square().mean() + sum((p * torch.randn_like(p)).sum() for p in params)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _lora_factors(method) -> dict[str, torch.Tensor]:
    """Current and frozen factors of every adapted unit, by name."""
    out = {}
    for name, unit in method.adapter.named_units():
        if unit.A_cur is not None:
            out[f"{name}.A_cur"] = unit.A_cur
            out[f"{name}.B_cur"] = unit.B_cur
        out[f"{name}.A_frozen"] = unit.A_frozen
        out[f"{name}.B_frozen"] = unit.B_frozen
    return out


def test_seq_lora_trains_the_same_factors_while_sdlora_freezes_earlier_directions():
    batches = random_batches(0, 2)
    seq, sd = tiny_method("seq_lora"), tiny_method("sdlora")
    for method in (seq, sd):
        method.begin_task(make_ctx(0, 0, 2, batches))
        _fake_step(method)
    sd_before = {k: v.detach().clone() for k, v in _lora_factors(sd).items()}  # task 1's A_cur, B_cur
    for method in (seq, sd):
        method.end_task(make_ctx(0, 0, 2, batches))
    seq_before = {k: v.detach().clone() for k, v in _lora_factors(seq).items()}
    seq_params_t1 = {k: v for k, v in _lora_factors(seq).items() if k.endswith("_cur")}
    for method in (seq, sd):
        method.begin_task(make_ctx(1, 2, 4, random_batches(2, 4)))
    # Sequential LoRA: the very same Parameters keep training; nothing frozen, no magnitudes.
    seq_now = _lora_factors(seq)
    trainable_ids = {id(p) for p in seq.trainable_parameters()}
    for k, p in seq_params_t1.items():
        assert seq_now[k] is p and p.requires_grad and id(p) in trainable_ids
    assert all(u.num_frozen == 0 for _, u in seq.adapter.named_units())
    assert not any(t.requires_grad for t in (seq.adapter.alpha_prev, seq.adapter.alpha_cur))
    # SD-LoRA: the first direction is now a frozen buffer; a new trainable component replaces it.
    sd_now = _lora_factors(sd)
    for name, unit in sd.adapter.named_units():
        assert unit.num_frozen == 1 and not unit.A_frozen.requires_grad
        torch.testing.assert_close(unit.A_frozen, sd_before[f"{name}.A_cur"])
        assert unit.A_cur.requires_grad and id(unit.A_cur) in {id(p) for p in sd.trainable_parameters()}
    _fake_step(seq)
    _fake_step(sd)
    # After training task 2, sequential LoRA changed the task-1 factors, SD-LoRA left them alone.
    seq_after = _lora_factors(seq)
    assert any(not torch.equal(seq_after[k], seq_before[k]) for k in seq_before if k.endswith("B_cur"))
    sd_after = _lora_factors(sd)
    for name, _ in sd.adapter.named_units():
        assert torch.equal(sd_after[f"{name}.A_frozen"], sd_now[f"{name}.A_frozen"])
        assert torch.equal(sd_after[f"{name}.B_frozen"], sd_before[f"{name}.B_cur"])


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        (
            "seq_lora",
            {"components": "single", "normalise_current": False, "alpha_init": 1.0, "train_magnitudes": False},
        ),
        ("sdlora_ablation_first", {"components": "first_only", "train_magnitudes": True}),
        ("sdlora_ablation_single", {"components": "single", "normalise_current": True, "train_magnitudes": True}),
        ("sdlora_ablation_fixed", {"components": "per_task", "train_old_magnitudes": False, "alpha_carry_over": True}),
    ],
)
def test_lora_variants_are_adapter_configurations(name, fields):
    method = tiny_method(name, adapter={"rank": 3, "projections": ["q", "v"]})
    cfg = method.adapter.config
    for key, value in fields.items():
        assert getattr(cfg, key) == value, key
    assert cfg.rank == 3 and cfg.projections == ["q", "v"]  # same LoRA shape as SD-LoRA


def test_ablation_first_trains_only_the_magnitude_after_task_one():
    method = tiny_method("sdlora_ablation_first")
    b = random_batches(0, 2)
    method.begin_task(make_ctx(0, 0, 2, b))
    _fake_step(method)
    method.end_task(make_ctx(0, 0, 2, b))
    method.begin_task(make_ctx(1, 2, 4, random_batches(2, 4)))
    names = [n for n, p in method.named_parameters() if p.requires_grad]
    assert all(n.startswith("head.") or n.endswith("alpha_cur") for n in names), names
    assert any(n.endswith("alpha_cur") for n in names)


def test_ablation_fixed_freezes_old_magnitudes_at_their_values():
    method = tiny_method("sdlora_ablation_fixed")
    b = random_batches(0, 2)
    method.begin_task(make_ctx(0, 0, 2, b))
    _fake_step(method)
    method.end_task(make_ctx(0, 0, 2, b))
    learned = method.adapter.alphas().clone()
    method.begin_task(make_ctx(1, 2, 4, random_batches(2, 4)))
    assert not method.adapter.alpha_prev.requires_grad and method.adapter.alpha_cur.requires_grad
    torch.testing.assert_close(method.adapter.alpha_prev, learned)


# ------------------------------------------------------------------------------------------- per-method options
def test_method_options_are_typed_by_the_methods_own_dataclass(tmp_path):
    from sdlora.configtools import ConfigError, dump_yaml
    from sdlora.methods import load_run_config
    from sdlora.methods.inflora import InfLoRAOptions

    path = tmp_path / "c.yaml"
    cfg_data = two_task_config("inflora")
    cfg_data["method"]["options"] = {"rank": 3}
    dump_yaml(cfg_data, path)
    cfg, cfg_dict = load_run_config(str(path))
    # Defaults are filled in, so the saved config lists every option of the method.
    assert cfg_dict["method"]["options"] == {"lamb": 0.98, "lame": 1.0, "rank": 3, "max_batches": None}
    assert tiny_method("inflora", options={"rank": 3}).options == InfLoRAOptions(rank=3)
    with pytest.raises(ConfigError, match=r"method\.options\.rnak.*did you mean 'rank'"):
        load_run_config(str(path), ["method.options.rnak=2"])
    with pytest.raises(ConfigError, match=r"method\.options.*lamb and lame"):
        load_run_config(str(path), ["method.options.lamb=1.5"])
    with pytest.raises(ConfigError, match=r"method 'simplecil' takes no options"):
        load_run_config(str(path), ["method.name=simplecil"])
    with pytest.raises(ConfigError, match=r"method\.name.*unknown method 'nope'"):
        load_run_config(str(path), ["method.name=nope"])


def test_full_ft_trains_the_backbone_at_a_fraction_of_the_heads_learning_rate(tmp_path):
    from engine_helpers import tiny_config
    from sdlora.config import RunConfig, TrainConfig
    from sdlora.configtools import from_dict, to_dict
    from sdlora.methods import load_run_config, resolve_method_config
    from sdlora.rundir import config_changes, normalised_config
    from sdlora.training import make_optimizer, param_groups

    method = tiny_method("full_ft", options={"backbone_lr_scale": 0.25})
    method.begin_task(make_ctx(0, 0, 2, []))
    (head, one), (backbone, scale) = method.optimizer_groups()
    assert (one, scale) == (1.0, 0.25)
    assert {id(p) for p in backbone} == {id(p) for p in method.model.parameters()}
    assert {id(p) for p in head} == {id(p) for p in method.head.parameters() if p.requires_grad} and head
    # One plain SGD step of the optimizer train_task builds moves each group by its own learning rate.
    opt = make_optimizer(param_groups(method, 0.1), from_dict(TrainConfig, {"optimizer": "sgd", "momentum": 0.0}), 0.1)
    before = [p.detach().clone() for p in backbone + head]
    F.cross_entropy(method(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1])).backward()
    grads = [p.grad.clone() for p in backbone + head]
    opt.step()
    for p, b, g, lr in zip(backbone + head, before, grads, [0.025] * len(backbone) + [0.1] * len(head)):
        torch.testing.assert_close(p.detach(), b - lr * g)
    assert tiny_method("full_ft").options.backbone_lr_scale == 0.01  # the default
    with pytest.raises(ValueError, match="backbone_lr_scale must be positive"):
        tiny_method("full_ft", options={"backbone_lr_scale": 0.0})

    # A run saved before the option existed trained its backbone at train.lr: it reads as 1.0, not as the default.
    old = to_dict(from_dict(RunConfig, tiny_config(method={"name": "full_ft", "options": {}})))
    assert old["method"]["options"] == {}
    assert normalised_config(old)["method"]["options"] == {"backbone_lr_scale": 1.0}
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.yaml").write_text(json.dumps(old))
    new = to_dict(resolve_method_config(from_dict(RunConfig, tiny_config(method={"name": "full_ft"}))))
    assert config_changes(out, new) == ["method.options.backbone_lr_scale: 1.0 -> 0.01"]
    # learn, predict and diagnose rebuild such a run as it trained
    cfg, _ = load_run_config(str(out / "config.yaml"), saved_run=True)
    assert cfg.method.options == {"backbone_lr_scale": 1.0}
    assert load_run_config(str(out / "config.yaml"))[0].method.options == {"backbone_lr_scale": 0.01}


@pytest.mark.parametrize(
    ("name", "adapter"),
    [
        ("sdlora_ablation_first", {"components": "first_only", "kd": False}),
        ("sdlora_ablation_single", {"components": "single", "normalise_current": True}),
        ("sdlora_ablation_fixed", {"train_old_magnitudes": False, "alpha_carry_over": True}),
        ("sdlora_kd", {"kd": True}),
        ("sdlora_rr", {"rank_schedule": [10, 10, 10, 10, 8, 8, 8, 8, 6]}),
    ],
)
def test_the_saved_config_shows_the_adapter_a_variant_runs_with(tmp_path, name, adapter):
    from engine_helpers import tiny_config
    from sdlora.config import RunConfig
    from sdlora.configtools import from_dict, to_dict
    from sdlora.methods import resolve_method_config
    from sdlora.rundir import config_changes

    saved = to_dict(resolve_method_config(from_dict(RunConfig, tiny_config(method={"name": name}))))
    assert {k: saved["method"]["adapter"][k] for k in adapter} == adapter
    built = tiny_method(name)
    assert {k: getattr(built.adapter_config, k) for k in adapter} == adapter  # what the model was built with
    # A run saved before the variant's settings were written into its config (the bare adapter section) still
    # compares equal to today's resolved config: --resume and compare keep accepting it.
    bare = to_dict(from_dict(RunConfig, tiny_config(method={"name": name})))
    assert bare["method"]["adapter"] != saved["method"]["adapter"]
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.yaml").write_text(json.dumps(bare))
    assert config_changes(out, saved) == []
