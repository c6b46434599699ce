"""Classifier alignment (SLCA stage 2): statistics equal a direct computation (also split over processes), the
Gaussian sampler has the stored moments, alignment fixes a planted head offset, and runs with alignment resume
exactly and count the statistics as stored parameters."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from engine_helpers import tiny_config
from sdlora.alignment import AlignConfig, FeatureStatistics, align_head, block_normalised_logits
from sdlora.config import RunConfig
from sdlora.configtools import ConfigError, from_dict
from sdlora.engine import run_experiment
from sdlora.heads import IncrementalLinear
from sdlora.methods import load_run_config
from sdlora.rundir import build_method_from_run, latest_checkpoint, load_checkpoint


def _data(n_classes: int, per_class: int, d: int, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    x = torch.cat(
        [centres[c] + spread * torch.randn(per_class, d, generator=g, dtype=torch.float64) for c in range(n_classes)]
    )
    y = torch.arange(n_classes).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _identity(x):
    return x


@pytest.mark.parametrize("covariance", ["full", "diagonal", "shared"])
def test_statistics_equal_direct_computation(covariance):
    d = 5
    x0, y0 = _data(2, 9, d, seed=1)
    x1, y1 = _data(3, 7, d, seed=2)
    y1 = y1 + 2
    stats = FeatureStatistics(d, covariance)
    stats.add_classes(iter(_batches(x0, y0, 4)), _identity, 0, 2)
    stats.add_classes(iter(_batches(x1, y1, 5)), _identity, 2, 5)
    xs, ys = torch.cat([x0, x1]), torch.cat([y0, y1])
    assert stats.num_classes == 5
    assert stats.counts.tolist() == [9, 9, 7, 7, 7]
    for c in range(5):
        xc = xs[ys == c]
        torch.testing.assert_close(stats.means[c], xc.mean(0).float())
        cov = torch.cov(xc.t())
        if covariance == "full":
            torch.testing.assert_close(stats.covariance_of(c), cov, rtol=1e-6, atol=1e-6)
        elif covariance == "diagonal":
            torch.testing.assert_close(stats.covariance_of(c), cov.diagonal(), rtol=1e-6, atol=1e-6)
    if covariance == "shared":  # pooled within-class covariance
        scatter = sum((xs[ys == c] - xs[ys == c].mean(0)).t() @ (xs[ys == c] - xs[ys == c].mean(0)) for c in range(5))
        torch.testing.assert_close(stats.covariance_of(0), scatter / (len(ys) - 5), rtol=1e-9, atol=1e-9)
    assert (
        stats.numel()
        == {"full": 5 + 5 * d + 5 * d * d, "diagonal": 5 + 10 * d, "shared": 5 + 5 * d + d * d}[covariance]
    )


def test_statistics_summed_over_processes_equal_single_process():
    """Two 'processes' (threads) each see a shard; all_reduce sums the moments: same statistics as one process."""
    d = 4
    x, y = _data(3, 10, d, seed=3)
    single = FeatureStatistics(d, "full")
    single.add_classes(iter(_batches(x, y, 6)), _identity, 0, 3)

    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]
    results: list[FeatureStatistics] = []
    lock = threading.Lock()

    def worker(rank: int) -> None:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        shard = (x[rank::2], y[rank::2])
        stats = FeatureStatistics(d, "full")
        # Rank 1 gets no batch at all for its last call pattern: an empty iterator must still take part.
        batches = iter(_batches(*shard, 4)) if rank == 0 else iter(_batches(*shard, 100))
        stats.add_classes(batches, _identity, 0, 3, all_reduce)
        with lock:
            results.append(stats)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    for stats in results:
        assert torch.equal(stats.counts, single.counts)
        torch.testing.assert_close(stats.means, single.means)
        torch.testing.assert_close(stats.covs, single.covs, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0].covs, results[1].covs)


@pytest.mark.parametrize("covariance", ["full", "diagonal", "shared"])
def test_statistics_round_trip_through_tensors(covariance):
    d = 4
    x, y = _data(3, 6, d, seed=3)
    stats = FeatureStatistics(d, covariance)
    stats.add_classes(iter(_batches(x, y, 5)), _identity, 0, 3)
    saved = stats.tensors("s.")
    if covariance == "shared":  # symmetric: only its upper triangle is written
        assert saved["s.covs_upper"].shape == (d * (d + 1) // 2,) and "s.covs" not in saved
    back = FeatureStatistics(d, covariance)
    back.load(saved, "s.")
    for name in ("counts", "means", "covs"):
        assert torch.equal(getattr(back, name), getattr(stats, name)), name
    if covariance == "shared":  # a checkpoint written before the packing (the full d x d) still loads
        old = FeatureStatistics(d, covariance)
        old.load({"s.counts": stats.counts, "s.means": stats.means, "s.covs": stats.covs}, "s.")
        assert torch.equal(old.covs, stats.covs)
        with pytest.raises(ValueError, match="packed symmetric"):
            FeatureStatistics(d + 1, covariance).load(saved, "s.")


@pytest.mark.parametrize("covariance", ["full", "diagonal", "shared"])
def test_samples_have_the_stored_moments(covariance):
    d = 3
    x, y = _data(2, 40, d, seed=4, spread=2.0)
    stats = FeatureStatistics(d, covariance)
    stats.add_classes(iter(_batches(x, y, 16)), _identity, 0, 2)
    factors = stats.sampling_factors(0.0)
    xs, ys = stats.sample(factors, 20000, torch.Generator().manual_seed(0))
    for c in range(2):
        xc = xs[ys == c]
        torch.testing.assert_close(xc.mean(0), stats.means[c].double(), rtol=0, atol=0.1)
        want = stats.covariance_of(c)
        got = torch.cov(xc.t())
        torch.testing.assert_close(got.diagonal() if covariance == "diagonal" else got, want, rtol=0.1, atol=0.1)
    # Shrinkage moves every covariance towards (tr / d) I, keeping the trace.
    shrunk = stats.sampling_factors(1.0)[0]
    if covariance != "diagonal":
        cov1 = shrunk @ shrunk.t()
        expected = torch.trace(stats.covariance_of(0)) / d * torch.eye(d, dtype=torch.float64)
        torch.testing.assert_close(cov1, expected, rtol=1e-9, atol=1e-9)


def _accuracy(head, x, y):
    with torch.no_grad():
        return float((head(x.float()).argmax(1) == y).float().mean())


@pytest.mark.parametrize("params", ["head", "block_affine"])
@pytest.mark.parametrize("logit_norm", [0.1, None])
def test_alignment_fixes_a_planted_head_offset(logit_norm, params):
    """Two tasks of two classes whose heads were trained apart (current-task loss): each block separates its own
    classes, but a planted offset makes block 0 win everywhere. Alignment on the stored Gaussians fixes it."""
    torch.manual_seed(0)
    d = 8
    x, y = _data(4, 50, d, seed=5)
    head = IncrementalLinear(d, init="zeros")
    stats = FeatureStatistics(d, "full")
    for task in range(2):
        head.grow(2)
        head.set_trainable(train_old=False)
        m = (y >= 2 * task) & (y < 2 * task + 2)
        opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=0.05)
        for _ in range(200):  # current-task-only cross-entropy, as the paper's loss
            opt.zero_grad()
            logits = head(x[m].float())[:, 2 * task : 2 * task + 2]
            torch.nn.functional.cross_entropy(logits, y[m] - 2 * task).backward()
            opt.step()
        stats.add_classes(iter(_batches(x[m], y[m], 32)), _identity, 2 * task, 2 * task + 2)
    clean = _accuracy(head, x, y)  # each block trained on its own task only: calibrated by chance
    with torch.no_grad():
        typical = head(x.float()).abs().mean()
        head.biases[0].add_(typical * 0.7)  # the planted calibration error between the two blocks
    assert _accuracy(head, x, y) < 0.6  # task 1 is (almost) never predicted
    with torch.no_grad():
        within_before = [head(x.float())[:, 2 * b : 2 * b + 2].argmax(1) for b in range(2)]
    cfg = AlignConfig(enabled=True, logit_norm=logit_norm, params=params)  # SLCA's settings otherwise
    report = align_head(head, stats, cfg, seed=1, task=1)
    assert report["align_samples"] == 4 * cfg.samples_per_class
    if params == "head":
        assert _accuracy(head, x, y) > 0.95
    else:  # a positive scale and an offset per block: better than before the offset, each block ranks as before
        assert _accuracy(head, x, y) > clean + 0.03
        with torch.no_grad():
            within_after = [head(x.float())[:, 2 * b : 2 * b + 2].argmax(1) for b in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(within_before, within_after))
    assert [p.requires_grad for p in head.parameters()] == [False, True, False, True]  # flags restored


def test_alignment_is_deterministic_and_needs_matching_head():
    d = 6
    x, y = _data(4, 12, d, seed=6)
    stats = FeatureStatistics(d, "diagonal")
    stats.add_classes(iter(_batches(x, y, 8)), _identity, 0, 4)
    heads = []
    for _ in range(2):
        torch.manual_seed(3)
        head = IncrementalLinear(d)
        head.grow(2)
        head.grow(2)
        align_head(head, stats, AlignConfig(enabled=True, epochs=2, samples_per_class=16), seed=9, task=1)
        heads.append(torch.cat(list(head.weights)))
    assert torch.equal(heads[0], heads[1])
    small = IncrementalLinear(d)
    small.grow(2)
    with pytest.raises(ValueError, match="statistics hold 4"):
        align_head(small, stats, AlignConfig(enabled=True), seed=0, task=1)
    with pytest.raises(ValueError, match="start at 2"):
        stats.add_classes(iter([]), _identity, 2, 4)


def test_block_normalised_logits_keep_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    out = block_normalised_logits(logits, [2, 3], 0.1)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    norms = torch.stack([logits[:, :2].norm(dim=1), logits[:, 2:].norm(dim=1)], 1).mean(1, keepdim=True)
    torch.testing.assert_close(out, logits / (norms + 1e-7) / 0.1)


def test_align_config_validation_and_refusal_for_simplecil(tmp_path):
    nan = float("nan")
    for bad, key in (
        ({"shrinkage": 1.5}, "shrinkage"),
        ({"shrinkage": nan}, "shrinkage"),
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"lr": 0.0}, "lr"),
        ({"lr": nan}, "lr"),
        ({"weight_decay": nan}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"logit_norm": -1.0}, "logit_norm"),
        ({"logit_norm": float("inf")}, "logit_norm"),
    ):
        with pytest.raises(ValueError, match=f"^{key} must"):
            AlignConfig(**bad)
    cfg = from_dict(RunConfig, tiny_config(method={"name": "simplecil", "align": {"enabled": True}}))
    with pytest.raises(ValueError, match="head-based"):
        run_experiment(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"method\.align\.covariance"):
        from_dict(RunConfig, tiny_config(method={"align": {"covariance": "low_rank"}}))


def test_alignment_is_off_in_every_shipped_preset():
    from sdlora.config import preset_names

    for name in preset_names():
        cfg, _ = load_run_config(name)
        assert not cfg.method.align.enabled, name


def _run(tmp_path, cfg_dict, name, **kw):
    cfg = from_dict(RunConfig, cfg_dict)
    return run_experiment(cfg, tmp_path / name, **kw)


def test_run_with_alignment_resumes_exactly_and_counts_statistics(tmp_path):
    small = {"train_per_class": 8, "test_per_class": 4}
    cfg = tiny_config(
        method={"name": "sdlora_ca", "align": {"epochs": 2, "samples_per_class": 32}},
        data=small,
        train={"epochs": 2, "threads": 1},
    )
    full = _run(tmp_path, cfg, "full")
    # A run killed during task 3: its last checkpoint is task 2's; resuming must redo task 3 identically.
    part = tmp_path / "part"
    _run(tmp_path, cfg, "part")
    for p in (part / "checkpoints").glob("task_002.*"):
        p.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    resumed = _run(tmp_path, cfg, "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b, _ = load_checkpoint(latest_checkpoint(part))
    keys = [k for k in a if not k.startswith("rng.")]
    assert sorted(keys) == sorted(k for k in b if not k.startswith("rng."))
    assert all(torch.equal(a[k], b[k]) for k in keys)
    # The statistics are in the checkpoint and counted as stored parameters (32-wide features, 6 classes).
    assert a["align.means"].shape == (6, 32) and a["align.covs"].shape == (6, 32, 32)
    method, _, _ = build_method_from_run(tmp_path / "full")
    assert method.parameter_counts()["stored"] == full["stored_params_total"]
    assert method.align_stats is not None and method.align_stats.numel() == 6 + 6 * 32 + 6 * 32 * 32
    method.align_stats = None
    assert full["stored_params_total"] - method.parameter_counts()["stored"] == 6 + 6 * 32 + 6 * 32 * 32
    reports = [entry["method_report"] for entry in full["task_log"]]
    assert "align_loss" not in reports[0]  # one head block: nothing to align yet
    assert [r["align_samples"] for r in reports[1:]] == [4 * 32, 6 * 32]
