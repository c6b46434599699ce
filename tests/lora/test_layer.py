"""Math of one adapted layer: exactness against a dense computation of paper Eq. 4."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_helpers import TARGETS, SeparateQV, make, randomise_current, run_tasks, tiny_vit
from torch import nn

from sdlora.lora import AdapterConfig, SDLoRALinear, SDLoRAModel, component_norm


def dense_qkv_weight(model: SDLoRAModel, layer_name: str, w0: torch.Tensor) -> torch.Tensor:
    """W0 + sum_k alpha_k * normalise(B_k A_k), computed densely from the stored factors."""
    cfg = model.config
    layer: SDLoRALinear = model.backbone.get_submodule(layer_name)
    alphas = model.alphas().detach()
    w = w0.clone().double()
    for u in layer.units:
        a_row = alphas if alphas.dim() == 1 else alphas[u.index]
        offset = 0
        for c, r in enumerate(u.comp_ranks):
            a = u.A_frozen[offset : offset + r].double()
            b = u.B_frozen[:, offset : offset + r].double()
            offset += r
            m = b @ a
            if cfg.normaliser == "frobenius_of_product":
                n = torch.linalg.norm(m)
            else:
                n = torch.linalg.norm(b) * torch.linalg.norm(a)
            if bool(u.pending_norm[c]):  # acts as trained until the next task starts (official protocol)
                n = torch.ones((), dtype=torch.float64)
            w[u.start : u.stop] += (a_row[u.slots[c]].double() + u.kd_increment[c].double()) * m / n
        if u.A_cur is not None:
            m = u.B_cur.detach().double() @ u.A_cur.detach().double()
            scale = a_row[u.cur_slot].double()
            if cfg.normalise_current:
                if cfg.normaliser == "frobenius_of_product":
                    n = torch.linalg.norm(m)
                else:
                    n = torch.linalg.norm(u.B_cur.detach().double()) * torch.linalg.norm(u.A_cur.detach().double())
                scale = scale / torch.sqrt(n**2 + cfg.norm_eps**2)
            w[u.start : u.stop] += scale * m
    return w.float()


def test_component_norm_matches_dense():
    torch.manual_seed(0)
    b, a = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(component_norm(b, a, "frobenius_of_product"), torch.linalg.norm(b @ a))
    assert torch.allclose(component_norm(b, a, "product_of_frobenius"), torch.linalg.norm(b) * torch.linalg.norm(a))
    with pytest.raises(ValueError, match="unknown normaliser"):
        component_norm(b, a, "spectral")


def test_zero_b_equals_base_exactly(x):
    base = tiny_vit(0)
    with torch.no_grad():
        ref = base(x)
    model = make(seed=0)
    model.begin_task()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_zero_b_equals_base_both_protocols(x, protocol):
    with torch.no_grad():
        ref = tiny_vit(0)(x)
    model = make(AdapterConfig(protocol=protocol, rank=2))
    model.begin_task()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.qkv(t)


def test_only_q_and_v_slices_change():
    torch.manual_seed(0)
    attn = _Attn()
    x = torch.randn(5, 8)
    ref = attn(x).detach()
    model = SDLoRAModel(attn, AdapterConfig(rank=2), default_targets=["qkv"])
    assert [u.name for _, u in model.named_units()] == ["q", "v"]
    run_tasks(model, 2, end_last=False)
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y[:, 8:16], ref[:, 8:16]), "k slice must be untouched"
    assert not torch.allclose(y[:, :8], ref[:, :8])
    assert not torch.allclose(y[:, 16:], ref[:, 16:])


def test_non_qkv_linear_is_adapted_whole():
    model = SDLoRAModel(nn.Sequential(nn.Linear(8, 24)), AdapterConfig(rank=2), default_targets=["0"])
    assert [u.name for _, u in model.named_units()] == ["out"]


@pytest.mark.parametrize(
    "normaliser,normalise_current,per_layer",
    list(itertools.product(["frobenius_of_product", "product_of_frobenius"], [True, False], [False, True])),
)
def test_matches_dense_equation_4(x, normaliser, normalise_current, per_layer):
    cfg = AdapterConfig(
        rank=3, normaliser=normaliser, normalise_current=normalise_current, per_layer_magnitudes=per_layer
    )
    model = make(cfg)
    w0 = {n: model.backbone.get_submodule(n).base.weight.detach().clone() for n in model._layer_names}
    run_tasks(model, 3, end_last=False)
    with torch.no_grad():
        if per_layer:  # make the per-layer magnitudes differ from each other
            model.alpha_prev.add_(torch.rand_like(model.alpha_prev))
        y = model(x)
        dense = tiny_vit(0)
        for name in model._layer_names:
            dense.get_submodule(name).weight.copy_(dense_qkv_weight(model, name, w0[name]))
        ref = dense(x)
    assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()


@pytest.mark.parametrize("compute", ["auto", "fold", "factored", "loop"])
def test_compute_modes_agree_in_value_and_gradient(x, compute):
    models = []
    for mode in ("stacked", compute):
        m = make(AdapterConfig(rank=2, compute=mode, protocol="paper"))
        torch.manual_seed(7)
        run_tasks(m, 3, end_last=False)
        models.append(m)
    outs, grads = [], []
    for m in models:
        out = m(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4), n


def test_separate_projections_adapted_whole():
    torch.manual_seed(0)
    net = SeparateQV()
    x = torch.randn(2, 5, 12)
    ref = net(x).detach()
    model = SDLoRAModel(net, AdapterConfig(rank=2), default_targets=["query", "value"])
    names = [n for n, _ in model.named_units()]
    assert names == ["query.out", "value.out"]
    model.begin_task()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    randomise_current(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)


def test_adapter_follows_base_dtype(x):
    model = SDLoRAModel(tiny_vit(0).double(), AdapterConfig(rank=2), default_targets=TARGETS)
    model.begin_task()
    randomise_current(model)
    for _, u in model.named_units():
        assert u.A_cur.dtype == torch.float64 and u.A_frozen.dtype == torch.float64
    model.end_task()
    with torch.no_grad():
        assert model(x.double()).dtype == torch.float64


def test_layer_outside_model_forward_raises(x):
    model = make()
    model.begin_task()
    layer = model.layers()[0]
    with pytest.raises(RuntimeError, match="SDLoRAModel.forward"):
        layer(torch.randn(2, 16))


def test_no_grad_path_equals_autograd_path(x):
    model = make(AdapterConfig(rank=2, protocol="paper"))
    run_tasks(model, 3, end_last=False)
    with_grad = model(x).detach()  # factored low-rank path
    with torch.no_grad():  # evaluation folds the components into the weight
        folded = model(x)
    assert torch.allclose(with_grad, folded, atol=1e-5)
