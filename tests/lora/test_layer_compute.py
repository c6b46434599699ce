"""Compute modes of an adapted layer: same outputs and gradients everywhere, route choice, fold cache."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from lora_helpers import TARGETS, SeparateQV, make, randomise_current, run_tasks, tiny_vit
from torch import nn

from sdlora.lora import COMPUTE_MODES, AdapterConfig, SDLoRAModel, route_costs

FAST = ("auto", "fold", "factored")  # the folded modes with the custom autograd function


def absorb_one_direction(model: SDLoRAModel) -> None:
    """Begin a task whose direction is -2x the first frozen one and end it: KD stores a magnitude increment."""
    model.begin_task(rank=model.task_ranks[0])
    with torch.no_grad():
        for _, u in model.named_units():
            r = u.comp_ranks[0]
            u.A_cur.copy_(u.A_frozen[:r])
            u.B_cur.copy_(-2.0 * u.B_frozen[:, :r])
    report = model.end_task()
    assert report["absorbed"] == len(model.named_units())


def build_state(case: str, compute: str, dtype: torch.dtype) -> tuple[SDLoRAModel, torch.Tensor]:
    """A model in the middle of a task (frozen components plus a trained current one) and an input, in ``dtype``."""
    torch.manual_seed(11)
    if case == "separate":
        model = SDLoRAModel(SeparateQV(), AdapterConfig(rank=2, compute=compute), default_targets=["query", "value"])
        x = torch.randn(2, 5, 12)
    else:
        kw: dict = {"rank": 2, "compute": compute}
        kw.update(
            {
                "official": {"protocol": "official"},
                "paper": {"protocol": "paper"},
                "per_layer": {"protocol": "paper", "per_layer_magnitudes": True},
                "rr": {"protocol": "official", "rank_schedule": [3, 2, 4]},
                "kd": {"protocol": "official", "kd": True},
                "first_only": {"components": "first_only"},
                "fixed_old": {"train_old_magnitudes": False},
            }[case]
        )
        model = make(AdapterConfig(**kw))
        x = torch.randn(3, 3, 16, 16)
    torch.manual_seed(7)
    if case == "kd":
        run_tasks(model, 2)
        absorb_one_direction(model)
        model.begin_task()
        randomise_current(model)
    else:
        run_tasks(model, 3, end_last=False)
    with torch.no_grad():  # make magnitudes differ from each other (per layer too)
        for t in (model.alpha_prev, model.alpha_cur):
            if t.numel():
                t.add_(torch.rand(t.shape, generator=torch.Generator().manual_seed(3)).to(t))
    # Built in float32 and cast: every dtype holds the same state (up to its rounding).
    return model.to(dtype), x.to(dtype)


def out_and_grads(model: SDLoRAModel, x: torch.Tensor, autocast: bool = False):
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(xx)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters()}
    return out.detach(), xx.grad.clone(), grads


CASES = ["official", "paper", "per_layer", "rr", "kd", "first_only", "fixed_old", "separate"]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """max |a - b| <= rel * max |b| (a relative error that small entries of b cannot inflate)."""
    return float((a.double() - b.double()).abs().max()) <= rel * float(b.double().abs().max())


@pytest.mark.parametrize("case", CASES)
def test_modes_match_the_loop_reference_in_float64(case):
    ref_out, ref_gx, ref_g = out_and_grads(*build_state(case, "loop", torch.float64))
    assert ref_g, "something must train"
    for mode in (*FAST, "stacked"):
        out, gx, g = out_and_grads(*build_state(case, mode, torch.float64))
        # Scales are float32 (norms and increments are float32 buffers; ``stacked`` also rounds the current
        # scale), so magnitude gradients, and everything of ``stacked``, are float32-exact only.
        tol = 1e-6 if mode == "stacked" else 1e-12
        assert close(out, ref_out, tol) and close(gx, ref_gx, tol), mode
        assert g.keys() == ref_g.keys()
        for n in g:
            assert close(g[n], ref_g[n], 1e-6 if "alpha" in n or mode == "stacked" else 1e-11), (mode, n)


@pytest.mark.parametrize("case", ["official", "paper", "rr"])
def test_modes_agree_in_float32(case):
    ref_out, ref_gx, ref_g = out_and_grads(*build_state(case, "loop", torch.float32))
    for mode in FAST:
        out, gx, g = out_and_grads(*build_state(case, mode, torch.float32))
        assert torch.allclose(out, ref_out, atol=1e-5)
        assert torch.allclose(gx, ref_gx, atol=1e-5)
        for n in g:
            assert torch.allclose(g[n], ref_g[n], rtol=1e-4, atol=1e-4 * ref_g[n].abs().max()), (mode, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_match_float64(dtype):
    """A model cast to bf16/fp16 computes in that dtype in every mode; all stay within the dtype's rounding."""
    exact_out, exact_gx, exact_g = out_and_grads(*build_state("paper", "loop", torch.float64))
    for mode in (*FAST, "loop"):
        model, x = build_state("paper", mode, dtype)
        out, gx, g = out_and_grads(model, x)
        assert out.dtype == dtype and gx.dtype == dtype
        scale = exact_out.abs().max()
        assert (out.double() - exact_out).abs().max() < 3e-2 * scale, mode
        assert (gx.double() - exact_gx).abs().max() < 5e-2 * exact_gx.abs().max(), mode
        for n, p in model.named_trainable_parameters():
            assert g[n].dtype == p.dtype
            assert (g[n].double() - exact_g[n]).abs().max() < 1e-1 * exact_g[n].abs().max(), (mode, n)


