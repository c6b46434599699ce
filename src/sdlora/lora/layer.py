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

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankUnit", "SDLoRALinear", "component_norm"]


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
        component was frozen; ``slots`` (C,): index of the magnitude the component uses; ``extra`` (C,):
        magnitude increments absorbed by SD-LoRA-KD (Eq. 8), per unit because alpha is shared across layers;
        ``rank_owner`` (R,): component of each stacked rank row.
    Parameters (the component being learned): ``A_cur`` (r, d_in), ``B_cur`` (d_out, r) or ``None``.
    """

    # Registered buffers, declared for the type checker (nn.Module.__getattr__ would type them Tensor | Module).
    A_frozen: Tensor
    B_frozen: Tensor
    norms: Tensor
    extra: Tensor
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
        self.register_buffer("extra", torch.zeros(0, device=weight.device, dtype=torch.float32))
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

    def freeze_current(self, normaliser: str, extra: float = 0.0) -> bool:
        """Move the current component into the frozen stack with its normaliser fixed now.

        Returns False (and drops it) when its product is exactly zero: such a component never contributed
        and has no direction.
        """
        assert self.A_cur is not None and self.B_cur is not None
        a, b = self.A_cur.detach(), self.B_cur.detach()
        norm = float(component_norm(b.double(), a.double(), normaliser))
        slot = self.cur_slot
        self.drop_current()
        if norm == 0.0 or not math.isfinite(norm):
            return False
        self._append(a.clone(), b.clone(), norm, slot, extra)
        return True

    def _append(self, a: Tensor, b: Tensor, norm: float, slot: int, extra: float) -> None:
        dev = self.norms.device
        comp = len(self.comp_ranks)
        self.A_frozen = torch.cat([self.A_frozen, a.to(self.A_frozen)], 0)
        self.B_frozen = torch.cat([self.B_frozen, b.to(self.B_frozen)], 1)
        self.norms = torch.cat([self.norms, torch.tensor([norm], device=dev, dtype=torch.float32)])
        self.extra = torch.cat([self.extra, torch.tensor([extra], device=dev, dtype=torch.float32)])
        self.slots = torch.cat([self.slots, torch.tensor([slot], device=dev, dtype=torch.long)])
        owner = torch.full((a.shape[0],), comp, device=dev, dtype=torch.long)
        self.rank_owner = torch.cat([self.rank_owner, owner])
        self.comp_ranks.append(int(a.shape[0]))

    def set_frozen(self, a: Tensor, b: Tensor, norms: Tensor, slots: Tensor, extra: Tensor, ranks: list[int]) -> None:
        """Replace the frozen stack wholesale (used when loading a saved adapter)."""
        if sum(ranks) != a.shape[0] or a.shape[0] != b.shape[1] or len(ranks) != norms.numel():
            raise ValueError(f"inconsistent frozen factors for unit {self.name}")
        dev = self.norms.device
        self.A_frozen = a.to(self.A_frozen).clone()
        self.B_frozen = b.to(self.B_frozen).clone()
        self.norms = norms.to(device=dev, dtype=torch.float32).clone()
        self.extra = extra.to(device=dev, dtype=torch.float32).clone()
        self.slots = slots.to(device=dev, dtype=torch.long).clone()
        self.comp_ranks = [int(r) for r in ranks]
        self.rank_owner = torch.repeat_interleave(
            torch.arange(len(ranks), device=dev), torch.tensor(ranks, device=dev, dtype=torch.long)
        )

    # ------------------------------------------------------------------------------------------- scales
    def _row(self, alphas: Tensor) -> Tensor:
        return alphas if alphas.dim() == 1 else alphas[self.index]

    def frozen_scales(self, alphas: Tensor) -> Tensor:
        """Per-component scale ``(alpha_slot + extra) / n`` of the frozen components, shape (C,)."""
        a = self._row(alphas)
        return (a[self.slots].float() + self.extra) / self.norms

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


class _Units(nn.ModuleList):
    """An ``nn.ModuleList`` of :class:`LowRankUnit` that says so to the type checker."""

    def __iter__(self) -> Iterator[LowRankUnit]:
        return super().__iter__()  # type: ignore[return-value]


class SDLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus SD-LoRA components on some output slices.

    The wrapped layer keeps its parameters (frozen) as ``self.base``. Magnitudes come from the owning
    ``SDLoRAModel``, which sets ``self.alphas`` for the duration of each forward; calling this layer outside
    that forward raises, because without magnitudes the output is undefined.

    Args:
        base: the layer to wrap; its device and dtype are used for every factor.
        units: ``(name, start, stop)`` output-row slices to adapt, e.g. ``[("q", 0, d), ("v", 2d, 3d)]`` for a
            fused qkv, ``[("out", 0, d_out)]`` for a separate projection.
        first_index: global index of the first unit (row of a per-layer magnitude table).
        compute: ``"factored"``, ``"fold"`` or ``"loop"`` (see ``AdapterConfig.compute``).
        normaliser, normalise_current, norm_eps: see ``AdapterConfig``.
    """

    def __init__(
        self,
        base: nn.Linear,
        units: list[tuple[str, int, int]],
        first_index: int,
        compute: str = "factored",
        normaliser: str = "product_of_frobenius",
        normalise_current: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SDLoRALinear wraps nn.Linear, got {type(base).__name__}")
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
        # Without autograd (evaluation) folding is cheapest: one d_out x d_in x R product per call, after which
        # the layer costs what the bare layer costs; with autograd the factored path saves the weight gradient.
        if self.compute == "fold" or (self.compute == "factored" and not torch.is_grad_enabled()):
            return self._forward_fold(x, alphas)
        y = self.base(x)
        if self.compute == "loop":
            return self._add_loop(x, y, alphas)
        return self._add_factored(x, y, alphas)

    def _add_factored(self, x: Tensor, y: Tensor, alphas: Tensor) -> Tensor:
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
            # In-place add on the output slice: F.linear's backward needs its inputs, not its output.
            y[..., u.start : u.stop] += F.linear(zu, b.to(zu.dtype))
        return y

    def _add_loop(self, x: Tensor, y: Tensor, alphas: Tensor) -> Tensor:
        """Reference evaluation: one product (and one saved activation) per component, as the official code."""
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
                y[..., u.start : u.stop] += delta
        return y

    def _forward_fold(self, x: Tensor, alphas: Tensor) -> Tensor:
        """Fold frozen components into the weight (cost d_out*d_in*R, independent of the batch).

        The gradient of each magnitude then flows through the weight: dL/dalpha_k = <dL/dW, direction_k>.
        The current component stays a low-rank side path.
        """
        w = self.base.weight
        chunks: list[Tensor] = []
        pos = 0
        for u in sorted(self.units, key=lambda u: u.start):
            if not u.num_frozen:
                continue
            s = u.frozen_scales(alphas)[u.rank_owner]
            dw = (u.B_frozen * s.to(w.dtype)) @ u.A_frozen
            chunks.append(w[pos : u.start])
            chunks.append(w[u.start : u.stop] + dw)
            pos = u.stop
        if chunks:
            chunks.append(w[pos:])
            w = torch.cat(chunks, 0)
        y = F.linear(x, w.to(x.dtype), None if self.base.bias is None else self.base.bias.to(x.dtype))
        for u in self.units:
            if u.A_cur is not None and u.B_cur is not None:
                s = u.current_scale(alphas, *self._scale_args())
                # Scale the rank-r activation, not the d_out-wide output: autograd then saves r columns, not d_out.
                y[..., u.start : u.stop] += F.linear(F.linear(x, u.A_cur) * s.to(x.dtype), u.B_cur)
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
        self._w0 = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta_weight(alphas))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight W0 saved by ``merge``."""
        if not self.merged:
            return
        assert self._w0 is not None
        self.base.weight.copy_(self._w0)
        self._w0 = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, compute={self.compute}, merged={self.merged}"
