"""InfLoRA: subspace projection on small matrices, GPM memory growth, only B trains, new A orthogonal to memory."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import make_ctx, random_batches, tiny_method

from sdlora.methods.inflora import InfLoRALinear, down_projection, gpm_update, project_out


def _orthonormal(d: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    return q


def _cov(d: int, n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or d, generator=g, dtype=torch.float64)
    if rank is not None:
        x = x @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return x.t() @ x


@pytest.mark.parametrize(("d", "m", "r"), [(8, 0, 3), (8, 3, 3), (12, 5, 4), (6, 4, 4), (6, 6, 2)])
def test_down_projection_is_orthogonal_to_the_stored_subspace(d, m, r):
    basis = _orthonormal(d, m, seed=d + m)
    a = down_projection(_cov(d, 40, seed=1), basis, r)
    assert a.shape == (min(r, d - m), d)
    if m and a.numel():
        assert float((a @ basis).abs().max()) < 1e-5
    torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0], dtype=a.dtype), atol=1e-8, rtol=0)


def test_down_projection_takes_the_top_directions_of_the_projected_covariance():
    d = 10
    basis = _orthonormal(d, 3, seed=5)
    cov = _cov(d, 50, seed=2)
    a = down_projection(cov, basis, 2)
    u, _, _ = torch.linalg.svd(project_out(cov, basis))
    # Same span as the top-2 left singular vectors of (I - M M^T) R (the official formulation).
    proj_a = a.t() @ a
    proj_u = u[:, :2] @ u[:, :2].t()
    torch.testing.assert_close(proj_a, proj_u, atol=1e-8, rtol=0)
    # Orthogonal even when the covariance has fewer directions than the rank in the complement.
    low = _cov(d, 50, seed=3, rank=2)
    a = down_projection(low, basis, 5)
    assert a.shape == (5, d) and float((a @ basis).abs().max()) < 1e-5


def test_gpm_update_criterion_and_growth():
    d = 6
    # Diagonal covariance: singular values are the diagonal, energies their squares.
    cov = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64))
    share = torch.tensor([16.0, 4.0, 1.0, 0.25, 0.01, 0.0]) / 21.26
    first = gpm_update(torch.zeros(d, 0, dtype=torch.float64), cov, threshold=0.9, first=True)
    k = int((torch.cumsum(share, 0) < 0.9).sum())  # directions strictly below the threshold, at least one
    assert first.shape == (d, max(k, 1)) == (d, 1)
    # Later task: the new covariance lives mostly on axes 1 and 2, which the memory does not hold yet.
    cov2 = torch.diag(torch.tensor([0.1, 3.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    grown = gpm_update(first, cov2, threshold=0.95, first=False)
    assert grown.shape[1] == 3
    torch.testing.assert_close(grown.t() @ grown, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(grown[:, :1], first)  # the old basis is kept
    span = grown @ grown.t()
    for axis in (0, 1, 2):
        e = torch.zeros(d, dtype=torch.float64)
        e[axis] = 1.0
        torch.testing.assert_close(span @ e, e, atol=1e-10, rtol=0)
    # Nothing is added once the memory already explains the threshold.
    same = gpm_update(grown, cov2, threshold=0.95, first=False)
    assert same.shape == grown.shape


def test_layer_forward_equals_dense_delta():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    layer = InfLoRALinear(base, [("k", 8, 16), ("v", 16, 24)])
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), base(x))
    for _ in range(2):
        layer.begin(torch.randn(3, 8))
        with torch.no_grad():
            for p in layer.B_cur.values():
                p.normal_()
        expected = torch.nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        layer.freeze()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.A_frozen.shape == (6, 8) and layer.b_frozen("k").shape == (8, 6)


def test_inflora_trains_only_b_and_new_a_is_orthogonal_to_memory():
    method = tiny_method("inflora", options={"rank": 4, "lamb": 0.9, "lame": 1.0})
    b0, b1 = random_batches(0, 2, seed=1), random_batches(2, 4, seed=2)
    ctx0 = make_ctx(0, 0, 2, b0)
    method.begin_task(ctx0)
    names = [n for n, p in method.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("head.") or ".B_cur." in n for n in names), names
    for layer in method.layers():
        assert layer.A_cur.shape == (4, 32) and not layer.A_cur.requires_grad
        # A_1 rows: orthonormal eigen-directions divided by sqrt(3).
        torch.testing.assert_close(layer.A_cur @ layer.A_cur.t() * 3, torch.eye(4), atol=1e-5, rtol=0)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=0.05)
    x, y = b0[0]
    loss = torch.nn.functional.cross_entropy(method(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    report = method.end_task(ctx0)
    assert report["threshold"] == pytest.approx(0.9)
    assert all(0 < m <= 32 for m in report["memory_dims"])
    method.begin_task(make_ctx(1, 2, 4, b1))
    for layer in method.layers():
        mem = layer.memory
        assert mem.shape[1] > 0
        torch.testing.assert_close(mem.t() @ mem, torch.eye(mem.shape[1], dtype=mem.dtype), atol=1e-8, rtol=0)
        assert float((layer.A_cur.double() @ mem).abs().max()) < 1e-5
        assert layer.A_frozen.shape[0] == 4 and not layer.A_frozen.requires_grad
    assert method.threshold(1, 2) == pytest.approx(0.95)
    # Checkpoint round trip, mid-task included (same random-init backbone: seed 0).
    tensors, meta = method.state()
    other = tiny_method("inflora", seed=0, options={"rank": 4, "lamb": 0.9, "lame": 1.0})
    other.load_state(tensors, meta)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), method(x))
    for a, b in zip(other.layers(), method.layers()):
        torch.testing.assert_close(a.memory, b.memory)
    assert math.isclose(other.parameter_counts()["stored"], method.parameter_counts()["stored"])
