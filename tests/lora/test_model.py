"""Task lifecycle, training invariants, protocols, RR/KD, merge and adapter state of SDLoRAModel."""

from __future__ import annotations

import statistics

import pytest
import timm
import torch
from lora_helpers import TARGETS, make, randomise_current, run_tasks, tiny_vit

from sdlora.lora import RR_SCHEDULE, AdapterConfig, SDLoRAModel


def train_steps(model: SDLoRAModel, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def snapshot(model: SDLoRAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_training_changes_only_intended_tensors(x, protocol):
    # Adam: with normalise_current the first gradient on B is scaled by 1/eps (B starts at zero).
    model = make(AdapterConfig(rank=2, protocol=protocol))
    model.begin_task()
    randomise_current(model)  # as if task 0 had trained
    model.end_task()
    model.begin_task()
    before = snapshot(model)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        for n, p in model.named_trainable_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
    after = snapshot(model)
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert trainable == {"alpha_prev", "alpha_cur"} | {
        f"backbone.{layer}.units.{i}.{f}" for layer in model._layer_names for i in range(2) for f in ("A_cur", "B_cur")
    }
    for key in before:
        if key in trainable:
            assert not torch.equal(before[key], after[key]), f"{key} should have changed"
        else:
            assert torch.equal(before[key], after[key]), f"{key} must stay bit-identical"
    # The backbone itself never requires grad.
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if ".units." not in n)


def test_official_protocol_reinitialises_magnitudes_each_task(x):
    model = make(AdapterConfig(rank=2, protocol="official"))
    for t in range(3):
        model.begin_task()
        assert torch.equal(model.alphas(), torch.full((t + 1,), 0.8))
        train_steps(model, x)
        model.end_task()


def test_paper_protocol_carries_magnitudes_over(x):
    model = make(AdapterConfig(rank=2, protocol="paper"))
    model.begin_task()
    assert torch.equal(model.alphas(), torch.ones(1))
    randomise_current(model)
    with torch.no_grad():
        model.alpha_cur.fill_(1.7)
    model.end_task()
    model.begin_task()
    assert torch.allclose(model.alphas(), torch.tensor([1.7, 1.0]))


def test_explicit_fields_override_protocol():
    cfg = AdapterConfig(protocol="official", alpha_init=1.0, normaliser="frobenius_of_product").resolved()
    assert cfg.alpha_init == 1.0 and cfg.normaliser == "frobenius_of_product"
    assert cfg.normalise_current is False and cfg.alpha_carry_over is False


def test_rr_rank_schedule():
    cfg = AdapterConfig(rank_schedule=list(RR_SCHEDULE))
    assert [cfg.rank_for_task(t) for t in range(12)] == [10] * 4 + [8] * 4 + [6] * 4
    model = make(cfg)
    ranks = []
    for _ in range(10):
        ranks.append(model.begin_task())
        randomise_current(model)
        model.end_task()
    assert ranks == [10, 10, 10, 10, 8, 8, 8, 8, 6, 6]
    for _, u in model.named_units():
        assert u.comp_ranks == ranks
        assert u.A_frozen.shape[0] == sum(ranks)


@pytest.mark.parametrize("n_tasks", [1, 3, 20])
@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_merge_equals_unmerged_and_unmerge_restores(x, n_tasks, protocol):
    model = make(AdapterConfig(rank=2, protocol=protocol))
    w0 = {n: layer.base.weight.detach().clone() for n, layer in zip(model._layer_names, model.layers())}
    run_tasks(model, n_tasks, end_last=n_tasks % 2 == 1)  # also merge while a task is open
    with torch.no_grad():
        ref = model(x)
        plain = model.merge_and_unload()
        assert type(plain) is type(tiny_vit(0))
        assert not any(type(m).__name__ == "SDLoRALinear" for m in plain.modules())
        assert torch.allclose(plain(x), ref, atol=1e-5)
        model.merge()
        assert torch.allclose(model(x), ref, atol=1e-5)
        model.unmerge()
        for n, layer in zip(model._layer_names, model.layers()):
            assert torch.equal(layer.base.weight, w0[n])
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("end_last", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig(rank_schedule=[3, 2], kd=True, kd_tau=1.0),
        AdapterConfig(rank=2, protocol="paper", per_layer_magnitudes=True),
    ],
)
def test_lora_factors_are_the_update_and_unload_gives_w0(x, cfg, end_last):
    """One plain LoRA per layer (B @ A) is the layer's whole update, KD increments and the current component
    included; ``unload`` returns the backbone before injection, also while merged."""
    model = make(cfg)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in zip(model._layer_names, model.layers())}
    run_tasks(model, 3, end_last=end_last)
    if cfg.kd:  # kd_tau 1 absorbs every later direction
        assert any(u.kd_increment.abs().sum() > 0 for _, u in model.named_units())
    alphas = model.alphas().detach()
    factors = model.lora_factors()
    assert list(factors) == model._layer_names
    for name, layer in zip(model._layer_names, model.layers()):
        a, b = factors[name]
        ranks = [st[0].shape[0] for st in (u.stacked(alphas, *layer._scale_args()) for u in layer.units) if st]
        assert a.shape == (sum(ranks), layer.in_features) and b.shape == (layer.out_features, sum(ranks))
        torch.testing.assert_close(b @ a, layer.delta_weight(alphas), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        ref = model(x)
        model.merge()
        plain = model.unload()
    assert not any(type(m).__name__ == "SDLoRALinear" for m in plain.modules())
    for name in model._layer_names:
        assert torch.equal(plain.get_submodule(name).weight, w0[name])
    with torch.no_grad():  # W0 + B @ A in the plain copy gives the adapted function
        for name, (a, b) in factors.items():
            plain.get_submodule(name).weight.add_(b @ a)
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)


