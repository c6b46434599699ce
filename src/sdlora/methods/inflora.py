"""InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024) in
the sdlora engine.

Per task t and every attention block, a low-rank update ``B_t A_t`` is added on the key and value projections.
``A_t`` (r x d_in, the down-projection) is not trained: before the task it is set from the task's input
covariance ``R_t = sum_tokens x x^T`` of the adapted layer, after projecting out the input subspace of earlier
tasks (basis ``M``, orthonormal columns)::

    A_t = top-r left singular vectors of (I - M M^T) R_t, as rows, divided by sqrt(3)

Only ``B_t`` (zero-initialised) and the task's head block train, so the update lies in directions orthogonal to
what earlier tasks' inputs span ("interference-free"). After the task the subspace memory ``M`` grows with the
directions of the (new model's) input covariance that earlier tasks did not cover, until a share ``threshold_t``
of the energy is explained (the GPM criterion, Saha et al., ICLR 2021), with ``threshold_t`` growing linearly
from ``lamb`` (first task) towards ``lame``: ``threshold_t = lamb + (lame - lamb) * t / T`` (t 0-based, T tasks).

Facts followed from the official code (liangyanshuo/InfLoRA, ``methods/inflora.py``): k and v share one ``A_t``;
the ÷sqrt(3); the one-sided projection ``(I - M M^T) R``; energies from the squared singular values of the
accumulated covariance matrix (not of the raw token matrix); the first task keeps the leading directions whose
cumulative energy is strictly below the threshold (at least one), later tasks add directions until the threshold
is reached; the memory is recomputed with a second pass over the task's data after training.

Approximations and choices here (documented, not hidden):

* DualGPM stores the complement of ``M`` once ``M`` fills more than half of the input space, which saves memory;
  the subspace it represents, and the update criterion, are the same as keeping ``M`` explicitly, which this
  implementation always does (d_in <= 1024 for the supported ViTs).
* ``A_t`` is computed in an orthonormal basis Q of the complement of ``M`` (``Q^T R`` is factorised and rotated
  back), which equals the left singular vectors of ``(I - M M^T) R`` for non-zero singular values and keeps the
  rows exactly orthogonal to ``M`` when ``R`` has fewer than r directions left there. If the complement is
  smaller than r, the task gets that smaller rank (0: no update on that layer).
* The covariance uses evaluation transforms (``TaskContext.statistics_batches``), capped at
  ``method.options.max_batches`` batches; the official code uses the training loader (with augmentation).
* On text backbones the covariance sums over the tokens of the texts only (the attention mask leaves out
  padding); separate key and value linears each compute ``A_t`` from the same input, i.e. the shared ``A_t``.
* The loss and head are the engine's (current-task logits after the first task, as InfLoRA's masked loss); the
  official code's per-task classifier pool and its evaluation-time task-identification path are not used
  (argmax over all seen classes, as for every method here).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Backbone
from ..config import MethodConfig
from ..lora.layer import add_rows
from ..lora.surgery import qkv_slices, replace_submodule
from .base import LowRankUpdate, Method, TaskContext, UnsupportedBackbone, register_method

__all__ = ["InfLoRA", "InfLoRALinear", "InfLoRAOptions", "down_projection", "gpm_update", "project_out"]

#: InfLoRA adapts the key and value projections (of a fused qkv Linear: those row slices)
_PROJECTIONS = ("k", "v")


@dataclass
class InfLoRAOptions:
    """InfLoRA's options (``method.options`` when ``method.name: inflora``).

    Attributes:
        lamb: DualGPM energy threshold for the first task's input subspace (0.98 on ImageNet-R in the
            InfLoRA configs).
        lame: threshold reached at the last task; it grows linearly from ``lamb``.
        rank: rank of each task's component (10 on ImageNet-R).
        max_batches: batches of the current task used to estimate the input covariance (None: all).
    """

    lamb: float = 0.98
    lame: float = 1.0
    rank: int = 10
    max_batches: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.lamb <= 1.0 or not 0.0 < self.lame <= 1.0:
            raise ValueError(f"lamb and lame must be in (0, 1], got {self.lamb}, {self.lame}")
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise ValueError(f"max_batches must be positive or null, got {self.max_batches}")


# --------------------------------------------------------------------------------------------- subspace math
def project_out(mat: Tensor, basis: Tensor) -> Tensor:
    """``(I - M M^T) mat`` for a basis ``M`` (d x m, orthonormal columns; m may be 0)."""
    if basis.shape[1] == 0:
        return mat
    return mat - basis @ (basis.t() @ mat)


def _complement(basis: Tensor, d: int) -> Tensor:
    """Orthonormal basis (d x (d - m)) of the orthogonal complement of the span of ``basis`` (d x m)."""
    eye = torch.eye(d, dtype=torch.float64, device=basis.device)
    if basis.shape[1] == 0:
        return eye
    proj = project_out(eye, basis.double())
    vals, vecs = torch.linalg.eigh((proj + proj.t()) / 2)  # eigenvalues ~0 (span M) or ~1 (complement)
    return vecs[:, vals > 0.5]


def down_projection(cov: Tensor, basis: Tensor, rank: int) -> Tensor:
    """InfLoRA's ``A_t`` before the 1/sqrt(3) scale: the top-``rank`` left singular vectors of ``(I - M M^T) cov``,
    as rows (shape (r', d), r' = min(rank, d - m)); every row is orthogonal to the columns of ``basis``.

    Args:
        cov: the current task's input covariance of the layer (d x d, symmetric PSD).
        basis: the stored input subspace of earlier tasks (d x m, orthonormal columns).
        rank: wanted rank.
    """
    d = cov.shape[0]
    q = _complement(basis, d)  # (d, k)
    if q.shape[1] == 0:
        return cov.new_zeros(0, d, dtype=torch.float64)
    # (I - M M^T) cov = Q (Q^T cov): its left singular vectors are Q times those of Q^T cov.
    u, _, _ = torch.linalg.svd(q.t() @ cov.double(), full_matrices=False)
    r = min(rank, q.shape[1])
    return (q @ u[:, :r]).t().contiguous()


def gpm_update(basis: Tensor, cov: Tensor, threshold: float, first: bool) -> Tensor:
    """Grow the input-subspace memory with the current task's covariance (GPM/DualGPM criterion).

    Energies are the squared singular values of ``cov``. First task: keep the leading left singular vectors whose
    cumulative energy share is below ``threshold`` (at least one). Later tasks: the share already explained by
    ``basis`` is ``1 - ||(I - M M^T) cov||_F^2 / ||cov||_F^2``; add the leading left singular vectors of the
    projected matrix, each adding its share, until ``threshold`` is reached.

    Returns:
        The new basis (d x m', orthonormal columns, m' >= m); unchanged when nothing is added.
    """
    cov = cov.double()
    basis = basis.double()
    d = cov.shape[0]
    sv_total = torch.linalg.svdvals(cov).square().sum()
    if float(sv_total) == 0.0:
        return basis
    if first or basis.shape[1] == 0:
        u, s, _ = torch.linalg.svd(cov, full_matrices=False)
        share = s.square() / sv_total
        k = max(int((torch.cumsum(share, 0) < threshold).sum()), 1)
        return u[:, :k].contiguous()
    hat = project_out(cov, basis)
    u, s, _ = torch.linalg.svd(hat, full_matrices=False)
    share = s.square() / sv_total
    captured = float(1.0 - share.sum())
    k = 0
    tol = float(s[0]) * 1e-10 if s.numel() else 0.0
    for i in range(s.numel()):
        if captured >= threshold or float(s[i]) <= tol:
            break
        captured += float(share[i])
        k += 1
    if k == 0:
        return basis
    new = project_out(u[:, :k], basis)  # already orthogonal up to rounding; make it exact
    merged, _ = torch.linalg.qr(torch.cat([basis, new], 1))
    return merged[:, : min(merged.shape[1], d)].contiguous()


# ------------------------------------------------------------------------------------------------- the layer
class InfLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus, per task, ``B_t A_t`` on some output slices (one ``A_t`` shared by the slices).

    Buffers: ``A_frozen`` (R, d_in) stacked down-projections of finished tasks; ``B_frozen_<slice>`` (d_s, R);
    ``A_cur`` (r, d_in, fixed, not trained) of the current task or empty; ``memory`` (d_in, m) the stored input
    subspace. Parameters: ``B_cur[<slice>]`` (d_s, r), zero-initialised, the only trained adapter part.
    """

    # Registered buffers, declared for the type checker (nn.Module.__getattr__ would type them Tensor | Module).
    A_frozen: Tensor
    A_cur: Tensor
    memory: Tensor

    def __init__(self, base: nn.Linear, slices: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.slices = list(slices)
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("A_frozen", torch.zeros(0, self.in_features, **kw))
        for name, start, stop in self.slices:
            self.register_buffer(f"B_frozen_{name}", torch.zeros(stop - start, 0, **kw))
        self.register_buffer("A_cur", torch.zeros(0, self.in_features, **kw))
        self.register_buffer(
            "memory", torch.zeros(self.in_features, 0, device=base.weight.device, dtype=torch.float64)
        )
        self.B_cur = nn.ParameterDict()
        self.task_ranks: list[int] = []

    def b_frozen(self, name: str) -> Tensor:
        return getattr(self, f"B_frozen_{name}")

    @property
    def in_task(self) -> bool:
        return len(self.B_cur) > 0

    def begin(self, a: Tensor) -> None:
        """Start a task with the fixed down-projection ``a`` (r x d_in); r = 0 adds nothing."""
        ref = self.base.weight
        self.A_cur = a.to(ref).contiguous()
        self.B_cur = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(stop - start, a.shape[0], device=ref.device, dtype=ref.dtype))
                for name, start, stop in self.slices
            }
            if a.shape[0]
            else {}
        )
        self.task_ranks.append(int(a.shape[0]))

    @torch.no_grad()
    def freeze(self) -> None:
        """Move the current task's factors into the frozen stack."""
        if self.A_cur.shape[0]:
            self.A_frozen = torch.cat([self.A_frozen, self.A_cur], 0)
            for name, _, _ in self.slices:
                setattr(self, f"B_frozen_{name}", torch.cat([self.b_frozen(name), self.B_cur[name].detach()], 1))
        self.A_cur = self.A_cur.new_zeros(0, self.in_features)
        self.B_cur = nn.ParameterDict()

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """All tasks' factors of one slice: (A (R', d_in), B (d_s, R'))."""
        if name in self.B_cur:
            return torch.cat([self.A_frozen, self.A_cur], 0), torch.cat([self.b_frozen(name), self.B_cur[name]], 1)
        return self.A_frozen, self.b_frozen(name)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.A_frozen.shape[0] == 0 and not self.in_task:
            return y
        a = torch.cat([self.A_frozen, self.A_cur], 0) if self.in_task else self.A_frozen
        z = F.linear(x, a.to(x.dtype))  # (..., R'), shared by the slices
        for name, start, stop in self.slices:
            _, b = self.factors(name)
            y = add_rows(y, start, stop, F.linear(z, b.to(z.dtype)))
        return y

    def lora_factors(self) -> tuple[Tensor, Tensor] | None:
        """Every task's update as one plain LoRA ``(A (R', d_in), B (d_out, R'))``, ``W - W0 = B @ A``: the shared
        A and each slice's B in its output rows (zeros elsewhere). ``None`` before any rank was added."""
        a = torch.cat([self.A_frozen, self.A_cur], 0) if self.in_task else self.A_frozen
        if a.shape[0] == 0:
            return None
        b_all = a.new_zeros(self.base.out_features, a.shape[0]).detach()
        for name, start, stop in self.slices:
            b_all[start:stop] = self.factors(name)[1].detach()
        return a.detach().clone(), b_all

    def delta_weight(self) -> Tensor:
        """Dense ``W - W0`` (every task's ``B_t A_t`` on its slices)."""
        dw = torch.zeros_like(self.base.weight)
        for name, start, stop in self.slices:
            a, b = self.factors(name)
            dw[start:stop] += (b @ a).to(dw.dtype)
        return dw

    def extra_repr(self) -> str:
        return f"slices={[s[0] for s in self.slices]}, ranks={self.task_ranks}, memory={self.memory.shape[1]}"


