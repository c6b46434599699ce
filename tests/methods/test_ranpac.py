"""RanPAC: the incremental ridge head equals the batch solution on all data seen so far, the ridge parameter is the
held-out argmin, the held-out split and the statistics do not depend on batching or processes, the projection
survives resume, and the first-task adaptation merges a LoRA into the backbone."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from method_helpers import make_ctx, random_batches, run_tiny, tiny_method, two_task_config

from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.configtools import ConfigError
from sdlora.methods import TaskContext
from sdlora.methods.ranpac import holdout_mask, pack_symmetric, ridge_solve, unpack_symmetric
from sdlora.rundir import build_method_from_run, latest_checkpoint, load_checkpoint

M = 48  # projection width for the tiny model (features are 32-wide)


def _config(**options) -> dict:
    cfg = two_task_config("ranpac")
    cfg["method"]["options"] = {"projection_dim": M, **options}
    return cfg


def _batch_solution(method, batches, num_classes: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression on all samples at once: (H^T H + ridge I)^{-1} H^T Y, and H^T H."""
    with torch.no_grad():
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        h = method.project(method.features(x)).double()
    gram = h.t() @ h
    w = torch.linalg.solve(
        gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64), h.t() @ F.one_hot(y, num_classes).double()
    )
    return w, gram


def _learn(method, tasks) -> None:
    method.eval()
    for t, (start, end, batches) in enumerate(tasks):
        ctx = make_ctx(t, start, end, batches, num_tasks=len(tasks))
        method.begin_task(ctx)
        assert method.trainable_parameters() == []
        method.end_task(ctx)