def test_merged_weights_load_into_fresh_timm_model(x):
    model = SDLoRAModel(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8, depth=2),
        AdapterConfig(rank=2),
        default_targets=TARGETS,
    )
    run_tasks(model, 2)
    with torch.no_grad():
        ref = model(x)
        sd = model.merge_and_unload().state_dict()
    fresh = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8, depth=2
    )
    fresh.load_state_dict(sd)  # strict: same keys as the original backbone
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-5)


@pytest.mark.parametrize("end_last", [True, False])
@pytest.mark.parametrize(
    "cfg", [AdapterConfig(rank=2), AdapterConfig(rank_schedule=[3, 2], protocol="paper", per_layer_magnitudes=True)]
)
def test_adapter_state_round_trip(x, cfg, end_last):
    model = make(cfg)
    run_tasks(model, 3, end_last=end_last)
    tensors, meta = model.adapter_state()
    fresh = make(cfg)  # same architecture, same W0
    fresh.load_adapter_state(tensors, meta)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh.num_tasks == model.num_tasks and fresh.in_task == model.in_task
    assert {n for n, _ in fresh.named_trainable_parameters()} == {n for n, _ in model.named_trainable_parameters()}
    if end_last:
        fresh.begin_task()  # the lifecycle continues after loading


def test_adapter_state_into_other_backbone_raises():
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 1)
    tensors, meta = model.adapter_state()
    other = make(AdapterConfig(rank=2), dim=32)
    with pytest.raises(ValueError, match="do not fit|does not fit"):
        other.load_adapter_state(tensors, meta)
    deeper = make(AdapterConfig(rank=2), depth=3)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        deeper.load_adapter_state(tensors, meta)
    other_cfg = make(AdapterConfig(rank=2, protocol="paper"))
    with pytest.raises(ValueError, match="another adapter config"):
        other_cfg.load_adapter_state(tensors, meta)