# ------------------------------------------------------------------------------------------------ the method
@register_method("inflora")
class InfLoRA(Method):
    """InfLoRA on the key and value projections of every block (see the module docstring).

    Options: ``method.options`` (:class:`InfLoRAOptions`: ``lamb``, ``lame``, ``rank``, ``max_batches``);
    ``method.adapter`` is not used.
    """

    options_class = InfLoRAOptions

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.model.requires_grad_(False)
        self.icfg: InfLoRAOptions = self.options
        self._layer_names: list[str] = []
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        roles = backbone.attention_targets

        def matching(role: str) -> list[tuple[str, nn.Linear]]:
            return [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, p) for p in roles.get(role, []))]

        entries: list[tuple[str, list[tuple[str, int, int]]]] = []
        if "qkv" in roles:
            entries = [(name, qkv_slices(m, _PROJECTIONS)) for name, m in matching("qkv")]
        elif "k" in roles and "v" in roles:
            # Separate k and v linears take the same input, so their covariances and hence their A_t are equal:
            # the official code's shared A_t, computed once per projection.
            entries = [(name, [("out", 0, m.out_features)]) for name, m in matching("k") + matching("v")]
            entries.sort(key=lambda e: [n for n, _ in linears].index(e[0]))
        if not entries:
            raise UnsupportedBackbone(
                f"inflora adapts the attention key and value projections, and backbone {backbone.name!r} has none "
                f"that sdlora recognises (found roles: {sorted(roles) or 'none'}); it supports a fused qkv "
                "(timm ViTs) and separate key/value linears (BERT-style query/key/value, q_proj/k_proj/v_proj, "
                "query_proj/key_proj/value_proj, q_lin/k_lin/v_lin)"
            )
        for name, slices in entries:
            base = self.model.get_submodule(name)
            assert isinstance(base, nn.Linear)
            replace_submodule(self.model, name, InfLoRALinear(base, slices))
            self._layer_names.append(name)
        self.num_tasks = 0

    def layers(self) -> list[InfLoRALinear]:
        return [self.model.get_submodule(n) for n in self._layer_names]  # type: ignore[misc]

    def threshold(self, task: int, num_tasks: int) -> float:
        """DualGPM energy threshold after task ``task`` (0-based): ``lamb + (lame - lamb) * task / num_tasks``."""
        return self.icfg.lamb + (self.icfg.lame - self.icfg.lamb) * task / max(num_tasks, 1)

    @torch.no_grad()
    def input_covariances(self, ctx: TaskContext) -> list[Tensor]:
        """``sum x x^T`` over every token of the current task's training samples, at the input of each adapted
        layer (forward hooks), summed over processes; float64, shape (d_in, d_in) per layer.

        Text batches carry an attention mask: padding positions are not tokens of any text, so they are left out
        (the layer input is ``[B, L', d]`` with ``L'`` the columns the batch uses, the mask's first ``L'``).
        """
        layers = self.layers()
        covs = [torch.zeros(m.in_features, m.in_features, device=ctx.device, dtype=torch.float64) for m in layers]
        token_mask: list[Tensor | None] = [None]

        def hook(i: int) -> Any:
            def fn(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
                inp = inputs[0].detach()
                mask = token_mask[0]
                if mask is not None and inp.dim() == 3 and inp.shape[0] == mask.shape[0]:
                    x = inp[mask[:, : inp.shape[1]].bool()].float()
                else:
                    x = inp.reshape(-1, inp.shape[-1]).float()
                covs[i] += (x.t() @ x).double()

            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
        was_training = self.training
        self.eval()
        try:
            for b, (x, _) in enumerate(ctx.statistics_batches()):
                if self.icfg.max_batches is not None and b >= self.icfg.max_batches:
                    break
                token_mask[0] = x.get("attention_mask") if isinstance(x, dict) else None
                self.features(x)
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        return [ctx.all_reduce(c) for c in covs]

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        covs = self.input_covariances(ctx)
        for layer, cov in zip(self.layers(), covs):
            a = down_projection(cov, layer.memory, self.icfg.rank) / math.sqrt(3.0)
            layer.begin(a)
        self.num_tasks += 1

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        layers = self.layers()
        for layer in layers:
            layer.freeze()
        covs = self.input_covariances(ctx)  # with the trained update, as the official code
        th = self.threshold(ctx.task, ctx.num_tasks)
        for layer, cov in zip(layers, covs):
            layer.memory = gpm_update(layer.memory, cov, th, first=ctx.task == 0).to(layer.memory)
        dims = [int(layer.memory.shape[1]) for layer in layers]
        return {
            "threshold": round(th, 6),
            "ranks": [layer.task_ranks[-1] for layer in layers],
            "memory_dims": dims,
            "input_dim": layers[0].in_features,
        }

    def export_backbone(self) -> nn.Module:
        return self._plain_copy(fold=True)

    def _plain_copy(self, fold: bool) -> nn.Module:
        """A copy of the backbone with plain ``nn.Linear`` layers holding ``W0`` (+ the learned update if ``fold``)."""
        plain = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, layer in zip(self._layer_names, self.layers()):
                copied = plain.get_submodule(name)
                assert isinstance(copied, InfLoRALinear)
                base = copied.base
                if fold:
                    base.weight.add_(layer.delta_weight().to(base.weight))
                replace_submodule(plain, name, base)
        return plain

    def low_rank_update(self) -> LowRankUpdate:
        factors = {}
        for name, layer in zip(self._layer_names, self.layers()):
            f = layer.lora_factors()
            if f is not None:
                factors[name] = f
        return LowRankUpdate(base=self._plain_copy(fold=False), factors=factors)

    def parameter_counts(self) -> dict[str, int]:
        """``stored`` counts the head, every task's A and B and the input-subspace memory (which InfLoRA keeps
        across tasks; SD-LoRA's Table 5 lists it as "stored features")."""
        counts = super().parameter_counts()
        for layer in self.layers():
            tensors = [layer.A_frozen, layer.A_cur, layer.memory, *layer.B_cur.values()]
            tensors += [layer.b_frozen(s) for s, _, _ in layer.slices]
            counts["stored"] += sum(int(t.numel()) for t in tensors)
        return counts

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        layers_meta = []
        for name, layer in zip(self._layer_names, self.layers()):
            tensors[f"inflora.{name}.A_frozen"] = layer.A_frozen
            tensors[f"inflora.{name}.memory"] = layer.memory
            for s, _, _ in layer.slices:
                tensors[f"inflora.{name}.B_frozen_{s}"] = layer.b_frozen(s)
            if layer.in_task:
                tensors[f"inflora.{name}.A_cur"] = layer.A_cur
                for s, p in layer.B_cur.items():
                    tensors[f"inflora.{name}.B_cur_{s}"] = p
            layers_meta.append({"name": name, "task_ranks": list(layer.task_ranks), "in_task": layer.in_task})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta["inflora"] = {"num_tasks": self.num_tasks, "layers": layers_meta}
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        saved = meta["inflora"]
        names = [m["name"] for m in saved["layers"]]
        if names != self._layer_names:
            raise ValueError(
                f"inflora state was saved for layers {names[:3]}..., this backbone has {self._layer_names[:3]}..."
            )
        for layer, m in zip(self.layers(), saved["layers"]):
            key = f"inflora.{m['name']}"
            layer.A_frozen = tensors[f"{key}.A_frozen"].to(layer.A_frozen)
            layer.memory = tensors[f"{key}.memory"].to(layer.memory)
            for s, _, _ in layer.slices:
                setattr(layer, f"B_frozen_{s}", tensors[f"{key}.B_frozen_{s}"].to(layer.A_frozen))
            layer.task_ranks = []
            layer.B_cur = nn.ParameterDict()
            if m["in_task"]:
                layer.begin(tensors[f"{key}.A_cur"])
                for s, p in layer.B_cur.items():
                    p.copy_(tensors[f"{key}.B_cur_{s}"])
            layer.task_ranks = list(m["task_ranks"])
        self.num_tasks = int(saved["num_tasks"])
