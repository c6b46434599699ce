"""L2P and CODA-Prompt: two tiny tasks end to end, the frozen backbone stays bit-identical, key matching picks the
prompts trained on the task, CODA freezes earlier components while L2P keeps its pool learning, and options and
backbones are checked."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from method_helpers import make_ctx, run_tiny, tiny_method, two_task_config

from sdlora.configtools import ConfigError
from sdlora.methods import create_method
from sdlora.methods.prompts import L2P, CodaPrompt, gram_schmidt_extend
from sdlora.rundir import build_method_from_run

TINY = {
    "l2p": {"pool_size": 4, "prompt_length": 4, "top_k": 2, "layers": [0, 1]},
    "coda_prompt": {"pool_size": 4, "prompt_length": 4, "layers": [0, 1], "ortho_weight": 0.1},
}


def _config(name: str) -> dict:
    cfg = two_task_config(name)
    cfg["method"]["options"] = TINY[name]
    return cfg


def _backbone_state(method) -> dict[str, torch.Tensor]:
    # The wrapped attention modules keep timm's parameters under ``...attn.attn.``.
    return {k: v.clone() for k, v in method.model.state_dict().items()}


@pytest.mark.parametrize("name", ["l2p", "coda_prompt"])
def test_runs_two_tasks_restores_and_refuses_export(tmp_path, name):
    results = run_tiny(tmp_path / "run", _config(name))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["completed_tasks"] == 2 and saved["method"] == name
    assert all(0.0 <= v <= 100.0 for v in saved["acc_after_task"]) and results["acc"] == saved["acc"]
    assert min(saved["trainable_params_per_task"]) > 0 and saved["stored_params_total"] > 0
    assert saved["inference_passes"] == 2  # the compare table's cost: query pass + prompted pass
    method, _, _ = build_method_from_run(tmp_path / "run")
    method.eval()
    x = torch.randn(3, 3, 32, 32)
    assert method(x).shape == (3, 4)
    again, _, _ = build_method_from_run(tmp_path / "run")
    again.eval()
    assert torch.equal(method(x), again(x))  # the checkpoint fully determines the predictions
    with pytest.raises(ValueError, match="no merged backbone"):
        method.export_backbone()


def _train(method, ctx, batches, steps: int = 30, lr: float = 0.05) -> None:
    method.begin_task(ctx)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=lr)
    method.train()
    for _ in range(steps):
        for x, y in batches:
            loss = method.training_loss(method(x), y, ctx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    method.end_task(ctx)
    method.eval()


def _task_batches(center: torch.Tensor, labels: tuple[int, int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = center + 0.05 * torch.randn(6, 3, 32, 32, generator=g)
        y = torch.tensor([labels[i % 2] for i in range(6)])
        out.append((x, y))
    return out


def test_backbone_bit_identical_and_coda_freezes_earlier_components():
    method = tiny_method("coda_prompt", options=TINY["coda_prompt"])
    fresh = _backbone_state(tiny_method("coda_prompt", options=TINY["coda_prompt"]))
    c0, c1 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    b0, b1 = _task_batches(c0, (0, 1), 1), _task_batches(c1, (2, 3), 2)
    _train(method, make_ctx(0, 0, 2, b0), b0, steps=3)
    assert method.per_task == 2 and all(method.frozen("p", i).shape[0] == 2 for i in (0, 1))
    snap = {(k, i): method.frozen(k, i).clone() for k in ("p", "k", "a") for i in (0, 1)}
    ctx1 = make_ctx(1, 2, 4, b1)
    method.begin_task(ctx1)
    # Task 2 trains only its own block (and its head block): the first task's components are buffers.
    trainable = {id(p) for p in method.trainable_parameters()}
    assert all(id(p) in trainable for p in (*method.cur_p, *method.cur_k, *method.cur_a))
    assert len(trainable) == 3 * 2 + 2  # p, k, a of two layers + the new head block (weight, bias)
    assert not any(method.frozen(k, i).requires_grad for k in ("p", "k", "a") for i in (0, 1))
    opt = torch.optim.Adam(method.trainable_parameters(), lr=0.05)
    method.train()
    for _ in range(3):
        for x, y in b1:
            loss = method.training_loss(method(x), y, ctx1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    method.end_task(ctx1)
    for (k, i), old in snap.items():
        assert method.frozen(k, i).shape[0] == 4
        assert torch.equal(method.frozen(k, i)[:2], old), f"task-1 {k} of layer {i} changed in task 2"
        assert not torch.equal(method.frozen(k, i)[2:], torch.zeros_like(old))
    after = _backbone_state(method)
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], fresh[k]) for k in after)  # the backbone is untouched by training


def test_coda_prompt_is_the_weighted_sum_of_components():
    method = tiny_method("coda_prompt", options=TINY["coda_prompt"])
    method.begin_task(make_ctx(0, 0, 2, []))
    method.eval()
    q = torch.randn(3, method.key_dim)
    pre, aux = method.prefixes(q)
    assert aux is None  # the orthogonality penalty is a training loss only
    p, k, a = method.components(0)
    alpha = torch.stack([F.cosine_similarity(q * a[m], k[m][None].expand_as(q), dim=-1) for m in range(2)], 1)
    prompt = torch.einsum("bm,mld->bld", alpha, p)
    torch.testing.assert_close(pre[0][0], prompt[:, :2])
    torch.testing.assert_close(pre[0][1], prompt[:, 2:])


def test_l2p_key_matching_selects_the_prompts_trained_on_the_task():
    torch.manual_seed(0)
    method = tiny_method("l2p", options={"pool_size": 6, "prompt_length": 2, "top_k": 1, "key_loss_weight": 1.0})
    # A random tiny ViT maps every image to nearly the same query; pin the query to the first pixels instead,
    # so the two tasks have clearly different queries (the prompted pass is unchanged).
    method.query = types.MethodType(lambda self, x: x.flatten(1)[:, : self.key_dim].detach(), method)
    before = _backbone_state(method)
    c0 = torch.randn(1, 3, 32, 32)
    c1 = -c0  # opposite queries: a key pulled to one task's queries is far from the other's
    b0, b1 = _task_batches(c0, (0, 1), 1), _task_batches(c1, (2, 3), 2)
    used = []
    for t, (batches, labels) in enumerate([(b0, (0, 2)), (b1, (2, 4))]):
        ctx = make_ctx(t, labels[0], labels[1], batches)
        prompts_before = method.prompts[0].detach().clone()
        _train(method, ctx, batches, steps=10)
        counts = ctx.all_reduce(method.selected.clone())
        used.append({int(i) for i in torch.nonzero(counts).flatten()})
        changed = (method.prompts[0].detach() - prompts_before).abs().flatten(1).sum(1) > 0
        # L2P freezes nothing: the prompts chosen in this task are the ones that changed.
        assert {int(i) for i in torch.nonzero(changed).flatten()} == used[-1]
    assert used[0] and used[1] and not used[0] & used[1]  # the tasks trained different prompts
    # At test time the prompts are those of the most similar keys, and each task's images pick prompts that
    # were trained on that task.
    for t, batches in enumerate([b0, b1]):
        q = method.query(torch.cat([x for x, _ in batches]))
        idx, sim = method.select(q)
        cos = F.normalize(q, dim=-1) @ F.normalize(method.keys[0].detach(), dim=-1).t()
        assert torch.equal(idx[:, 0], cos.argmax(1))
        torch.testing.assert_close(sim, cos)
        assert set(idx.flatten().tolist()) <= used[t]
    after = _backbone_state(method)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_gram_schmidt_extend_is_orthonormal_and_orthogonal_to_earlier_rows():
    prev = torch.randn(3, 10, dtype=torch.float64)
    new = gram_schmidt_extend(prev, 4)
    assert new.shape == (4, 10)
    torch.testing.assert_close(new @ new.t(), torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float((new @ prev.t()).abs().max()) < 1e-10
    # No room left: still unit vectors.
    full = gram_schmidt_extend(torch.randn(10, 10, dtype=torch.float64), 2)
    torch.testing.assert_close(full.norm(dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("l2p", {"prompt_length": 5}, "even"),
        ("l2p", {"top_k": 40}, "top_k"),
        ("l2p", {"layers": []}, "layers"),
        ("coda_prompt", {"ortho_weight": -1.0}, "ortho_weight"),
        ("coda_prompt", {"pool": 3}, "unknown key"),
    ],
)
def test_bad_options_are_refused_with_the_key(name, options, match):
    with pytest.raises(ConfigError, match=match):
        tiny_method(name, options=options)


def test_coda_pool_smaller_than_the_task_count_is_refused():
    method = tiny_method("coda_prompt", options={"pool_size": 3, "layers": [0]})
    with pytest.raises(ValueError, match="pool_size 3"):
        method.begin_task(make_ctx(0, 0, 2, [], num_tasks=10))


def test_classes_are_registered():
    from sdlora.methods import METHODS

    assert METHODS["l2p"] is L2P and METHODS["coda_prompt"] is CodaPrompt
    assert create_method is not None


@pytest.mark.parametrize(
    ("preset", "per_task"),
    [
        # L2P: pool 30 x length 20 x 768 prompts + 30 x 768 keys = 483,840 (SD-LoRA Table 5: 0.48M).
        ("l2p_imagenet_r_n10", 30 * 20 * 768 + 30 * 768),
        # CODA-Prompt at 10 tasks: 10 components x 5 blocks x (8 x 768 + 768 + 768) = 384,000 (Table 5: 0.38M).
        ("coda_prompt_imagenet_r_n10", 10 * 5 * (8 * 768 + 2 * 768)),
    ],
)
def test_presets_build_on_vit_b16_with_the_papers_prompt_budget(preset, per_task):
    from sdlora.backbones import create_backbone
    from sdlora.methods import load_run_config

    # Random init, five blocks (the prompted ones) and 32 px: the prompt budget depends only on width and layers.
    cfg, _ = load_run_config(preset, ["backbone.pretrained=false", "data.image_size=32", "backbone.kwargs.depth=5"])
    method = create_method(cfg.method, create_backbone(cfg.backbone, 32))
    method.begin_task(make_ctx(0, 0, 20, [], num_tasks=10))
    head = 20 * 768 + 20
    assert method.parameter_counts()["trainable"] == per_task + head
