"""The calibrated head (``method.calib``): drift compensation recovers a known drift, the heads equal their hand
computations, runs keep no per-sample tensor of an earlier task, resume exactly, predict with the head that
was evaluated, and the paper presets leave everything off."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine_helpers import tiny_config
from sdlora.alignment import FeatureStatistics
from sdlora.calibration import (
    CalibConfig,
    CalibratedHead,
    compensate_statistics,
    linear_drift,
    moment_ridge_statistics,
    sdc_drift,
)
from sdlora.config import RunConfig, load_config, preset_names
from sdlora.configtools import ConfigError, from_dict
from sdlora.engine import run_experiment
from sdlora.methods import METHODS
from sdlora.rundir import build_method_from_run, latest_checkpoint, load_checkpoint


def _classes(n_classes: int, per_class: int, d: int, seed: int, start: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.cat(
        [centres[c] + torch.randn(per_class, d, generator=g, dtype=torch.float64) @ mix for c in range(n_classes)]
    )
    y = torch.arange(start, start + n_classes).repeat_interleave(per_class)
    return x, y


def _stats(x, y, start, end, covariance="full", stats=None):
    stats = stats if stats is not None else FeatureStatistics(x.shape[1], covariance)
    stats.add_classes(iter([(x, y)]), lambda f: f, start, end)
    return stats


def test_linear_drift_recovers_a_known_affine_drift_and_moves_statistics_exactly():
    d = 6
    g = torch.Generator().manual_seed(0)
    a_true = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    b_true = torch.randn(d, generator=g, dtype=torch.float64)
    before, _ = _classes(3, 50, d, seed=1)  # the current task's samples, before and after the task
    after = before @ a_true + b_true
    a, b = linear_drift(before, after, ridge=1e-9)
    torch.testing.assert_close(a, a_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, b_true, rtol=1e-5, atol=1e-5)
    # Old classes (never seen by the drift estimate) move as their samples would.
    xo, yo = _classes(2, 40, d, seed=2)
    for covariance in ("full", "shared"):
        moved = _stats(xo, yo, 0, 2, covariance)
        compensate_statistics([moved], CalibConfig(drift="linear", drift_ridge=1e-9), before, after)
        direct = _stats(xo @ a_true + b_true, yo, 0, 2, covariance)
        torch.testing.assert_close(moved.means, direct.means, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moved.covariance_of(0), direct.covariance_of(0), rtol=1e-4, atol=1e-4)
    # The ridge pulls towards no drift: a huge ridge leaves the statistics where they were.
    a_big, b_big = linear_drift(before, after, ridge=1e9)
    torch.testing.assert_close(a_big, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(b_big.abs().max()) < 1e-6


def test_sdc_recovers_a_translation_and_follows_the_nearest_samples():
    d = 5
    before, _ = _classes(2, 30, d, seed=3)
    shift = torch.arange(d, dtype=torch.float64)
    old = _stats(*_classes(2, 20, d, seed=4), 0, 2)
    delta = sdc_drift(before, before + shift, old.means, sigma=0.3)
    torch.testing.assert_close(delta, shift.expand(2, d))
    # Two groups drifting differently: a class mean on one group gets (almost only) that group's drift.
    x = torch.cat([torch.zeros(10, d, dtype=torch.float64), 10 * torch.ones(10, d, dtype=torch.float64)])
    y = torch.cat([x[:10] + 1.0, x[10:] - 2.0])
    means = torch.stack([torch.zeros(d), 10 * torch.ones(d)]).double()
    torch.testing.assert_close(sdc_drift(x, y, means, sigma=0.3), torch.tensor([[1.0] * d, [-2.0] * d]).double())


def test_ncm_head_equals_a_hand_computed_nearest_class_mean():
    d = 4
    x0, y0 = _classes(2, 10, d, seed=5)
    x1, y1 = _classes(3, 8, d, seed=6, start=2)
    head = CalibratedHead(CalibConfig(head="ncm"), d)
    head.stats.add_classes(iter([(x0, y0)]), lambda f: f, 0, 2)
    head.stats.add_classes(iter([(x1, y1)]), lambda f: f, 2, 5)
    head.fit(seed=0, task=1)
    xs, ys = torch.cat([x0, x1]), torch.cat([y0, y1])
    test = torch.randn(7, d, dtype=torch.float64)
    expected = torch.empty(7, 5, dtype=torch.float64)
    for c in range(5):
        mu = xs[ys == c].mean(0)
        for i in range(7):
            expected[i, c] = float(test[i] @ mu) / float(test[i].norm() * mu.norm())
    torch.testing.assert_close(head.logits(test), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance", ["shared", "full"])
def test_ridge_head_equals_the_closed_form_solve_on_all_samples(covariance):
    d, ridge = 5, 1e-2
    x0, y0 = _classes(2, 12, d, seed=7)
    x1, y1 = _classes(2, 9, d, seed=8, start=2)
    head = CalibratedHead(CalibConfig(head="ridge", covariance=covariance, ridge=ridge), d)
    head.stats.add_classes(iter([(x0, y0)]), lambda f: f, 0, 2)
    head.stats.add_classes(iter([(x1, y1)]), lambda f: f, 2, 4)
    head.fit(seed=0, task=1)
    z = torch.cat([torch.cat([x0, x1]), torch.ones(len(y0) + len(y1), 1, dtype=torch.float64)], 1)
    targets = torch.nn.functional.one_hot(torch.cat([y0, y1]), 4).double()
    gram = z.t() @ z
    g, c = moment_ridge_statistics(head.stats)
    torch.testing.assert_close(g, gram, rtol=1e-5, atol=1e-4)
    lam = ridge * float(torch.diagonal(gram).mean())
    w = torch.linalg.solve(gram + lam * torch.eye(d + 1, dtype=torch.float64), z.t() @ targets)
    torch.testing.assert_close(head.weight.double(), w, rtol=1e-4, atol=1e-4)
    test = torch.randn(6, d, dtype=torch.float64)
    torch.testing.assert_close(head.logits(test), (torch.cat([test, torch.ones(6, 1).double()], 1) @ w).float())
    weight, bias = head.linear_map()  # the exported classifier gives the same logits
    torch.testing.assert_close(test.float() @ weight.t() + bias, head.logits(test))


def test_projected_ridge_head_is_deterministic_and_scores_every_class():
    d = 4
    x, y = _classes(3, 20, d, seed=9)
    heads = []
    for _ in range(2):
        head = CalibratedHead(CalibConfig(head="ridge", projection_dim=16, samples_per_class=64), d)
        head.stats.add_classes(iter([(x, y)]), lambda f: f, 0, 3)
        head.fit(seed=3, task=0)
        heads.append(head)
    assert heads[0].projection.shape == (d, 16) and heads[0].weight.shape == (16, 3)
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert heads[0].linear_map() is None  # not linear in the features: export refuses
    acc = (heads[0].logits(x).argmax(1) == y).float().mean()
    assert acc > 0.9


def test_both_features_head_equals_the_closed_form_solve_and_drift_moves_only_the_adapted_block():
    """``features: both``: statistics of [ReLU(u P), u, v] give the ridge solve on all samples (blocks scaled to
    one mean second moment), and a drift of v moves them as the samples' own [h, u, v A + b] would."""
    d, m, ridge = 4, 6, 1e-2
    cfg = CalibConfig(head="ridge", features="both", projection_dim=m, ridge=ridge, drift="linear", drift_ridge=1e-9)
    cfg = dataclasses.replace(cfg, adapted_weight=0.3)
    head = CalibratedHead(cfg, d)
    head.ensure_projection(seed=11)
    u0, y0 = _classes(2, 15, d, seed=12)
    u1, y1 = _classes(2, 11, d, seed=13, start=2)
    v0, v1 = 2.0 * u0 @ torch.randn(d, d, dtype=torch.float64) + 1.0, 0.5 * u1 + 3.0  # another scale than u
    head.stats.add_classes(iter([(head.inputs(v0, u0), y0)]), lambda f: f, 0, 2)
    # The second task moves v by a known affine map; its own samples estimate it (before -> after).
    g = torch.Generator().manual_seed(14)
    a_true = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    b_true = torch.randn(d, generator=g, dtype=torch.float64)
    before = torch.randn(40, d, generator=g, dtype=torch.float64)
    compensate_statistics([head.stats], cfg, before, before @ a_true + b_true)
    head.stats.add_classes(iter([(head.inputs(v1, u1), y1)]), lambda f: f, 2, 4)
    head.fit(seed=11, task=1)
    # What the samples themselves would give: task 1's v moved by the map, u and h untouched.
    z = torch.cat([head.inputs(v0 @ a_true + b_true, u0), head.inputs(v1, u1)])
    assert torch.equal(z[:, m : m + d], torch.cat([u0, u1])) and z.shape[1] == m + 2 * d
    za = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
    gram = za.t() @ za
    g_stats, _ = moment_ridge_statistics(head.stats)
    torch.testing.assert_close(g_stats, gram, rtol=1e-5, atol=1e-3)
    n = float(len(z))
    scale = torch.ones(za.shape[1], dtype=torch.float64)
    for lo, hi, weight in ((0, m, 1.0), (m, m + d, 1.0), (m + d, m + 2 * d, cfg.adapted_weight)):
        scale[lo:hi] = weight * (za[:, lo:hi].square().sum(0).mean() / n) ** -0.5
    zs = za * scale
    targets = torch.nn.functional.one_hot(torch.cat([y0, y1]), 4).double()
    lam = ridge * float(torch.diagonal(zs.t() @ zs).mean())
    w = torch.linalg.solve(zs.t() @ zs + lam * torch.eye(za.shape[1], dtype=torch.float64), zs.t() @ targets)
    test_u, test_v = torch.randn(5, d, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    expected = torch.cat([head.inputs(test_v, test_u), torch.ones(5, 1, dtype=torch.float64)], 1) * scale @ w
    torch.testing.assert_close(head.logits(head.inputs(test_v, test_u)), expected.float(), rtol=1e-4, atol=1e-4)
    assert head.linear_map() is None  # needs the frozen features too: export refuses
    with pytest.raises(ValueError, match="frozen"):
        head.inputs(test_v)
    with pytest.raises(ValueError, match="covariance: shared"):
        CalibConfig(head="ridge", features="both", covariance="full")
    with pytest.raises(ValueError, match="head: ridge"):
        CalibConfig(head="ncm", features="both", covariance="shared")


def test_the_frozen_backbone_of_both_features_stays_pretrained_and_in_eval_mode(tmp_path):
    from sdlora.backbones.factory import create_backbone
    from sdlora.rundir import seed_everything

    cfg = _config("sdlora", head="ridge", drift="linear", features="both", projection_dim=8)
    _run(tmp_path, cfg, "run")
    method, run_cfg, _ = build_method_from_run(tmp_path / "run")
    method.train()
    assert method.frozen_model is not None and not method.frozen_model.training
    assert not any(p.requires_grad for p in method.frozen_model.parameters())
    assert all(p is not q for p in method.frozen_model.parameters() for q in method.trainable_parameters())
    seed_everything(run_cfg.seed)  # the tiny test backbone is drawn from the run's seed, as build_run draws it
    reference = create_backbone(run_cfg.backbone, run_cfg.data.image_size).model
    for (name, p), (_, q) in zip(method.frozen_model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name


def test_calib_config_validation_and_refusal_for_simplecil(tmp_path):
    bad_values = ({"ridge": 0.0}, {"sdc_sigma": -1.0}, {"projection_dim": -1}, {"samples_per_class": 1})
    for bad in (*bad_values, {"adapted_weight": 0.0}):
        with pytest.raises(ValueError):
            CalibConfig(**bad)
    with pytest.raises(ConfigError, match=r"method\.calib\.head"):
        from_dict(RunConfig, tiny_config(method={"calib": {"head": "knn"}}))
    cfg = from_dict(RunConfig, tiny_config(method={"name": "simplecil", "calib": {"head": "ncm"}}))
    with pytest.raises(ValueError, match="head-based"):
        run_experiment(cfg, tmp_path / "run")


def test_calibration_is_off_in_every_shipped_preset_and_registered():
    for name in preset_names():
        cfg, _ = load_config(name)
        assert cfg.method.calib == CalibConfig() and not cfg.method.calib.active, name
    assert {"sdlora_calib", "seq_lora_calib"} <= set(METHODS)


def _run(tmp_path, cfg_dict, name, **kw):
    return run_experiment(from_dict(RunConfig, cfg_dict), tmp_path / name, **kw)


def _config(name, **calib):
    return tiny_config(
        method={"name": name, "calib": calib},
        data={"train_per_class": 8, "test_per_class": 4},
        train={"epochs": 2, "threads": 1},
    )


def test_calibrated_run_trains_as_sdlora_keeps_no_samples_and_resumes_exactly(tmp_path):
    cfg = _config("sdlora_calib", projection_dim=12)  # sizes apart from the sample counts 16 and 48
    full = _run(tmp_path, cfg, "full")
    plain = _run(tmp_path, _config("sdlora"), "plain")
    # The head changes predictions, not training: the adapter and trained head equal plain SD-LoRA's.
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    p, _ = load_checkpoint(latest_checkpoint(tmp_path / "plain"))
    for k in p:
        if not k.startswith("rng."):
            assert torch.equal(a[k], p[k]), k
    assert [e["loss"] for e in full["task_log"]] == [e["loss"] for e in plain["task_log"]]
    # No per-sample tensor: only per-class statistics (6 classes; 12 projected + 32 frozen + 32 adapted
    # features), the projection and the fitted head. The frozen backbone's weights are not saved.
    calib = {k: v.shape for k, v in a.items() if k.startswith("calib.")}
    assert calib == {
        "calib.counts": (6,),
        "calib.means": (6, 76),
        "calib.covs_upper": (76 * 77 // 2,),  # the pooled scatter, symmetric: its upper triangle
        "calib.projection": (32, 12),
        "calib.weight": (77, 6),
    }
    assert not any(k.startswith("frozen_model") for k in a)
    assert full["inference_passes"] == 2 and plain["inference_passes"] == 1
    n_train = 8 * 2  # samples of one task
    assert all(n_train not in v.shape and 8 * 6 not in v.shape for k, v in a.items() if not k.startswith("rng."))
    method, _, _ = build_method_from_run(tmp_path / "full")
    assert method._features_before is None
    assert method.parameter_counts()["stored"] == full["stored_params_total"]
    reports = [e["method_report"] for e in full["task_log"]]
    assert reports[0]["calib_head"] == "ridge" and "drift_mean_shift" not in reports[0]
    assert all(r["drift_samples"] == n_train for r in reports[1:])
    # Resume: a run killed during task 3 redoes it identically.
    part = tmp_path / "part"
    _run(tmp_path, cfg, "part")
    for f in (part / "checkpoints").glob("task_002.*"):
        f.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    resumed = _run(tmp_path, cfg, "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    b, _ = load_checkpoint(latest_checkpoint(part))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))


@pytest.mark.parametrize("head", ["ncm", "ridge", "both"])
def test_predictions_use_the_evaluated_head(tmp_path, head):
    """The restored method scores the test data with the calibrated head, as the run evaluated it."""
    from torch.utils.data import DataLoader

    from sdlora.engine import build_run

    if head == "both":
        cfg = _config("sdlora", head="ridge", drift="linear", features="both", projection_dim=8)
    else:
        cfg = _config("sdlora", head=head, drift="linear")
    res = _run(tmp_path, cfg, "run")
    method, run_cfg, _ = build_method_from_run(tmp_path / "run")
    method.eval()
    _, data, scenario, _ = build_run(run_cfg, torch.device("cpu"))
    test = scenario.subset(data.test, data.test_targets, list(range(scenario.num_tasks)))
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=64):
            f = method.features(x)
            logits = method(x)
            frozen = method.frozen_model(x) if head == "both" else None
            assert torch.equal(logits, method.calib.logits(method.calib.inputs(f, frozen)))
            correct += int((logits.argmax(1) == y).sum())
    assert 100.0 * correct / len(test) == pytest.approx(res["acc_after_task"][-1])
    classifier = method.classifier()
    assert (classifier is None) == (head != "ridge")  # only the ridge on the adapted features is linear in them
    # `sdlora predict` merges the adapter first (merge_for_inference): the same calibrated predictions.
    x, _ = next(iter(DataLoader(test, batch_size=64)))
    with torch.no_grad():
        before = method(x)
        method.merge_for_inference()
        torch.testing.assert_close(method(x), before, atol=1e-4, rtol=1e-4)


def test_a_calibrated_run_of_another_projection_width_says_how_to_load_it(tmp_path):
    """A run whose config.yaml does not state the projection it used (saved before the registry entry's settings
    were written, when the default width differed) is refused with the width to write, and loads with it."""
    from sdlora.configtools import dump_yaml, load_yaml
    from sdlora.rundir import CONFIG_HEADER

    _run(tmp_path, _config("sdlora_calib", projection_dim=12), "run")
    path = tmp_path / "run" / "config.yaml"
    saved = load_yaml(path)
    saved["method"]["calib"].update(head="linear", drift="none", features="adapted", projection_dim=0)
    path.write_text(CONFIG_HEADER + dump_yaml(saved))
    with pytest.raises(ValueError, match=r"method\.calib\.projection_dim: 12 in its config\.yaml"):
        build_method_from_run(tmp_path / "run")
    saved["method"]["calib"]["projection_dim"] = 12
    path.write_text(CONFIG_HEADER + dump_yaml(saved))
    method, _, _ = build_method_from_run(tmp_path / "run")
    assert method.calib is not None and method.calib.projection.shape == (32, 12)


def test_a_checkpoint_without_the_projection_is_refused():
    head = CalibratedHead(CalibConfig(head="ridge", features="both", projection_dim=4), 3)
    head.ensure_projection(seed=1)
    saved = head.tensors("calib.")
    del saved["calib.projection"]
    with pytest.raises(ValueError, match=r"no calibrated head projection \(calib\.projection\)"):
        CalibratedHead(head.cfg, 3).load(saved, "calib.")