def test_incremental_ridge_equals_the_batch_solution_on_all_data_seen():
    method = tiny_method("ranpac", options={"projection_dim": M})
    tasks = [
        (0, 2, random_batches(0, 2, n_batches=4, size=8, seed=1)),
        (2, 4, random_batches(2, 4, n_batches=4, size=8, seed=2)),
    ]
    _learn(method, tasks[:1])
    ridge = method.ridge
    assert ridge in method.options.ridges
    w1, g1 = _batch_solution(method, tasks[0][2], 2, ridge)
    torch.testing.assert_close(method.gram, g1, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(ridge_solve(method.gram, method.targets, ridge), w1, rtol=1e-6, atol=1e-6)
    _learn_one = tasks[1]
    ctx = make_ctx(1, 2, 4, _learn_one[2])
    method.begin_task(ctx)
    method.end_task(ctx)
    assert method.ridge == ridge  # first_task: selected once
    w2, g2 = _batch_solution(method, tasks[0][2] + tasks[1][2], 4, ridge)
    torch.testing.assert_close(method.gram, g2, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(method.weight.double().t(), w2, rtol=1e-5, atol=1e-5)  # float32 head
    torch.testing.assert_close(ridge_solve(method.gram, method.targets, ridge), w2, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = method.project(method.features(x)).double() @ w2
    torch.testing.assert_close(method(x).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("selection", ["first_task", "every_task"])
def test_ridge_is_the_held_out_argmin(selection):
    method = tiny_method(
        "ranpac", options={"projection_dim": M, "ridge_selection": selection, "ridges": [1e-3, 1e-1, 1e1, 1e3]}
    )
    tasks = [
        (0, 2, random_batches(0, 2, n_batches=5, size=8, seed=3)),
        (2, 4, random_batches(2, 4, n_batches=5, size=8, seed=4)),
    ]
    for t, (start, end, batches) in enumerate(tasks):
        ctx = make_ctx(t, start, end, batches)
        method.begin_task(ctx)
        report = method.end_task(ctx)
        assert report["ridge_selected"] == (t == 0 or selection == "every_task")
        if not report["ridge_selected"]:
            continue
        with torch.no_grad():
            x = torch.cat([x for x, _ in batches])
            y = F.one_hot(torch.cat([y for _, y in batches]) - start, end - start).double()
            h = method.project(method.features(x)).double()
        held = holdout_mask(x, 0.2)
        assert 0 < int(held.sum()) < len(held)
        losses = []
        for lam in method.options.ridges:
            w = torch.linalg.solve(
                h[~held].t() @ h[~held] + lam * torch.eye(M, dtype=torch.float64), h[~held].t() @ y[~held]
            )
            losses.append(float(((h[held] @ w - y[held]) ** 2).mean()))
        torch.testing.assert_close(torch.tensor(report["ridge_losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-7)
        assert method.ridge == method.options.ridges[min(range(len(losses)), key=losses.__getitem__)]


def test_holdout_split_does_not_depend_on_batching_or_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, 8, 8, generator=g)
    mask = holdout_mask(x, 0.2)
    assert 0.15 < float(mask.float().mean()) < 0.25
    assert torch.equal(torch.cat([holdout_mask(x[i : i + 7], 0.2) for i in range(0, 1000, 7)]), mask)
    perm = torch.randperm(1000, generator=g)
    assert torch.equal(holdout_mask(x[perm], 0.2), mask[perm])
    assert torch.equal(holdout_mask(x, 0.2, chunk=5), mask)  # chunking of the hash does not matter
    # Token batches (dicts of int64 tensors) split the same way.
    ids = {"input_ids": torch.randint(0, 30000, (200, 12), generator=g), "attention_mask": torch.ones(200, 12).long()}
    tok = holdout_mask(ids, 0.2)
    assert 0.1 < float(tok.float().mean()) < 0.3
    assert torch.equal(holdout_mask({k: v[50:] for k, v in ids.items()}, 0.2), tok[50:])


def test_statistics_are_summed_over_processes():
    """Two "processes" (threads) hold one shard each and sum through all_reduce: same head as one process."""
    tasks = [
        (0, 2, random_batches(0, 2, n_batches=4, size=8, seed=5)),
        (2, 4, random_batches(2, 4, n_batches=4, size=8, seed=6)),
    ]
    single = tiny_method("ranpac", seed=3, options={"projection_dim": M})
    _learn(single, tasks)
    methods = [tiny_method("ranpac", seed=3, options={"projection_dim": M}) for _ in range(2)]
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]

    def all_reduce_for(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]  # the same order on both ranks
            barrier.wait()
            t.copy_(total)
            return t

        return reduce

    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            m = methods[rank]
            m.eval()
            for t, (start, end, batches) in enumerate(tasks):
                shard = batches[rank::2]
                ctx = TaskContext(
                    task=t,
                    num_tasks=2,
                    class_start=start,
                    class_end=end,
                    device=torch.device("cpu"),
                    epochs=0,
                    statistics_batches=lambda shard=shard: iter(shard),
                    all_reduce=all_reduce_for(rank),
                )
                m.begin_task(ctx)
                m.end_task(ctx)
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert torch.equal(methods[0].weight, methods[1].weight) and methods[0].ridge == methods[1].ridge == single.ridge
    torch.testing.assert_close(methods[0].gram, single.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(methods[0].weight, single.weight, rtol=1e-5, atol=1e-6)


def test_two_tasks_end_to_end_and_projection_survives_resume(tmp_path):
    full = run_tiny(tmp_path / "full", _config())
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["completed_tasks"] == 2 and saved["method"] == "ranpac"
    assert saved["trainable_params_per_task"] == [0, 0]
    assert saved["stored_params_total"] == 32 * M + M * M + M * 4 + 4 * M
    assert saved["task_log"][0]["method_report"]["ridge_selected"] is True
    # Kill after the first task and resume: the projection comes back and the run ends identically.
    part = tmp_path / "part"
    run_tiny(part, _config())
    for p in (part / "checkpoints").glob("task_001.*"):
        p.unlink()
    res = json.loads((part / "results.json").read_text())
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed = run_tiny(part, _config(), resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b, _ = load_checkpoint(latest_checkpoint(part))
    assert torch.equal(a["ranpac.projection"], b["ranpac.projection"])
    assert torch.equal(a["ranpac.gram_upper"], b["ranpac.gram_upper"])
    assert torch.equal(a["ranpac.weight"], b["ranpac.weight"])
    method, _, _ = build_method_from_run(part)
    assert torch.equal(method.projection, a["ranpac.projection"])
    # The projection is part of the state: a method built under another RNG state gets it back from there.
    tensors, meta = method.state()
    other = tiny_method("ranpac", seed=99, options={"projection_dim": M})
    assert not torch.equal(other.projection, tensors["ranpac.projection"])
    other.load_state(tensors, meta)
    assert torch.equal(other.projection, tensors["ranpac.projection"])
    assert torch.equal(other.gram, method.gram) and torch.equal(other.weight, method.weight)
    assert other.ridge == method.ridge
    fresh = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    assert type(method.export_backbone()) is type(fresh)


def test_first_task_adaptation_merges_a_lora_then_stays_frozen(tmp_path):
    results = run_tiny(tmp_path / "run", _config(adapt_first_task=True))
    assert results["trainable_params_per_task"][0] > 0 and results["trainable_params_per_task"][1] == 0
    assert results["task_log"][0]["method_report"]["adapted"] is True
    method, cfg, _ = build_method_from_run(tmp_path / "run")
    torch.manual_seed(cfg.seed)
    fresh = create_backbone(cfg.backbone, cfg.data.image_size).model
    plain = method.export_backbone()
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed)
    x = torch.randn(2, 3, 32, 32)
    method.eval()
    again, _, _ = build_method_from_run(tmp_path / "run")
    again.eval()
    assert torch.equal(method(x), again(x))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"projection_dim": -1}, "projection_dim"),
        ({"holdout": 1.0}, "holdout"),
        ({"ridges": []}, "ridges"),
        ({"ridge": 0.0}, "ridge"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        tiny_method("ranpac", options=options)


def test_too_few_samples_for_selection_is_a_clear_error():
    method = tiny_method("ranpac", options={"projection_dim": M})
    one = [(torch.randn(1, 3, 32, 32), torch.tensor([0]))]
    ctx = make_ctx(0, 0, 2, one)
    method.begin_task(ctx)
    with pytest.raises(RuntimeError, match="method.options.ridge"):
        method.end_task(ctx)
    fixed = tiny_method("ranpac", options={"projection_dim": M, "ridge": 1.0})
    fixed.begin_task(ctx)
    assert fixed.end_task(ctx)["ridge"] == 1.0


def test_symmetric_packing_round_trips():
    h = torch.randn(7, 5, dtype=torch.float64)
    g = h.t() @ h
    packed = pack_symmetric(g)
    assert packed.numel() == 5 * 6 // 2
    assert torch.equal(unpack_symmetric(packed, 5), g)
    with pytest.raises(ValueError, match="expected 10"):
        unpack_symmetric(packed, 4)