def test_cpu_autocast_bf16_matches_float64():
    exact_out, exact_gx, exact_g = out_and_grads(*build_state("official", "loop", torch.float64))
    for mode in (*FAST, "stacked"):
        model, x = build_state("official", mode, torch.float32)
        out, gx, g = out_and_grads(model, x, autocast=True)
        assert (out.double() - exact_out).abs().max() < 3e-2 * exact_out.abs().max(), mode
        assert (gx.double() - exact_gx).abs().max() < 5e-2 * exact_gx.abs().max(), mode
        for n in g:
            assert g[n].dtype == torch.float32
            assert (g[n] - exact_g[n]).abs().max() < 1e-1 * exact_g[n].abs().max(), (mode, n)


class FusedQKV(nn.Module):
    def __init__(self, d: int = 6, bias: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.qkv(x))


@pytest.mark.parametrize(
    "route,protocol,bias",
    [
        ("fold", "paper", True),
        ("factored", "paper", True),
        ("fold", "official", False),
        ("factored", "official", True),
    ],
)
def test_gradcheck_of_the_custom_backward(route, protocol, bias):
    """Finite differences in float64 against the hand-written backward (both routes, every input).

    Mixed ranks (RR schedule), per-layer magnitudes. Magnitudes enter through float32 scales (norms and
    increments are float32 buffers), so they are checked with a step of 1e-3 (the output is linear in each
    frozen one: the step adds no truncation error); the input and the current factors with 1e-6.
    """
    torch.manual_seed(0)
    cfg = AdapterConfig(rank_schedule=[3, 1, 2], compute=route, protocol=protocol, per_layer_magnitudes=True)
    model = SDLoRAModel(FusedQKV(bias=bias), cfg, default_targets=["qkv"])
    run_tasks(model, 3, end_last=False)
    model = model.double()
    names = [n for n, _ in model.named_trainable_parameters()]
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    for group, eps, tol in (("alpha", 1e-3, 1e-4), ("", 1e-6, 1e-5)):
        chosen = [n for n in names if ("alpha" in n) == bool(group)]
        assert chosen

        def f(xx, *values, chosen=chosen):
            return torch.func.functional_call(model, {**params, **dict(zip(chosen, values))}, (xx,))

        inputs = (x.clone().requires_grad_(not group), *(params[n].detach().clone().requires_grad_() for n in chosen))
        assert torch.autograd.gradcheck(f, inputs, eps=eps, atol=tol, rtol=tol, fast_mode=True)
    assert model.layers()[0].last_route == route


def test_route_costs_arithmetic_and_auto_choice():
    # One fused qkv of width d = 8, q and v adapted, T = 100 tokens, 20 stacked ranks per unit.
    costs = route_costs(100, 8, [(8, 20), (8, 20)])
    assert costs == {"fold": 2 * (100 + 20) * 8 * 8, "factored": 2 * 100 * 20 * (8 + 8)}
    assert route_costs(100, 8, [(8, 0)]) == {"fold": 0, "factored": 0}
    x = torch.randn(3, 3, 16, 16)
    # d = 16: with 2 ranks stored per unit projections are cheaper; with 40 the weight gradient is.
    for tasks, rank, expected in ((2, 2, "factored"), (11, 4, "fold")):
        model = make(AdapterConfig(rank=rank))
        run_tasks(model, tasks, end_last=False)
        model(x).sum().backward()
        assert {layer.last_route for layer in model.layers()} == {expected}
    model = make(AdapterConfig(rank=4, train_old_magnitudes=False))
    run_tasks(model, 3, end_last=False)
    model(x).sum().backward()
    assert model.layers()[0].last_route == "none"  # frozen magnitudes fixed: no magnitude gradient at all