def _set_current(model: SDLoRAModel, fn) -> None:
    with torch.no_grad():
        for _, u in model.named_units():
            a, b = fn(u)
            u.A_cur.copy_(a)
            u.B_cur.copy_(b)


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_kd_absorbs_combination_and_keeps_random(x, protocol):
    model = make(AdapterConfig(rank=2, kd=True, protocol=protocol))
    run_tasks(model, 2)  # two frozen directions per unit
    # Task 2: the new product is an exact combination 1.5 * M_0 - 0.5 * M_1 of the earlier ones (rank 4 = 2 + 2).
    model.begin_task(rank=4)

    def combo(u):
        a0, a1 = u.A_frozen[0:2], u.A_frozen[2:4]
        b0, b1 = u.B_frozen[:, 0:2], u.B_frozen[:, 2:4]
        return torch.cat([a0, a1], 0), torch.cat([1.5 * b0, -0.5 * b1], 1)

    _set_current(model, combo)
    report = model.end_task()
    n_units = len(model.named_units())
    assert report["absorbed"] == n_units and report["frozen"] == 0
    if protocol == "paper":  # normalised while training: absorbed at once (Algorithm 1)
        assert report["kd_absorption"] == "end_task"
        assert all(u.num_frozen == 2 and u.kd_increment.abs().sum() > 0 for _, u in model.named_units())
    else:  # acts as trained until the next task starts, then absorbed
        assert report["kd_absorption"] == "next begin_task"
        assert all(u.num_frozen == 3 and bool(u.pending_absorb[-1]) for _, u in model.named_units())
        assert all(u.kd_increment.abs().sum() == 0 for _, u in model.named_units())
    # Next task: a random direction is not explained by the earlier ones and must be kept.
    model.begin_task()
    assert all(u.num_frozen == 2 and u.kd_increment.abs().sum() > 0 for _, u in model.named_units())
    assert not any(bool(u.pending_absorb.any()) for _, u in model.named_units())
    randomise_current(model)
    report = model.end_task()
    assert report["frozen"] == n_units and report["absorbed"] == 0
    counts = [{k: e[k] for k in ("task", "absorbed", "kept")} for e in model.kd_log]
    assert counts == [
        {"task": 0, "absorbed": 0, "kept": n_units},
        {"task": 1, "absorbed": 0, "kept": n_units},
        {"task": 2, "absorbed": n_units, "kept": 0},
        {"task": 3, "absorbed": 0, "kept": n_units},
    ]
    # The log says how close each task came to kd_tau: nothing to fit with after the first task, random
    # directions far above it, the exact combination at (numerically) zero.
    tau = model.config.kd_tau
    assert model.kd_log[0]["residual_min"] is None and model.kd_log[0]["residual_median"] is None
    for entry in (model.kd_log[1], model.kd_log[3]):
        assert tau < entry["residual_min"] <= entry["residual_median"] <= 1.0
    assert model.kd_log[2]["residual_median"] <= 1e-6
    assert report["kd_residual_min"] == model.kd_log[3]["residual_min"]


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_direction_residuals_fit_each_direction_by_the_earlier_ones(protocol):
    # Plain SD-LoRA (no KD): nothing is absorbed, so the residuals can be read after training.
    model = make(AdapterConfig(rank=2, protocol=protocol))
    run_tasks(model, 2)
    after_two = model.direction_residuals()
    model.begin_task(rank=4)
    _set_current(
        model,
        lambda u: (
            torch.cat([u.A_frozen[0:2], u.A_frozen[2:4]], 0),
            torch.cat([1.5 * u.B_frozen[:, 0:2], -0.5 * u.B_frozen[:, 2:4]], 1),
        ),
    )
    model.end_task()
    residuals = model.direction_residuals()
    assert set(residuals) == {name for name, _ in model.named_units()}
    for name, values in residuals.items():
        assert len(values) == 2
        assert 0.05 < values[0] <= 1.0  # a random direction is far from the first one
        assert values[0] == pytest.approx(after_two[name][0], abs=1e-12)  # a later direction changes nothing
        assert values[1] < 1e-6  # the third is the exact combination of the first two
    unit = model.named_units()[0][1]
    with pytest.raises(ValueError, match="no earlier ones"):
        model._kd_fit(unit, 0)
    with pytest.raises(IndexError, match="out of range"):
        model._kd_fit(unit, 3)


def test_kd_report_residual_is_the_newest_direction_residual():
    model = make(AdapterConfig(rank=2, kd=True, protocol="paper"))
    run_tasks(model, 2, end_last=False)
    report = model.end_task()
    newest = [values[-1] for values in model.direction_residuals().values()]
    assert report["absorbed"] == 0
    assert report["kd_residual_min"] == pytest.approx(min(newest))
    assert report["kd_residual_median"] == pytest.approx(statistics.median(newest))
    assert model.kd_log[-1] == {
        "task": 1,
        "absorbed": 0,
        "kept": len(newest),
        "residual_min": report["kd_residual_min"],
        "residual_median": report["kd_residual_median"],
    }


def test_kd_absorption_preserves_output(x):
    model = make(AdapterConfig(rank=2, kd=True, protocol="official"))
    run_tasks(model, 1)
    model.begin_task(rank=2)
    _set_current(model, lambda u: (u.A_frozen.clone(), -2.0 * u.B_frozen))
    with torch.no_grad():
        model.alpha_cur.fill_(0.9)
        before = model(x)
    report = model.end_task()
    assert report["absorbed"] == len(model.named_units())
    with torch.no_grad():
        after = model(x)  # the official protocol evaluates the task as trained: KD defers the absorption
    assert torch.allclose(before, after, atol=1e-5)


