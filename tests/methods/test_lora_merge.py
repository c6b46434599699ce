"""lora_merge: after task t the backbone weights are W0 plus the sum of the per-task LoRA updates, each task starts a
fresh LoRA on the merged weights, and a checkpoint restores the merged weights bit for bit."""

from __future__ import annotations

import json

import torch
from method_helpers import make_ctx, random_batches, run_tiny, tiny_method, two_task_config

from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.lora import SDLoRAModel
from sdlora.rundir import build_method_from_run


def _train_task(method, ctx, batches, steps: int = 3) -> None:
    method.begin_task(ctx)
    assert isinstance(method.model, SDLoRAModel)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=0.05)
    method.train()
    for _ in range(steps):
        for x, y in batches:
            loss = method.training_loss(method(x), y, ctx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    method.end_task(ctx)
    method.eval()


def _qkv(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merged_weights_are_w0_plus_the_sum_of_task_updates():
    method = tiny_method("lora_merge", adapter={"rank": 2})
    w0 = _qkv(method.model)
    d = 32
    updates: dict[str, torch.Tensor] = {}
    for t, (start, end) in enumerate([(0, 2), (2, 4), (4, 6)]):
        batches = random_batches(start, end, seed=t)
        _train_task(method, make_ctx(t, start, end, batches, num_tasks=3), batches)
        assert not isinstance(method.model, SDLoRAModel)  # between tasks: a plain, merged backbone
        tensors, _ = method.merged_tasks[-1]
        for i in range(2):
            for proj, row in (("q", 0), ("v", 2)):
                name = f"blocks.{i}.attn.qkv.{proj}"
                delta = torch.zeros(3 * d, d)
                delta[row * d : (row + 1) * d] = tensors[f"{name}.B_cur"] @ tensors[f"{name}.A_cur"]
                key = f"blocks.{i}.attn.qkv.weight"
                updates[key] = updates.get(key, torch.zeros(3 * d, d)) + delta
        now = _qkv(method.model)
        assert now.keys() == w0.keys()
        for key, value in now.items():
            expected = w0[key] + updates[key] if key in updates else w0[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert all(float(u.abs().sum()) > 0 for u in updates.values())
    assert len(method.merged_tasks) == 3
    # Keys untouched: k slice of qkv and every other tensor.
    for i in range(2):
        key = f"blocks.{i}.attn.qkv.weight"
        assert torch.equal(method.model.state_dict()[key][d : 2 * d], w0[key][d : 2 * d])


def test_each_task_starts_a_fresh_lora_on_the_merged_weights():
    method = tiny_method("lora_merge", adapter={"rank": 2})
    batches = random_batches(0, 2, seed=0)
    _train_task(method, make_ctx(0, 0, 2, batches), batches)
    merged = _qkv(method.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = method.features(x)
    method.begin_task(make_ctx(1, 2, 4, batches))
    adapter = method.model
    assert isinstance(adapter, SDLoRAModel)
    assert all(float(u.B_cur.detach().abs().sum()) == 0 for _, u in adapter.named_units())  # B = 0: function unchanged
    with torch.no_grad():
        assert torch.equal(method.features(x), before)
    base = {k.replace(".base.", "."): v for k, v in adapter.backbone.state_dict().items() if "units" not in k}
    assert all(torch.equal(base[k], merged[k]) for k in merged)


def test_runs_two_tasks_and_checkpoint_restores_merged_weights_exactly(tmp_path):
    cfg = two_task_config("lora_merge")
    results = run_tiny(tmp_path / "run", cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["completed_tasks"] == 2 and saved["protocol"] == "plain"
    assert results["acc"] == saved["acc"] and min(saved["trainable_params_per_task"]) > 0
    assert [e["method_report"]["merged_tasks"] for e in saved["task_log"]] == [1, 2]
    method, _, _ = build_method_from_run(tmp_path / "run")
    again, _, _ = build_method_from_run(tmp_path / "run")
    a, b = _qkv(method.model), _qkv(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = method.export_backbone()
    fresh = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    assert type(plain) is type(fresh) and set(plain.state_dict()) == set(fresh.state_dict())


def test_reloaded_method_is_bit_identical_to_the_trained_one():
    method = tiny_method("lora_merge", seed=1, adapter={"rank": 2})
    for t, (start, end) in enumerate([(0, 2), (2, 4)]):
        batches = random_batches(start, end, seed=10 + t)
        _train_task(method, make_ctx(t, start, end, batches), batches)
    tensors, meta = method.state()
    fresh = tiny_method("lora_merge", seed=1, adapter={"rank": 2})
    fresh.load_state(tensors, meta)
    a, b = _qkv(method.model), _qkv(fresh.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 3, 32, 32)
    fresh.eval()
    assert torch.equal(method(x), fresh(x))
    assert method.parameter_counts() == fresh.parameter_counts()
