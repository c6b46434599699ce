"""Which function is evaluated between tasks (issue 9): the official protocol evaluates a task as it was trained
and normalises at the next ``begin_task``; the paper protocol is continuous across ``end_task``; SD-LoRA-KD's
absorbed branch matches the kept branch; the pending state survives a save/load; merged models refuse training."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import TARGETS, make, randomise_current, tiny_vit

from sdlora.lora import AdapterConfig, SDLoRAModel, component_norm


def make64(cfg: AdapterConfig, seed: int = 0) -> SDLoRAModel:
    return SDLoRAModel(tiny_vit(seed).double(), cfg, default_targets=TARGETS)


def train(model: SDLoRAModel, x: torch.Tensor, steps: int = 4, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def out(model: SDLoRAModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("compute", ["loop", "factored", "fold"])
def test_official_protocol_evaluates_the_task_as_trained(x, compute):
    model = make64(AdapterConfig(rank=2, protocol="official", compute=compute))
    x = x.double()
    for _task in range(3):
        model.begin_task()
        train(model, x)
        last_step = out(model, x)  # the function at the last training step
        model.end_task()
        after = out(model, x)
        if compute == "loop":  # the same products in the same order: bit for bit
            assert torch.equal(after, last_step)
        else:  # the frozen component is folded into the weight: float64 rounding only
            torch.testing.assert_close(after, last_step, rtol=0, atol=1e-12)
        # The exported backbone is that same function.
        with torch.no_grad():
            torch.testing.assert_close(model.merge_and_unload()(x), last_step, rtol=0, atol=1e-12)
        assert all(bool(u.pending_norm[-1]) for _, u in model.named_units())


def test_official_transition_normalises_and_recreates_magnitudes(x):
    model = make64(AdapterConfig(rank=2, protocol="official"))
    x = x.double()
    model.begin_task()
    train(model, x)
    model.end_task()
    model.begin_task()
    # Official code at the start of a task: every earlier component divided by ||B|| ||A||, magnitudes at 0.8.
    assert torch.equal(model.alphas(), torch.full((2,), 0.8))
    assert not any(bool(u.pending_norm.any()) for _, u in model.named_units())
    w_expected = {}
    for name, layer in zip(model._layer_names, model.layers()):
        w = layer.base.weight.detach().clone()
        for u in layer.units:
            a, b = u.A_frozen, u.B_frozen
            w[u.start : u.stop] += 0.8 * (b @ a) / (torch.linalg.norm(b) * torch.linalg.norm(a))
        w_expected[name] = w
    ref = tiny_vit(0).double()
    with torch.no_grad():
        for name, w in w_expected.items():
            ref.get_submodule(name).weight.copy_(w)
    # Normalisers are stored in float32 (relative 1e-7 on the update).
    torch.testing.assert_close(out(model, x), out(ref, x), rtol=1e-5, atol=1e-6)


def test_paper_protocol_is_continuous_across_end_task(x):
    model = make64(AdapterConfig(rank=2, protocol="paper"))
    x = x.double()
    for _task in range(3):
        before_begin = None if model.num_tasks == 0 else out(model, x)
        model.begin_task()
        if before_begin is not None:  # magnitudes carry over and the new B is zero
            torch.testing.assert_close(out(model, x), before_begin, rtol=0, atol=1e-12)
        train(model, x)
        last_step = out(model, x)
        model.end_task()
        # The frozen normaliser is stored in float32 (relative 1e-7) and the training one has a smooth floor
        # (relative norm_eps^2 / n^2).
        torch.testing.assert_close(out(model, x), last_step, rtol=1e-6, atol=1e-9)
        assert not any(bool(u.pending_norm.any()) for _, u in model.named_units())


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_kd_absorbed_branch_matches_kept_branch(x, protocol):
    """Same training, KD on and off: identical after the task, and after the next task's transition the
    absorbed direction contributes what the kept component contributes (here exactly: the new product is an
    exact combination of the earlier one)."""
    x = x.double()
    models = [make64(AdapterConfig(rank=2, protocol=protocol, kd=kd)) for kd in (True, False)]
    for model in models:
        torch.manual_seed(5)
        model.begin_task()
        randomise_current(model)
        model.end_task()
        torch.manual_seed(6)
        model.begin_task()
        with torch.no_grad():
            for _, u in model.named_units():
                u.A_cur.copy_(u.A_frozen)
                u.B_cur.copy_(-1.5 * u.B_frozen)
            model.alpha_cur.fill_(1.3)
            model.alpha_prev.fill_(0.7)
    absorbed, kept = models
    assert absorbed.end_task()["absorbed"] == len(absorbed.named_units())
    assert kept.end_task()["frozen"] == len(kept.named_units())
    # Normalisers and increments are float32 buffers: relative 1e-7.
    torch.testing.assert_close(out(absorbed, x), out(kept, x), rtol=1e-6, atol=1e-9)
    for model in models:
        torch.manual_seed(7)
        model.begin_task()
    assert all(u.num_frozen == 1 for _, u in absorbed.named_units())
    assert all(u.num_frozen == 2 for _, u in kept.named_units())
    torch.testing.assert_close(out(absorbed, x), out(kept, x), rtol=1e-6, atol=1e-9)


def test_kd_increment_follows_the_transition_magnitude():
    """Official protocol: after the transition the absorbed direction carries alpha_init * ||M_t|| / n_t, the
    weight the kept component would have (Eq. 8 with the kept branch's magnitude), not the trained alpha_t."""
    model = make64(AdapterConfig(rank=2, protocol="official", kd=True))
    model.begin_task()
    randomise_current(model)
    model.end_task()
    model.begin_task()
    with torch.no_grad():
        for _, u in model.named_units():
            u.A_cur.copy_(u.A_frozen)
            u.B_cur.copy_(2.0 * u.B_frozen)
        model.alpha_cur.fill_(3.0)
    cur = {n: (u.B_cur.detach().clone(), u.A_cur.detach().clone()) for n, u in model.named_units()}
    model.end_task()
    model.begin_task()
    for name, u in model.named_units():
        b, a = cur[name]
        m_norm = component_norm(b, a, "frobenius_of_product")
        n_t = component_norm(b, a, "product_of_frobenius")
        # d = M_t / ||M_t|| = D_0 * (n_0 / ||M_0||) = D_0 * coefficient; the weight on d is 0.8 * ||M_t|| / n_t.
        m0 = component_norm(u.B_frozen, u.A_frozen, "frobenius_of_product")
        coef = u.norms[0].double() / m0
        expected = 0.8 * m_norm / n_t * coef
        torch.testing.assert_close(u.kd_increment[0].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kd", [False, True])
def test_pending_state_round_trip_resumes_bit_exact(x, kd):
    """Save after an official-protocol task (pending normalisation, maybe a pending KD absorption), load into a
    fresh model, continue both: identical functions before and after the transition and the next training."""
    x = x.double()
    cfg = AdapterConfig(rank=2, protocol="official", kd=kd)
    model = make64(cfg)
    model.begin_task()
    randomise_current(model)
    model.end_task()
    model.begin_task()
    with torch.no_grad():
        for _, u in model.named_units():
            u.A_cur.copy_(u.A_frozen)
            u.B_cur.copy_(0.5 * u.B_frozen)
    model.end_task()
    assert all(bool(u.pending_norm[-1]) for _, u in model.named_units())
    assert all(bool(u.pending_absorb[-1]) == kd for _, u in model.named_units())
    tensors, meta = model.adapter_state()
    assert meta["format"] == "sdlora-adapter/2"
    fresh = make64(cfg)
    fresh.load_adapter_state(tensors, meta)
    assert torch.equal(out(fresh, x), out(model, x))
    for m in (model, fresh):
        torch.manual_seed(11)
        m.begin_task()
        train(m, x, seed=12)
    assert torch.equal(out(fresh, x), out(model, x))


def test_format_1_adapter_state_still_loads(x):
    model = make(AdapterConfig(rank=2, protocol="paper", kd=True))
    for _ in range(2):
        model.begin_task()
        randomise_current(model)
        model.end_task()
    tensors, meta = model.adapter_state()
    old = {k.replace(".kd_increment", ".extra"): v for k, v in tensors.items() if ".pending_" not in k}
    fresh = make(AdapterConfig(rank=2, protocol="paper", kd=True))
    fresh.load_adapter_state(old, {**meta, "format": "sdlora-adapter/1"})
    assert torch.equal(out(fresh, x), out(model, x))
    with pytest.raises(ValueError, match="not an sdlora adapter state"):
        fresh.load_adapter_state(tensors, {**meta, "format": "sdlora-adapter/9"})


def test_training_while_merged_is_refused(x):
    model = make(AdapterConfig(rank=2))
    model.begin_task()
    randomise_current(model)
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(x)  # autograd on, parameters that require grad: they would get no gradient
    with torch.no_grad():
        merged_out = model(x)  # inference while merged is what merging is for
    with pytest.raises(RuntimeError, match="unmerge"):
        model.end_task()
    model.unmerge()
    torch.testing.assert_close(model(x), merged_out, rtol=0, atol=1e-5)
    model.end_task()
    model.merge()
    model(x)  # nothing trains between tasks: allowed
    with pytest.raises(RuntimeError, match="unmerge"):
        model.begin_task()
    tensors, meta = model.adapter_state()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.load_adapter_state(tensors, meta)
    model.unmerge()
    model.begin_task()
