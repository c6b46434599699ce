"""The math of one SD-LoRA-adapted linear layer.

A frozen ``nn.Linear`` with weight W0 is wrapped; for every adapted output slice ("unit": the q or v rows of a
fused ``qkv`` projection, or a whole separate projection) and every task k so far, one low-rank component
``M_k = B_k A_k`` (``A_k``: r_k x d_in, down; ``B_k``: d_out x r_k, up) is added with a magnitude alpha_k::

    y = W0 x + b + sum_k alpha_k * (B_k A_k / n_k) x                         (paper Eq. 4)

where ``n_k`` normalises the direction (paper Eq. 3: ``||B_k A_k||_F``; official code: ``||B_k||_F ||A_k||_F``).
The paper writes the product as ``A B`` with A the m x r factor; the official code and this package write
``B A`` with B the up factor: the same matrix.

Frozen components are stored stacked (``A_frozen``: R x d_in, ``B_frozen``: d_out x R, R = sum of their ranks),
so evaluating all of them is one rank-R product whose cost does not grow with a Python loop over tasks, and
only one R-wide activation is kept for backward. The magnitudes are not owned here: ``SDLoRAModel`` owns one
shared vector (paper §4.1) and hands it to every layer for the duration of a forward.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["COMPUTE_MODES", "LowRankUnit", "SDLoRALinear", "add_rows", "component_norm", "route_costs"]


def add_rows(y: Tensor, start: int, stop: int, delta: Tensor) -> Tensor:
    """``y[..., start:stop] += delta``, returning the result.

    In place on a slice (F.linear's backward needs its inputs, not its output, so nothing saved is overwritten);
    out of place when the slice is all of ``y``: autograd refuses an in-place add on a full slice of a view of a leaf,
    which is what ``F.linear`` returns for a 3-D input with a bias (separate q / v projections of HF models).
    """
    if start == 0 and stop == y.shape[-1]:
        return y + delta
    y[..., start:stop] += delta
    return y


def component_norm(b: Tensor, a: Tensor, normaliser: str) -> Tensor:
    """Normaliser n of the component ``b @ a`` without forming the dense product.

    ``frobenius_of_product``: ``||B A||_F`` (paper Eq. 3), from ``||B A||_F^2 = sum((B^T B) * (A A^T))``, two
    r x r Gram matrices instead of a d_out x d_in product. ``product_of_frobenius``: ``||B||_F * ||A||_F``
    (official code, backbone/lora.py).

    Args:
        b: up factor, shape (d_out, r).
        a: down factor, shape (r, d_in).
        normaliser: ``"frobenius_of_product"`` or ``"product_of_frobenius"``.

    Returns:
        A 0-dim tensor (differentiable).
    """
    if normaliser == "frobenius_of_product":
        sq = ((b.t() @ b) * (a @ a.t())).sum()
        return sq.clamp_min(0).sqrt()
    if normaliser == "product_of_frobenius":
        prod: Tensor = torch.linalg.vector_norm(b) * torch.linalg.vector_norm(a)
        return prod
    raise ValueError(f"unknown normaliser {normaliser!r}")


class LowRankUnit(nn.Module):
    """All components of one adapted projection: rows ``[start, stop)`` of the wrapped layer's output.

    Buffers (frozen, one entry per stored component c):
        ``A_frozen`` (R, d_in), ``B_frozen`` (d_out, R): stacked factors; ``norms`` (C,): n_c fixed when the
        component was frozen; ``slots`` (C,): index of the magnitude the component uses; ``kd_increment`` (C,):
        magnitude increments absorbed by SD-LoRA-KD (Eq. 8), per unit because alpha is shared across layers;
        ``pending_norm`` (C,): the component still acts unnormalised, as it was trained (official protocol,
        until the next task starts; see ``SDLoRAModel.begin_task``); ``pending_absorb`` (C,): SD-LoRA-KD decided
        to absorb it at that transition; ``rank_owner`` (R,): component of each stacked rank row.
    Parameters (the component being learned): ``A_cur`` (r, d_in), ``B_cur`` (d_out, r) or ``None``.
    """

    # Registered buffers, declared for the type checker (nn.Module.__getattr__ would type them Tensor | Module).
    A_frozen: Tensor
    B_frozen: Tensor
    norms: Tensor
    kd_increment: Tensor
    pending_norm: Tensor
    pending_absorb: Tensor
    slots: Tensor
    rank_owner: Tensor

    def __init__(self, name: str, start: int, stop: int, in_features: int, index: int, weight: Tensor) -> None:
        super().__init__()
        self.name = name
        self.start = start
        self.stop = stop
        self.in_features = in_features
        self.out_features = stop - start
        self.index = index  # row of the magnitude table when magnitudes are per layer
        self.cur_slot = -1
        self.register_buffer("A_frozen", torch.zeros(0, in_features, device=weight.device, dtype=weight.dtype))
        self.register_buffer("B_frozen", torch.zeros(self.out_features, 0, device=weight.device, dtype=weight.dtype))
        self.register_buffer("norms", torch.zeros(0, device=weight.device, dtype=torch.float32))
        self.register_buffer("kd_increment", torch.zeros(0, device=weight.device, dtype=torch.float32))
        self.register_buffer("pending_norm", torch.zeros(0, device=weight.device, dtype=torch.bool))
        self.register_buffer("pending_absorb", torch.zeros(0, device=weight.device, dtype=torch.bool))
        self.register_buffer("slots", torch.zeros(0, device=weight.device, dtype=torch.long))
        self.register_buffer("rank_owner", torch.zeros(0, device=weight.device, dtype=torch.long))
        self.comp_ranks: list[int] = []
        self.A_cur: nn.Parameter | None
        self.B_cur: nn.Parameter | None
        self.register_parameter("A_cur", None)
        self.register_parameter("B_cur", None)

    # ----------------------------------------------------------------------------------------------- state
    @property
    def num_frozen(self) -> int:
        return len(self.comp_ranks)

    @property
    def has_current(self) -> bool:
        return self.A_cur is not None

    def add_current(self, rank: int, slot: int) -> None:
        """Create the trainable component of a new task: A kaiming-uniform, B zero (so the output is unchanged)."""
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        ref = self.A_frozen
        a = torch.empty(rank, self.in_features, device=ref.device, dtype=ref.dtype)
        # Same init as nn.Linear / the official code: kaiming_uniform_(a=sqrt(5)) -> U(+-1/sqrt(d_in)).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, rank, device=ref.device, dtype=ref.dtype)
        self.A_cur = nn.Parameter(a)
        self.B_cur = nn.Parameter(b)
        self.cur_slot = slot

    def drop_current(self) -> None:
        self.A_cur = None
        self.B_cur = None
        self.cur_slot = -1

    def freeze_current(self, normaliser: str, pending_norm: bool = False) -> bool:
        """Move the current component into the frozen stack with its normaliser n fixed now.

        With ``pending_norm`` it keeps acting unnormalised (scale alpha, as it was trained) until
        ``normalise_pending``; otherwise it acts as ``alpha / n`` at once. Returns False (and drops it) when its
        product is exactly zero: such a component never contributed and has no direction.
        """
        assert self.A_cur is not None and self.B_cur is not None
        a, b = self.A_cur.detach(), self.B_cur.detach()
        norm = float(component_norm(b.double(), a.double(), normaliser))
        slot = self.cur_slot
        self.drop_current()
        if norm == 0.0 or not math.isfinite(norm):
            return False
        self._append(a.clone(), b.clone(), norm, slot, pending_norm)
        return True

    def _append(self, a: Tensor, b: Tensor, norm: float, slot: int, pending_norm: bool) -> None:
        dev = self.norms.device
        comp = len(self.comp_ranks)
        self.A_frozen = torch.cat([self.A_frozen, a.to(self.A_frozen)], 0)
        self.B_frozen = torch.cat([self.B_frozen, b.to(self.B_frozen)], 1)
        self.norms = torch.cat([self.norms, torch.tensor([norm], device=dev, dtype=torch.float32)])
        self.kd_increment = torch.cat([self.kd_increment, torch.zeros(1, device=dev, dtype=torch.float32)])
        self.pending_norm = torch.cat([self.pending_norm, torch.tensor([pending_norm], device=dev)])
        self.pending_absorb = torch.cat([self.pending_absorb, torch.zeros(1, device=dev, dtype=torch.bool)])
        self.slots = torch.cat([self.slots, torch.tensor([slot], device=dev, dtype=torch.long)])
        owner = torch.full((a.shape[0],), comp, device=dev, dtype=torch.long)
        self.rank_owner = torch.cat([self.rank_owner, owner])
        self.comp_ranks.append(int(a.shape[0]))

    def pop_last(self) -> None:
        """Remove the newest frozen component (SD-LoRA-KD absorbed it into the earlier ones)."""
        if not self.comp_ranks:
            raise RuntimeError(f"unit {self.name} has no frozen component to remove")
        r = self.comp_ranks.pop()
        keep = self.A_frozen.shape[0] - r
        self.A_frozen = self.A_frozen[:keep].clone()
        self.B_frozen = self.B_frozen[:, :keep].clone()
        for name in ("norms", "kd_increment", "pending_norm", "pending_absorb", "slots"):
            setattr(self, name, getattr(self, name)[:-1].clone())
        self.rank_owner = self.rank_owner[:keep].clone()

    def set_frozen(
        self,
        a: Tensor,
        b: Tensor,
        norms: Tensor,
        slots: Tensor,
        kd_increment: Tensor,
        ranks: list[int],
        pending_norm: Tensor | None = None,
        pending_absorb: Tensor | None = None,
    ) -> None:
        """Replace the frozen stack wholesale (used when loading a saved adapter); absent pending flags: none."""
        if sum(ranks) != a.shape[0] or a.shape[0] != b.shape[1] or len(ranks) != norms.numel():
            raise ValueError(f"inconsistent frozen factors for unit {self.name}")
        dev = self.norms.device
        n = len(ranks)
        flags = [torch.zeros(n, dtype=torch.bool) if f is None else f for f in (pending_norm, pending_absorb)]
        if any(f.numel() != n for f in (slots, kd_increment, *flags)):
            raise ValueError(f"inconsistent per-component state for unit {self.name}")
        self.A_frozen = a.to(self.A_frozen).clone()
        self.B_frozen = b.to(self.B_frozen).clone()
        self.norms = norms.to(device=dev, dtype=torch.float32).clone()
        self.kd_increment = kd_increment.to(device=dev, dtype=torch.float32).clone()
        self.pending_norm = flags[0].to(device=dev, dtype=torch.bool).clone()
        self.pending_absorb = flags[1].to(device=dev, dtype=torch.bool).clone()
        self.slots = slots.to(device=dev, dtype=torch.long).clone()
        self.comp_ranks = [int(r) for r in ranks]
        self.rank_owner = torch.repeat_interleave(
            torch.arange(len(ranks), device=dev), torch.tensor(ranks, device=dev, dtype=torch.long)
        )

    # ------------------------------------------------------------------------------------------- scales
    def _row(self, alphas: Tensor) -> Tensor:
        return alphas if alphas.dim() == 1 else alphas[self.index]

    def frozen_scales(self, alphas: Tensor) -> Tensor:
        """Per-component scale of the frozen components, shape (C,): ``(alpha_slot + kd_increment) / n``
        (paper Eq. 4), or ``alpha_slot + kd_increment`` while the normalisation is pending (the component acts
        as it was trained, official protocol)."""
        a = self._row(alphas)
        mag = a[self.slots].float() + self.kd_increment
        return torch.where(self.pending_norm, mag, mag / self.norms)

    def current_scale(self, alphas: Tensor, normalise: bool, normaliser: str, eps: float) -> Tensor:
        """Scale of the current component: ``alpha_t / n_t`` when normalised (paper Eq. 4), else ``alpha_t``."""
        assert self.A_cur is not None and self.B_cur is not None
        alpha = self._row(alphas)[self.cur_slot]
        if not normalise:
            return alpha
        n = component_norm(self.B_cur, self.A_cur, normaliser)
        # B starts at zero, so n = 0 at the first step: the smooth floor keeps the output exactly W0 x there.
        return alpha / torch.sqrt(n * n + eps * eps)

    def stacked(
        self, alphas: Tensor, normalise: bool, normaliser: str, eps: float
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """All components as one low-rank product: (A_all (R', d_in), B_all (d_out, R'), per-rank scale (R',))."""
        parts_a, parts_b, parts_s = [], [], []
        if self.num_frozen:
            parts_a.append(self.A_frozen)
            parts_b.append(self.B_frozen)
            parts_s.append(self.frozen_scales(alphas)[self.rank_owner])
        if self.A_cur is not None and self.B_cur is not None:
            s = self.current_scale(alphas, normalise, normaliser, eps)
            parts_a.append(self.A_cur)
            parts_b.append(self.B_cur)
            parts_s.append(s.float().expand(self.A_cur.shape[0]))
        if not parts_a:
            return None
        if len(parts_a) == 1:
            return parts_a[0], parts_b[0], parts_s[0]
        return torch.cat(parts_a, 0), torch.cat(parts_b, 1), torch.cat(parts_s, 0)

    def delta_weight(self, alphas: Tensor, normalise: bool, normaliser: str, eps: float) -> Tensor:
        """Dense ``sum_k scale_k B_k A_k`` for this unit, shape (d_out, d_in)."""
        st = self.stacked(alphas, normalise, normaliser, eps)
        if st is None:
            return self.A_frozen.new_zeros(self.out_features, self.in_features)
        a, b, s = st
        return (b * s.to(b.dtype)) @ a

    def extra_repr(self) -> str:
        return (
            f"{self.name}: rows [{self.start}, {self.stop}), in={self.in_features}, frozen ranks={self.comp_ranks}, "
            f"current rank={0 if self.A_cur is None else self.A_cur.shape[0]}"
        )


#: Values of ``AdapterConfig.compute`` (see there and ``SDLoRALinear``).
COMPUTE_MODES = ("auto", "fold", "factored", "stacked", "loop")

#: Multiply-add rate of the ``factored`` route's GEMMs (one dimension is the stored rank R, a few hundred) relative
#: to the ``fold`` route's square ``d x T x d`` one. Measured 0.66-0.75 on this project's CPU (1 thread, T = 1600,
#: d = 384, R = 40-390; a GEMM micro-benchmark made while writing this, not kept); ``auto`` divides the factored
#: cost by it. Skinny GEMMs run below
#: the square rate on every BLAS; the exact factor of a GPU is not measured.
FACTORED_EFFICIENCY = 0.7


def route_costs(tokens: int, in_features: int, units: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Multiply-adds each exact route spends on the frozen magnitudes' gradients in one layer's backward.

    ``grad s_r = sum_t (dy_t B_r) (A_r x_t) = B_r^T (dY^T X) A_r^T`` for every stacked rank row r of a unit
    (``s``: per-rank scale ``(alpha + increment) / n``, from which autograd reaches the magnitudes), computed

    * ``fold``: from the unit's weight gradient ``G = dY_u^T X`` (never formed for the other rows):
      ``T d_in d_out`` for G, ``d_out d_in R`` for ``B^T G``;
    * ``factored``: from the projections ``X A^T`` (all units at once, ``T d_in R``) and ``dY_u B``
      (``T d_out R``).

    Both come on top of the fold ``W0 + B diag(s) A`` (``d_out d_in R`` per unit, the same for both).

    Args:
        tokens: T, rows of the layer's input in the call (batch x sequence).
        in_features: d_in.
        units: ``(d_out, R)`` per adapted unit, R its stacked frozen rank (units with R = 0 cost nothing).

    Returns:
        ``{"fold": ..., "factored": ...}`` in multiply-adds.
    """
    fold = sum((tokens + r) * in_features * d_out for d_out, r in units if r)
    factored = sum(tokens * r * (in_features + d_out) for d_out, r in units if r)
    return {"fold": fold, "factored": factored}


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing is autocast there
        return False


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, W)`` computes in: the autocast dtype inside an autocast region (float64 is never
    cast, as autocast does), else the input's."""
    dev = x.device.type
    if x.dtype != torch.float64 and _autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if _autocast_enabled(dev) else contextlib.nullcontext()


@dataclass(frozen=True)
class _Plan:
    """Static description of one ``_AdaptedLinear`` call.

    ``units``: ``(start, stop, frozen rank, current rank)`` per unit; its tensors follow in ``flat`` as
    ``A_frozen, B_frozen, s_frozen`` (when the frozen rank is > 0), then ``A_cur, B_cur, s_cur`` (when the current
    rank is > 0). ``route``: how the frozen magnitudes' gradients are computed (``fold``/``factored``; ``none``
    when they need none). ``dtype``: the compute dtype (autocast's inside an autocast region).
    """

    units: tuple[tuple[int, int, int, int], ...]
    route: str
    dtype: torch.dtype

    def frozen(self) -> list[tuple[int, int, int, int]]:
        """``(start, stop, R, index of A_frozen in flat)`` of every unit with frozen components."""
        out, i = [], 0
        for start, stop, rf, rc in self.units:
            if rf:
                out.append((start, stop, rf, i))
                i += 3
            i += 3 if rc else 0
        return out

    def current(self) -> list[tuple[int, int, int, int]]:
        """``(start, stop, r, index of A_cur in flat)`` of every unit with a current component."""
        out, i = [], 0
        for start, stop, rf, rc in self.units:
            i += 3 if rf else 0
            if rc:
                out.append((start, stop, rc, i))
                i += 3
        return out


class _AdaptedLinear(torch.autograd.Function):
    """``y = X W^T + b``, ``y_u += s_u (X A_u^T) B_u^T`` per current component, with a hand-written backward.

    ``W`` is the base weight with every frozen component already folded in (``W0 + sum B diag(s) A`` over the
    units' rows, computed by the caller without autograd), so the frozen stack costs the forward nothing per
    token. The backward returns what autograd through the same expression would, but computes only that:

    * ``dX = dY W + dZ A_cur`` (the frozen components ride along in ``W``);
    * current factors and scale: ``dB_u = dY_u^T (s_u Z_u)``, ``dA = dZ^T X``, ``ds_u = <dY_u B_u, Z_u>``;
    * frozen per-rank scales ``ds_r = B_r^T (dY_u^T X) A_r^T`` (paper Eq. 4 differentiated in alpha_k: the weight
      gradient projected onto each direction) by the route in the plan (``route_costs``), only for the
      adapted rows. No weight gradient of ``W`` (dropped by a plain autograd fold) and no copy of the
      ``T x d_out`` output gradient (made by autograd's backward of an in-place slice add) is formed.

    The base weight and bias must not require gradients (``SDLoRALinear`` falls back to ``stacked`` when they
    do); the backward is not itself differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, *flat: Tensor) -> Tensor:
        dt = plan.dtype
        with _no_autocast(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            w = weight.to(dt)
            y = F.linear(x2, w, None if bias is None else bias.to(dt))
            cur = plan.current()
            z = a_cur = None
            if cur:
                a_cur = torch.cat([flat[i] for *_, i in cur], 0).to(dt) if len(cur) > 1 else flat[cur[0][3]].to(dt)
                z = F.linear(x2, a_cur)  # (T, r_total): one down-projection for all units (they share X)
                off = 0
                for start, stop, r, i in cur:
                    # Scale the rank-r activation, not the d_out-wide output (paper Eq. 4, current term).
                    rows = y[:, start:stop]
                    torch.addmm(rows, z[:, off : off + r] * flat[i + 2].to(dt), flat[i + 1].to(dt).t(), out=rows)
                    off += r
        needs = ctx.needs_input_grad[4:]
        keep_x = any(needs[i] for *_, i in cur) or any(needs[i + 2] for *_, i in plan.frozen())
        ctx.plan = plan
        ctx.x_meta = (x.shape, x.dtype)
        ctx.save_for_backward(x2 if keep_x else None, w if ctx.needs_input_grad[0] else None, z, a_cur, *flat)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        dt = plan.dtype
        acc = torch.promote_types(dt, torch.float32)  # reductions to scalars in at least float32
        x2, w, z, a_cur, *flat = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        grads: list[Tensor | None] = [None] * len(flat)
        with _no_autocast(gy):
            g = gy.reshape(-1, gy.shape[-1]).to(dt)
            cur = plan.current()
            dz = None
            if cur:
                assert z is not None
                dz = torch.empty_like(z)
                off = 0
                for start, stop, r, i in cur:
                    gu, zu = g[:, start:stop], z[:, off : off + r]
                    b, s = flat[i + 1], flat[i + 2]
                    q = gu @ b.to(dt)  # (T, r)
                    if needs[i + 2]:
                        grads[i + 2] = (q.to(acc) * zu.to(acc)).sum().to(s.dtype).reshape(s.shape)
                    if needs[i + 1]:
                        grads[i + 1] = (gu.t() @ (zu * s.to(dt))).to(b.dtype)
                    torch.mul(q, s.to(dt), out=dz[:, off : off + r])
                    off += r
                if any(needs[i] for *_, i in cur):
                    assert x2 is not None
                    da = dz.t() @ x2
                    off = 0
                    for _, _, r, i in cur:
                        grads[i] = da[off : off + r].to(flat[i].dtype) if needs[i] else None
                        off += r
            dx = None
            if ctx.needs_input_grad[0]:
                assert w is not None
                dx = g @ w
                if dz is not None:
                    assert a_cur is not None
                    torch.addmm(dx, dz, a_cur, out=dx)
                shape, dtype = ctx.x_meta
                dx = dx.view(shape).to(dtype)
            frozen = [f for f in plan.frozen() if needs[f[3] + 2]]
            if frozen:
                assert x2 is not None
                if plan.route == "fold":
                    for start, stop, _, i in frozen:
                        gw = g[:, start:stop].t() @ x2  # this unit's rows of dL/dW only
                        proj = (flat[i + 1].to(dt).t() @ gw).to(acc)  # (R, d_in)
                        grads[i + 2] = (proj * flat[i].to(acc)).sum(1).to(flat[i + 2].dtype)
                else:
                    a_all = torch.cat([flat[i] for *_, i in frozen], 0).to(dt)
                    zf = F.linear(x2, a_all)  # (T, R_total): X A^T for every unit at once
                    off = 0
                    for start, stop, r, i in frozen:
                        # sum_t (X A_r^T)_t (dY_u B_r)_t as ((X A^T)^T dY_u) . B^T: a (R, d_out) product, no (T, R)
                        # elementwise pass.
                        proj = (zf[:, off : off + r].t() @ g[:, start:stop]).to(acc)
                        grads[i + 2] = (proj * flat[i + 1].t().to(acc)).sum(1).to(flat[i + 2].dtype)
                        off += r
        return (dx, None, None, None, *grads)


class _Units(nn.ModuleList):
    """An ``nn.ModuleList`` of :class:`LowRankUnit` that says so to the type checker."""

    def __iter__(self) -> Iterator[LowRankUnit]:
        return super().__iter__()  # type: ignore[return-value]


class SDLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus SD-LoRA components on some output slices.

    The wrapped layer keeps its parameters (frozen) as ``self.base``. Magnitudes come from the owning
    ``SDLoRAModel``, which sets ``self.alphas`` (and ``self.alpha_sources``, the tensors they are made of) for
    the duration of each forward; calling this layer outside that forward raises, because without magnitudes
    the output is undefined.

    How the components are evaluated (``compute``; every mode gives the same outputs and gradients up to
    floating-point rounding):

    * ``auto`` (default), ``fold``, ``factored``: when something is being trained, frozen components are
      folded into the weight (``W0 + sum B diag(s) A``, ``d_out d_in R`` per unit and call, independent of the
      batch) and the layer runs as one custom autograd function (``_AdaptedLinear``): the step costs a plain
      LoRA step plus the frozen magnitudes' gradients, from the weight gradient of the adapted rows
      (``fold``) or from rank-R projections (``factored``); ``auto`` takes the cheaper for the call's token
      count and stored rank (``route_costs``). When nothing needs a gradient (evaluation), every component,
      the current one included, is folded into one weight that is cached until any tensor it depends on
      changes (``_fold_key``): the layer then costs what the bare layer costs.
    * ``stacked``: autograd through one stacked low-rank product (``X A_all^T``, then ``B_u``) added to the
      base output; ``loop``: one product per component, as the official code. References for tests and
      benchmarks, never folded.

    Args:
        base: the layer to wrap; its device and dtype are used for every factor.
        units: ``(name, start, stop)`` output-row slices to adapt, e.g. ``[("q", 0, d), ("v", 2d, 3d)]`` for a
            fused qkv, ``[("out", 0, d_out)]`` for a separate projection.
        first_index: global index of the first unit (row of a per-layer magnitude table).
        compute: one of ``COMPUTE_MODES`` (see ``AdapterConfig.compute``).
        normaliser, normalise_current, norm_eps: see ``AdapterConfig``.
    """

    def __init__(
        self,
        base: nn.Linear,
        units: list[tuple[str, int, int]],
        first_index: int,
        compute: str = "auto",
        normaliser: str = "product_of_frobenius",
        normalise_current: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SDLoRALinear wraps nn.Linear, got {type(base).__name__}")
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        for name, start, stop in units:
            if not 0 <= start < stop <= base.out_features:
                raise ValueError(f"unit {name}: rows [{start}, {stop}) outside 0..{base.out_features}")
        self.units = _Units(
            LowRankUnit(name, start, stop, base.in_features, first_index + i, base.weight)
            for i, (name, start, stop) in enumerate(units)
        )
        self.compute = compute
        self.normaliser = normaliser
        self.normalise_current = normalise_current
        self.norm_eps = norm_eps
        self.merged = False
        self._w0: Tensor | None = None
        self.alphas: Tensor | None = None
        self.alpha_sources: tuple[Tensor, ...] | None = None
        self.last_route: str | None = None  # route of the last trained call (diagnostics, benchmarks)
        self._fold_cache: tuple[tuple[Any, ...], list[Tensor], Tensor] | None = None
        self._slot_range: dict[int, tuple[Tensor, int, int, int]] = {}  # unit index -> (slots, version, lo, hi)

    def _scale_args(self) -> tuple[bool, str, float]:
        return self.normalise_current, self.normaliser, self.norm_eps

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.base.weight, self.base.bias)
        alphas = self.alphas
        if alphas is None:
            raise RuntimeError(
                "SDLoRALinear has no magnitudes: call the model through SDLoRAModel.forward (or merge it first)"
            )
        if self.compute == "loop":
            return self._add_loop(x, F.linear(x, self.base.weight, self.base.bias), alphas)
        base_trains = self.base.weight.requires_grad or (self.base.bias is not None and self.base.bias.requires_grad)
        if self.compute == "stacked" or base_trains:  # a trained base weight needs autograd's full weight gradient
            return self._add_stacked(x, F.linear(x, self.base.weight, self.base.bias), alphas)
        if not (torch.is_grad_enabled() and self._adapter_requires_grad(alphas)):
            # Nothing of the adapter is differentiated: it is one constant weight (autograd still reaches x).
            return F.linear(x, self._cached_weight(alphas), self.base.bias)
        return self._forward_trained(x, alphas)

    def _adapter_requires_grad(self, alphas: Tensor) -> bool:
        return alphas.requires_grad or any(
            t is not None and t.requires_grad for u in self.units for t in (u.A_cur, u.B_cur)
        )

    def _forward_trained(self, x: Tensor, alphas: Tensor) -> Tensor:
        plan: list[tuple[int, int, int, int]] = []
        flat: list[Tensor] = []
        fold: list[tuple[LowRankUnit, Tensor, Tensor, Tensor]] = []
        shapes: list[tuple[int, int]] = []
        alpha_grad = False
        for u in self.units:
            rf = int(u.A_frozen.shape[0])
            rc = 0 if u.A_cur is None else int(u.A_cur.shape[0])
            if rf:
                s_f = u.frozen_scales(self._frozen_alphas(u, alphas))[u.rank_owner]  # (R,)
                flat += [u.A_frozen, u.B_frozen, s_f]
                fold.append((u, u.A_frozen, u.B_frozen, s_f.detach()))
                shapes.append((u.out_features, rf))
                alpha_grad = alpha_grad or s_f.requires_grad
            if rc:
                assert u.A_cur is not None and u.B_cur is not None
                flat += [u.A_cur, u.B_cur, u.current_scale(alphas, *self._scale_args())]
            plan.append((u.start, u.stop, rf, rc))
        if not flat:
            return F.linear(x, self.base.weight, self.base.bias)
        route = "none"
        if alpha_grad:
            route = self.compute
            if route == "auto":
                costs = route_costs(x.numel() // self.in_features, self.in_features, shapes)
                route = "fold" if costs["fold"] < costs["factored"] / FACTORED_EFFICIENCY else "factored"
        self.last_route = route
        w = self._fold(fold)
        plan_ = _Plan(tuple(plan), route, _compute_dtype(x))
        y: Tensor = _AdaptedLinear.apply(x, w, self.base.bias, plan_, *flat)
        return y

    def _frozen_alphas(self, u: LowRankUnit, alphas: Tensor) -> Tensor:
        """``alphas``, detached when none of the unit's frozen components uses a magnitude that trains.

        ``alphas`` is ``[alpha_prev, alpha_cur]``: when only one of them trains (``train_old_magnitudes:
        false``), autograd alone would still ask for the frozen scales' gradient (zeros for the fixed part) and
        the backward would compute it. The unit's slot range is read once per change of its ``slots`` buffer.
        """
        if self.alpha_sources is None or not alphas.requires_grad or u.slots.is_meta:
            return alphas  # (on the meta device the slots have no values: keep every gradient, to be safe)
        prev, cur = self.alpha_sources
        cached = self._slot_range.get(u.index)
        if cached is None or cached[0] is not u.slots or cached[1] != u.slots._version:
            cached = (u.slots, u.slots._version, int(u.slots.min()), int(u.slots.max()))
            self._slot_range[u.index] = cached
        lo, hi = cached[2], cached[3]
        n_prev = prev.shape[-1]
        trains = (prev.requires_grad and lo < n_prev) or (cur.requires_grad and hi >= n_prev)
        return alphas if trains else alphas.detach()

    @torch.no_grad()
    def _fold(self, parts: list[tuple[LowRankUnit, Tensor, Tensor, Tensor]]) -> Tensor:
        """``W0`` with ``B diag(s) A`` added on each unit's rows (in at least float32, rounded once); ``W0``
        itself (no copy) when there is nothing to fold. (In-place accumulation is written ``addmm(..., out=)``
        rather than ``addmm_``, the same kernel, because ``torch.utils.flop_counter`` does not count ``addmm_``
        and the benchmarks count flops.)"""
        w0 = self.base.weight
        if not parts:
            return w0
        acc = torch.promote_types(w0.dtype, torch.float32)
        w = w0.to(acc, copy=True)
        for u, a, b, s in parts:
            rows = w[u.start : u.stop]
            torch.addmm(rows, b.to(acc) * s.to(acc), a.to(acc), out=rows)
        return w.to(w0.dtype)

    # --------------------------------------------------------------------------------------- fold cache
    def _fold_key(self) -> tuple[tuple[Any, ...], list[Tensor]] | None:
        """Version counter, storage address, dtype, device and shape of every tensor the folded weight depends on.

        Any in-place change (optimiser step, ``load_state_dict``, KD's increments, ``merge``/``unmerge``) bumps a
        version; a replacement (``begin_task``/``end_task``/``load_adapter_state`` build new tensors) or a
        move/cast (``.to()`` swaps a parameter's storage) changes an address: both change the key. The cache
        holds the tensors themselves (returned here too), so no new tensor can reuse one of their addresses
        while the cached fold lives. Every buffer and parameter of every unit is included, so state added to
        ``LowRankUnit`` later is covered as long as it is a buffer or parameter. Writes through ``.data`` bypass
        version counters (autograd cannot see them either); ``train()``/``eval()`` and ``invalidate_cache()``
        drop the cache as well. ``None`` when the magnitudes' sources are unknown.
        """
        if self.alpha_sources is None:
            return None
        tensors: list[Tensor] = [*self.alpha_sources, self.base.weight]
        if self.base.bias is not None:
            tensors.append(self.base.bias)
        extra: list[Any] = []
        for u in self.units:
            for name, t in itertools.chain(u._buffers.items(), u._parameters.items()):
                extra.append(name)
                if t is not None:
                    tensors.append(t)
            extra.append(u.cur_slot)
        parts = [(t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors]
        return (*parts, *extra, self._scale_args()), tensors

    def _cached_weight(self, alphas: Tensor) -> Tensor:
        """``W0`` plus every component (current included), reused while ``_fold_key`` is unchanged."""
        keyed = self._fold_key()
        cache = self._fold_cache
        if keyed is not None and cache is not None and cache[0] == keyed[0]:
            return cache[2]
        parts: list[tuple[LowRankUnit, Tensor, Tensor, Tensor]] = []
        for u in self.units:
            st = u.stacked(alphas, *self._scale_args())
            if st is not None:
                a, b, s = st
                parts.append((u, a.detach(), b.detach(), s.detach()))
        w = self._fold(parts)
        self._fold_cache = None if keyed is None else (keyed[0], keyed[1], w)
        return w

    def invalidate_cache(self) -> None:
        """Drop the cached folded weight (it is rebuilt at the next call without autograd)."""
        self._fold_cache = None

    def train(self, mode: bool = True) -> SDLoRALinear:
        self._fold_cache = None  # belt and braces: every switch between training and evaluation refolds
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Copies and pickles rebuild these (they hold references to other tensors).
        state["_fold_cache"] = None
        state["_slot_range"] = {}
        return state

    # ------------------------------------------------------------------------------------- references
    def _add_stacked(self, x: Tensor, y: Tensor, alphas: Tensor) -> Tensor:
        """Reference: autograd through one low-rank product over the stacked factors of all components."""
        stacks = [(u, st) for u in self.units if (st := u.stacked(alphas, *self._scale_args())) is not None]
        if not stacks:
            return y
        # One down-projection GEMM for all units of this layer (q and v share the input).
        a_all = torch.cat([st[0] for _, st in stacks], 0) if len(stacks) > 1 else stacks[0][1][0]
        z = F.linear(x, a_all.to(x.dtype))  # (..., R_total)
        offset = 0
        for u, (a, b, s) in stacks:
            r = a.shape[0]
            zu = z[..., offset : offset + r] * s.to(z.dtype)
            offset += r
            y = add_rows(y, u.start, u.stop, F.linear(zu, b.to(zu.dtype)))
        return y

    def _add_loop(self, x: Tensor, y: Tensor, alphas: Tensor) -> Tensor:
        """Reference: one product (and one saved activation) per component, as the official code."""
        for u in self.units:
            delta = None
            if u.num_frozen:
                scales = u.frozen_scales(alphas)
                offset = 0
                for c, r in enumerate(u.comp_ranks):
                    a = u.A_frozen[offset : offset + r]
                    b = u.B_frozen[:, offset : offset + r]
                    offset += r
                    term = F.linear(F.linear(x, a) * scales[c].to(x.dtype), b)
                    delta = term if delta is None else delta + term
            if u.A_cur is not None and u.B_cur is not None:
                s = u.current_scale(alphas, *self._scale_args())
                term = F.linear(F.linear(x, u.A_cur) * s.to(x.dtype), u.B_cur)
                delta = term if delta is None else delta + term
            if delta is not None:
                y = add_rows(y, u.start, u.stop, delta)
        return y

    # ------------------------------------------------------------------------------------------- merge
    def lora_factors(self, alphas: Tensor) -> tuple[Tensor, Tensor] | None:
        """This layer's whole update as one plain LoRA: ``(A (R, in), B (out, R))`` with ``W - W0 = B @ A``.

        Each unit's ``stacked`` factors and per-rank scales (frozen and current components, KD increments
        included) are laid side by side: ``A = [A_u1; A_u2; ...]`` and B holds ``B_u * s_u`` in the unit's output
        rows and zeros elsewhere (e.g. the k rows of a fused qkv), so R is the sum of the units' ranks. ``None``
        when no unit has a component yet.
        """
        stacks = [(u, u.stacked(alphas, *self._scale_args())) for u in self.units]
        parts = [(u, st) for u, st in stacks if st is not None]
        if not parts:
            return None
        a_all = torch.cat([a for _, (a, _, _) in parts], 0).detach()
        b_all = a_all.new_zeros(self.out_features, a_all.shape[0])
        offset = 0
        for u, (a, b, s) in parts:
            r = a.shape[0]
            b_all[u.start : u.stop, offset : offset + r] = b.detach() * s.detach().to(b.dtype)
            offset += r
        return a_all, b_all

    def delta_weight(self, alphas: Tensor) -> Tensor:
        """Dense update ``W - W0`` (paper Eq. 4 summed over components), shape (out_features, in_features)."""
        dw = torch.zeros_like(self.base.weight)
        for u in self.units:
            dw[u.start : u.stop] += u.delta_weight(alphas, *self._scale_args()).to(dw.dtype)
        return dw

    @torch.no_grad()
    def merge(self, alphas: Tensor) -> None:
        """Fold every component into ``base.weight`` in place (exact; ``unmerge`` restores W0 bit for bit)."""
        if self.merged:
            return
        self._fold_cache = None  # the merged layer is the bare layer: free the cached copy
        self._w0 = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta_weight(alphas))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight W0 saved by ``merge``."""
        if not self.merged:
            return
        assert self._w0 is not None
        self._fold_cache = None
        self.base.weight.copy_(self._w0)
        self._w0 = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, compute={self.compute}, merged={self.merged}"