def saved_bytes(model: SDLoRAModel, x: torch.Tensor) -> int:
    """Bytes of distinct non-parameter tensors autograd keeps for backward in one forward."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("compute", FAST)
def test_saved_memory_does_not_grow_with_tasks_times_tokens(compute):
    """From the second task on, what the layers save for backward does not grow with tokens x stored rank:
    only the per-rank scale vectors (a few bytes per stored rank row) are added, whatever the batch."""
    growth = {}
    for batch in (2, 16):
        x = torch.randn(batch, 3, 16, 16)
        sizes = {}
        for mode in (compute, "stacked"):
            for tasks in (2, 12):
                model = make(AdapterConfig(rank=2, compute=mode))
                run_tasks(model, tasks, end_last=False)
                sizes[mode, tasks] = saved_bytes(model, x)
        growth[batch] = {mode: sizes[mode, 12] - sizes[mode, 2] for mode in (compute, "stacked")}
    added_rows = 10 * 2 * 4  # 10 more components of rank 2 in each of 4 units
    assert growth[2][compute] == growth[16][compute] <= 16 * added_rows
    # The reference keeps an R-wide activation per token: the measurement sees growth with the batch.
    assert growth[16]["stacked"] > 4 * growth[2]["stacked"] > 0


def test_adapter_state_loads_under_another_compute_mode(x):
    model = make(AdapterConfig(rank=2, compute="stacked"))
    run_tasks(model, 3, end_last=False)
    tensors, meta = model.adapter_state()
    fresh = make(AdapterConfig(rank=2))  # default: auto
    fresh.load_adapter_state(tensors, meta)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_unknown_compute_mode_raises():
    assert COMPUTE_MODES[0] == AdapterConfig().compute == "auto"
    from sdlora.lora import SDLoRALinear

    with pytest.raises(ValueError, match="compute must be one of"):
        SDLoRALinear(nn.Linear(4, 12), [("q", 0, 4)], 0, compute="dense")


# ------------------------------------------------------------------------------------------- fold cache
def fresh_eval(model: SDLoRAModel, x: torch.Tensor) -> torch.Tensor:
    """The no-grad output with every cache dropped first: what a correct cache must reproduce."""
    for layer in model.layers():
        layer.invalidate_cache()
    with torch.no_grad():
        return model(x)


def cached_eval(model: SDLoRAModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_no_grad_calls_reuse_one_folded_weight(x):
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 3, end_last=False)
    model.eval()
    first = cached_eval(model, x)
    weights = [layer._fold_cache[2] for layer in model.layers()]
    second = cached_eval(model, x)
    assert all(layer._fold_cache[2] is w for layer, w in zip(model.layers(), weights)), "refolded without a change"
    assert torch.equal(first, second)
    with_grad = model(x).detach()  # the trained path (current component as a side path) agrees
    assert torch.allclose(with_grad, first, atol=1e-5)


def _opt_step_all(model, x):
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()


def _opt_step_only(name):
    def event(model, x):
        params = [p for n, p in model.named_trainable_parameters() if n.endswith(name)]
        assert params
        opt = torch.optim.Adam(params, lr=0.1)
        model(x).square().mean().backward()
        opt.step()

    return event


def _inplace(fn):
    def event(model, x):
        with torch.no_grad():
            fn(model)

    return event


def _end_and_begin(model, x):
    model.end_task()
    model.begin_task()
    randomise_current(model)


def _kd_absorb(model, x):
    model.end_task()
    absorb_one_direction(model)


def _load_state_dict(model, x):
    other = make(model.config, seed=0)
    run_tasks(other, 3, end_last=False)
    with torch.no_grad():
        for t in (other.alpha_prev, other.alpha_cur):
            t.mul_(1.7)
    model.load_state_dict(other.state_dict())


def _load_adapter_state(model, x):
    other = make(model.config, seed=0)
    torch.manual_seed(99)
    run_tasks(other, 2, end_last=False)
    model.load_adapter_state(*other.adapter_state())


def _merge_unmerge(model, x):
    model.merge()
    model.unmerge()
    with torch.no_grad():
        model.alpha_cur.mul_(3.0)


def _swap_storage(model, x):
    """What ``Module.to()``/``.half()`` do to a parameter: same object and version, new storage."""
    for _, u in model.named_units():
        u.B_cur.data = u.B_cur.data * 2.0


def _data_write_then_eval(model, x):
    """Writes through ``.data`` bypass version counters; the next ``eval()`` (as evaluation starts) refolds."""
    for _, u in model.named_units():
        u.B_cur.data.mul_(2.0)
    model.eval()


EVENTS = {
    "optimizer step (all)": _opt_step_all,
    "optimizer step (A_cur)": _opt_step_only("A_cur"),
    "optimizer step (alpha_prev)": _opt_step_only("alpha_prev"),
    "in-place magnitude": _inplace(lambda m: m.alpha_prev.add_(0.5)),
    "in-place frozen factor": _inplace(lambda m: [u.B_frozen.mul_(3.0) for _, u in m.named_units()]),
    "in-place base weight": _inplace(lambda m: m.layers()[0].base.weight.mul_(1.5)),
    "in-place base bias": _inplace(lambda m: m.layers()[0].base.bias.add_(0.1)),
    "end_task + begin_task": _end_and_begin,
    "KD absorption": _kd_absorb,
    "load_state_dict": _load_state_dict,
    "load_adapter_state": _load_adapter_state,
    "merge/unmerge": _merge_unmerge,
    "new storage": _swap_storage,
    ".data write + eval()": _data_write_then_eval,
}


@pytest.mark.parametrize("event", list(EVENTS))
def test_fold_cache_is_never_stale(x, event):
    model = make(AdapterConfig(rank=2, kd=True))
    run_tasks(model, 3, end_last=False)
    model.eval()
    before = cached_eval(model, x)  # fills the caches
    assert all(layer._fold_cache is not None for layer in model.layers())
    EVENTS[event](model, x)
    after = cached_eval(model, x)
    assert not torch.allclose(after, before, atol=1e-4), "the event must change the function (test is void)"
    assert torch.equal(after, fresh_eval(model, x)), f"stale fold after {event}"


def test_cast_model_refolds(x):
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 3, end_last=False)
    cached_eval(model, x)
    model.double()
    out = cached_eval(model, x.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, fresh_eval(model, x.double()))


def test_copies_do_not_carry_the_cache(x):
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 3, end_last=False)
    ref = cached_eval(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(layer._fold_cache is None for layer in clone.layers())
        assert torch.equal(cached_eval(clone, x), ref)
        with torch.no_grad():
            clone.alpha_cur.mul_(2.0)  # the copy's tensors are its own
        assert not torch.allclose(cached_eval(clone, x), ref)
    assert torch.equal(cached_eval(model, x), ref)


def test_cache_needs_the_model_forward(x):
    """Layers called with magnitudes but without their sources (no version to key on) never cache."""
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 2, end_last=False)
    layer = model.layers()[0]
    layer.alphas = model.alphas()
    with torch.no_grad():
        layer(torch.randn(4, 16))
    layer.alphas = None
    assert layer._fold_cache is None


def test_input_gradient_through_the_cached_path(x):
    """Nothing of the adapter trains (a frozen, finished model): gradients w.r.t. the input still flow."""
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 2)
    ref = make(AdapterConfig(rank=2, compute="loop"))
    ref.load_adapter_state(*model.adapter_state())
    grads = []
    for m in (model, ref):
        xx = x.clone().requires_grad_(True)
        m(xx).square().sum().backward()
        grads.append(xx.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_timm_vit_default_targets_work_in_every_mode(x):
    outs = []
    for mode in COMPUTE_MODES:
        model = SDLoRAModel(tiny_vit(0), AdapterConfig(rank=2, compute=mode), default_targets=TARGETS)
        torch.manual_seed(5)
        run_tasks(model, 2, end_last=False)
        with torch.no_grad():
            outs.append(model(x))
    assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs)


def test_trainable_base_weight_falls_back_to_autograd(x):
    """A base weight unfrozen by the user gets its full gradient (the fused function would not compute it)."""
    grads = []
    for mode in ("auto", "loop"):
        model = make(AdapterConfig(rank=2, compute=mode))
        torch.manual_seed(5)
        run_tasks(model, 2, end_last=False)
        base = model.layers()[0].base
        base.weight.requires_grad_(True)
        model(x).square().sum().backward()
        grads.append((base.weight.grad.clone(), model.alpha_prev.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)


def test_meta_device_forward_and_backward():
    """Shapes-only runs (flop counting, memory planning) work on the meta device, tasks >= 2 included."""
    model = make(AdapterConfig(rank=2))
    run_tasks(model, 3, end_last=False)
    model = model.to("meta")
    out = model(torch.randn(2, 3, 16, 16, device="meta"))
    out.sum().backward()
    assert out.is_meta and model.alpha_prev.grad is not None and model.alpha_prev.grad.is_meta