def test_kd_squared_residual_is_more_permissive():
    torch.manual_seed(0)
    kw = dict(rank=2, kd=True, kd_tau=1e-2)

    def near_combo(model):
        def fn(u):
            noise = 0.03 * torch.randn_like(u.B_frozen) * u.B_frozen.abs().mean()
            return u.A_frozen.clone(), u.B_frozen + noise

        return fn

    results = []
    for squared in (False, True):
        model = make(AdapterConfig(kd_squared_residual=squared, **kw))
        run_tasks(model, 1)
        model.begin_task(rank=2)
        torch.manual_seed(1)
        _set_current(model, near_combo(model))
        results.append(model.end_task()["absorbed"])
    assert results[1] >= results[0]
    assert results[1] > 0


def test_parameter_counts_vit_b16_rank10():
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = SDLoRAModel(vit, AdapterConfig(rank=10), default_targets=TARGETS)
    model.begin_task()
    randomise_current(model)
    counts = model.parameter_counts()
    assert counts["trainable_adapter"] == 368_640  # 12 blocks x {q,v} x (768*10 + 10*768), paper Table 5
    assert counts["trainable_magnitudes"] == 1
    model.end_task()
    model.begin_task(rank=6)
    counts = model.parameter_counts()
    assert counts["trainable_adapter"] == 221_184
    assert counts["trainable_magnitudes"] == 2
    assert counts["stored_per_task"] == [368_640, 0]


def test_ablation_first_only_trains_only_magnitude_after_first_task(x):
    model = make(AdapterConfig(rank=2, components="first_only"))
    model.begin_task()
    randomise_current(model)
    model.end_task()
    assert model.begin_task() == 0
    assert {n for n, _ in model.named_trainable_parameters()} == {"alpha_cur"}
    train_steps(model, x)
    model.end_task()
    assert all(u.num_frozen == 1 for _, u in model.named_units())


def test_ablation_single_component_keeps_learning(x):
    model = make(AdapterConfig(rank=2, components="single"))
    model.begin_task()
    randomise_current(model)
    a_before = {n: u.A_cur.detach().clone() for n, u in model.named_units()}
    model.end_task()
    model.begin_task()
    assert all(u.num_frozen == 0 and u.A_cur is not None for _, u in model.named_units())
    assert all(torch.equal(u.A_cur, a_before[n]) for n, u in model.named_units())
    train_steps(model, x)
    assert not all(torch.equal(u.A_cur, a_before[n]) for n, u in model.named_units())


def test_ablation_fixed_old_magnitudes(x):
    model = make(AdapterConfig(rank=2, train_old_magnitudes=False))
    run_tasks(model, 1)
    model.begin_task()
    names = {n for n, _ in model.named_trainable_parameters()}
    assert "alpha_prev" not in names and "alpha_cur" in names
    before = model.alpha_prev.clone()
    train_steps(model, x)
    assert torch.equal(model.alpha_prev, before)


def test_sequential_lora_configuration_is_plain_lora(x):
    cfg = AdapterConfig(rank=2, components="single", normalise_current=False, alpha_init=1.0, train_magnitudes=False)
    model = make(cfg)
    model.begin_task()
    randomise_current(model)
    assert {n for n, _ in model.named_trainable_parameters()} == {
        f"backbone.{layer}.units.{i}.{f}" for layer in model._layer_names for i in range(2) for f in ("A_cur", "B_cur")
    }
    with torch.no_grad():
        ref_model = tiny_vit(0)
        for name, layer in zip(model._layer_names, model.layers()):
            w = ref_model.get_submodule(name).weight
            for u in layer.units:
                w[u.start : u.stop] += u.B_cur @ u.A_cur
        assert torch.allclose(model(x), ref_model(x), atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        SDLoRAModel(tiny_vit(0), AdapterConfig(), default_targets=["blocks.*.attn.nope"])
    with pytest.raises(ValueError, match="rank must be a positive"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="rank_schedule"):
        AdapterConfig(rank_schedule=[10, 0])
    with pytest.raises(ValueError, match="protocol"):
        AdapterConfig(protocol="unknown")  # type: ignore[arg-type]
    model = make()
    with pytest.raises(ValueError, match="rank must be a positive"):
        model.begin_task(rank=-1)
    model.begin_task()
    with pytest.raises(RuntimeError, match="called twice"):
        model.begin_task()
    model.end_task()
    with pytest.raises(RuntimeError, match="without begin_task"):
        model.end_task()
    with pytest.raises(ValueError, match="no adapter targets"):
        SDLoRAModel(tiny_vit(0), AdapterConfig())


def test_zero_direction_is_dropped_not_nan(x):
    model = make()
    model.begin_task()  # B stays zero: nothing learned
    report = model.end_task()
    assert report["dropped_zero"] == len(model.named_units()) and report["frozen"] == 0
    model.begin_task()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
