"""RanPAC (McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel, "RanPAC: Random Projections and Pre-trained
Models for Continual Learning", NeurIPS 2023) in the sdlora engine.

The backbone stays frozen (optionally after adapting it on the first task only, "Phase 1"). Each pooled feature f
(d) goes through a frozen random projection with a ReLU, ``h = ReLU(f W)`` with ``W`` (d x M) standard normal
(paper Sec. 4.2, M = 10,000), and classes are predicted by a ridge-regression head on h, solved in closed form
from second-order statistics accumulated over the tasks (paper Sec. 4.3, Eq. 3)::

    G = sum_n h_n h_n^T   (M x M),   C = sum_n h_n y_n^T   (M x classes, y one-hot)
    W_o = (G + lambda I)^{-1} C,     logits = h W_o

G and C are sums over samples, so after task t they hold every sample seen so far and the head equals the ridge
solution on all data seen so far, without keeping any image or feature. They are accumulated in float64 and
summed over processes under torchrun.

lambda is chosen from a grid (10^-8 ... 10^8, the official code's) by fitting on part of a task's training data
and measuring the squared error of the one-hot targets on the held-out rest (default 20%). ``ridge_selection``:
``first_task`` selects once, on the first task, and keeps that lambda; ``every_task`` re-selects it on each task's
data, as the official code (``RanPAC.py``, ``optimise_ridge_parameter``) does. The held-out samples are those whose
input tensor hashes into the held-out fraction: the split does not depend on batch size, data order or the number
of processes.

Phase 1 (``adapt_first_task``): a plain LoRA (``method.adapter``: rank, targets) and a linear head over the first
task's classes are trained with the engine's optimiser on the first task, the LoRA is merged into the backbone and
the head is discarded; then as above. The paper's Phase 1 uses AdaptFormer adapters, SSF or VPT instead of LoRA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import pack_symmetric, unpack_symmetric
from ..backbones import Backbone
from ..calibration import ridge_solve
from ..config import MethodConfig
from ..data import Batch
from ..lora import SDLoRAModel
from .base import Method, TaskContext, register_method
from .baselines import plain_lora_config

__all__ = ["RanPAC", "RanPACOptions", "holdout_mask", "pack_symmetric", "ridge_solve", "unpack_symmetric"]

log = logging.getLogger(__name__)

# Prime modulus and multiplier of the input hash (Lehmer/Park-Miller); see holdout_mask.
_P = 2_147_483_647
_MIX = 48_271


@dataclass
class RanPACOptions:
    """RanPAC options (``method.options`` of ``ranpac``).

    Attributes:
        projection_dim: M, the width of the random projection (paper: 10,000). 0: no projection, the ridge head
            works on the features themselves (the paper's "no RP" ablation).
        ridges: candidate ridge parameters lambda (default 10^-8 ... 10^8, the official code's grid).
        ridge_selection: ``first_task`` (select once on the first task) or ``every_task`` (re-select on each
            task's data, as the official code).
        ridge: a fixed lambda instead of selecting one (``ridges`` and ``ridge_selection`` are then unused).
        holdout: share of a task's training samples held out to select lambda (official code: 0.2).
        adapt_first_task: Phase 1: train a plain LoRA (``method.adapter``) and a linear head on the first task,
            merge the LoRA into the backbone, discard the head.
    """

    projection_dim: int = 10_000
    ridges: list[float] = field(default_factory=lambda: [10.0**e for e in range(-8, 9)])
    ridge_selection: Literal["first_task", "every_task"] = "first_task"
    ridge: float | None = None
    holdout: float = 0.2
    adapt_first_task: bool = False

    def __post_init__(self) -> None:
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {self.projection_dim}")
        if not self.ridges or any(not (r > 0 and math.isfinite(r)) for r in self.ridges):
            raise ValueError(f"ridges must be a non-empty list of positive numbers, got {self.ridges}")
        if self.ridge is not None and not (self.ridge > 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a positive number or null, got {self.ridge}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


_COEFFS: dict[tuple[int, str], Tensor] = {}


def _hash_coefficients(n: int, device: torch.device) -> Tensor:
    key = (n, str(device))
    if key not in _COEFFS:
        gen = torch.Generator().manual_seed(20231210)
        _COEFFS[key] = torch.randint(1, 1 << 12, (n,), generator=gen, dtype=torch.int64).to(device)
    return _COEFFS[key]


def _hash_rows(t: Tensor, chunk: int) -> Tensor:
    """Per-row hash in [0, P) of a tensor's bytes (see :func:`holdout_mask`)."""
    b = t.shape[0]
    flat = t.detach().contiguous().reshape(b, -1)
    four = flat.element_size() == 4 or (flat.element_size() < 4 and (flat.shape[1] * flat.element_size()) % 4 == 0)
    words = flat.view(torch.int32) if four else flat.view(torch.uint8)
    n = words.shape[1]
    coeff = _hash_coefficients(n, words.device)
    h = torch.zeros(b, dtype=torch.int64, device=words.device)
    for i in range(0, n, chunk):
        w = words[:, i : i + chunk].to(torch.int64) % _P  # non-negative, < 2^31
        h = (h + (w * coeff[i : i + chunk]).sum(1)) % _P
    return h


def holdout_mask(x: Tensor | Mapping[str, Tensor], fraction: float, chunk: int = 16_384) -> Tensor:
    """Which samples of the batch ``x`` (a tensor, or a dict of tensors such as token ids) are held out: a hash of
    each sample's bytes falls below ``fraction``.

    The hash is ``sum_j (w_j mod P) * c_j mod P`` over the sample's 32-bit words ``w_j`` (bytes for other element
    sizes), with fixed pseudo-random coefficients ``c_j < 2^12`` and P = 2^31 - 1, then one Lehmer step (a dict's
    tensors are combined in key order). Exact integer arithmetic (terms < 2^43, reduced mod P after every chunk of
    words), so the result does not depend on summation order or device: a sample is held out or not whatever its
    batch, position or process.
    """
    tensors = [x[k] for k in sorted(x)] if isinstance(x, Mapping) else [x]
    h = torch.zeros(tensors[0].shape[0], dtype=torch.int64, device=tensors[0].device)
    for t in tensors:
        h = (h * _MIX + _hash_rows(t, chunk)) % _P
    h = (h * _MIX) % _P
    return (h % 1_000_000) < int(round(fraction * 1_000_000))


@register_method("ranpac")
class RanPAC(Method):
    """RanPAC: frozen random projection + closed-form ridge head (see the module docstring).

    Buffers: ``projection`` (d x M, float32, drawn once from the seeded global generator and saved in every
    checkpoint), ``gram`` (M x M) and ``targets`` (M x classes) float64 statistics, ``weight`` (classes x M)
    the current head. ``trainable_parameters`` is empty except while adapting on the first task.
    """

    options_class = RanPACOptions
    uses_head = False  # prediction is the closed-form ridge head over random features, not self.head
    projection: Tensor
    gram: Tensor
    targets: Tensor
    weight: Tensor

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        o: RanPACOptions = self.options
        self.model.requires_grad_(False)
        self.default_targets = list(backbone.lora_targets)
        ref = next(self.model.parameters())
        d = backbone.num_features
        m = o.projection_dim or d
        self.dim = m
        if o.projection_dim:
            # Paper Sec. 4.2: W ~ N(0, 1) elementwise, frozen for the whole sequence.
            proj = torch.randn(d, m, dtype=torch.float32).to(ref.device)
        else:
            proj = torch.zeros(d, 0, device=ref.device)
        self.register_buffer("projection", proj)
        # Allocated at the first statistics (M x M float64 is 800 MB at M = 10,000).
        self.register_buffer("gram", torch.zeros(0, 0, dtype=torch.float64, device=ref.device))
        self.register_buffer("targets", torch.zeros(m, 0, dtype=torch.float64, device=ref.device))
        self.register_buffer("weight", torch.zeros(0, m, dtype=torch.float32, device=ref.device))
        self.ridge: float | None = o.ridge
        self.samples = 0
        self.adapting = False
        self.adapted: tuple[dict[str, Tensor], dict[str, Any]] | None = None  # Phase 1 LoRA that was merged

    # ------------------------------------------------------------------------------------------ forward
    def project(self, f: Tensor) -> Tensor:
        """``ReLU(f W)`` (float32), or the features themselves without a projection."""
        if self.projection.shape[1] == 0:
            return f.float()
        return F.relu(f.float() @ self.projection)

    def forward(self, x: Batch) -> Tensor:
        if self.adapting:
            return self.head(self.features(x))
        if self.weight.shape[0] == 0:
            raise RuntimeError("ranpac has no ridge head yet: it is solved at the end of each task")
        f = self.features(x)
        # The ridge head can have large, cancelling weights (small lambda): keep it in float32 under autocast.
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self.project(f) @ self.weight.t()

    def num_seen_classes(self) -> int:
        """Rows of the ridge head (the Phase 1 head, while adapting on the first task)."""
        return int(self.head.num_classes) if self.adapting else int(self.weight.shape[0])

    def classifier(self) -> tuple[Tensor, Tensor] | None:
        """None: the logits are linear in the random features ``ReLU(f W)``, not in the backbone's features."""
        return None

    # ------------------------------------------------------------------------------------- lifecycle
    def begin_task(self, ctx: TaskContext) -> None:
        if self.weight.shape[0] != ctx.class_start:
            raise RuntimeError(
                f"ranpac holds {self.weight.shape[0]} classes but task {ctx.task} starts at {ctx.class_start}"
            )
        if ctx.task == 0 and self.options.adapt_first_task:
            # Phase 1: LoRA and a linear head over the first task's classes train with the engine's optimiser.
            super().begin_task(ctx)
            adapter = SDLoRAModel(
                self.model, plain_lora_config(self.cfg.adapter), default_targets=self.default_targets
            )
            adapter.begin_task()
            self.model = adapter
            self.adapting = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() if self.adapting else []

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.adapting:
            assert isinstance(self.model, SDLoRAModel)
            self.model.end_task()
            self.adapted = self.model.adapter_state()
            self.model = self.model.merge_and_unload()
            self.model.requires_grad_(False)
            self.head = type(self.head)(self.num_features, init=self.cfg.head_init)  # Phase 1 head is discarded
            self.adapting = False
            report["adapted"] = True
        select = self.ridge is None or (self.options.ridge_selection == "every_task" and self.options.ridge is None)
        stats = self._statistics(ctx, with_holdout=select)
        n = int(stats["count"])
        if self.gram.numel() == 0:
            self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=stats["g"].device)
        self.gram += stats["g"]
        self.targets = torch.cat([self.targets, stats["c"]], 1)
        self.samples += n
        if select:
            self.ridge, losses = self._select_ridge(stats, ctx)
            report["ridge_losses"] = [None if not math.isfinite(v) else round(v, 8) for v in losses]
        assert self.ridge is not None
        self.weight = ridge_solve(self.gram, self.targets, self.ridge).t().float().contiguous()
        report.update({"ridge": self.ridge, "ridge_selected": select, "samples": n, "classes": self.weight.shape[0]})
        return report

    def _statistics(self, ctx: TaskContext, with_holdout: bool) -> dict[str, Any]:
        """float64 sums over the task's training data (evaluation transforms), summed over processes.

        Returns ``g`` = H^T H and ``c`` = H^T Y over all samples and ``count``; with ``with_holdout`` also the sums
        ``g_fit``, ``c_fit`` over the samples not held out, the counts ``n_fit``, ``n_val``, and this process's
        held-out projected features ``h_val`` and targets ``y_val`` (kept only until the task's head is solved).
        """
        m, k = self.dim, ctx.num_new
        dev = ctx.device
        g = torch.zeros(m, m, dtype=torch.float64, device=dev)
        c = torch.zeros(m, k, dtype=torch.float64, device=dev)
        g_fit = torch.zeros(m, m, dtype=torch.float64, device=dev) if with_holdout else None
        c_fit = torch.zeros(m, k, dtype=torch.float64, device=dev) if with_holdout else None
        h_val, y_val = [], []
        count = torch.zeros(2, dtype=torch.float64, device=dev)  # all, held out
        was_training = self.training
        self.eval()
        try:
            for x, y in ctx.statistics_batches():
                idx = (y - ctx.class_start).long()
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
                    raise RuntimeError(f"statistics batch has labels outside [{ctx.class_start}, {ctx.class_end})")
                h = self.project(self.features(x)).double()
                onehot = F.one_hot(idx, k).double()
                g += h.t() @ h  # paper Eq. 3 statistics: G = sum h h^T, C = sum h y^T
                c += h.t() @ onehot
                count[0] += len(idx)
                if g_fit is not None and c_fit is not None:
                    held = holdout_mask(x, self.options.holdout)
                    fit = ~held
                    g_fit += h[fit].t() @ h[fit]
                    c_fit += h[fit].t() @ onehot[fit]
                    count[1] += float(held.sum())
                    h_val.append(h[held])
                    y_val.append(onehot[held])
        finally:
            self.train(was_training)
        for t in (g, c, count, g_fit, c_fit):
            if t is not None:
                ctx.all_reduce(t)
        out: dict[str, Any] = {"g": g, "c": c, "count": float(count[0])}
        if with_holdout:
            out.update(
                g_fit=g_fit,
                c_fit=c_fit,
                n_fit=float(count[0] - count[1]),
                n_val=float(count[1]),
                h_val=torch.cat(h_val) if h_val else torch.zeros(0, m, dtype=torch.float64, device=dev),
                y_val=torch.cat(y_val) if y_val else torch.zeros(0, k, dtype=torch.float64, device=dev),
            )
        return out

    def _select_ridge(self, stats: dict[str, Any], ctx: TaskContext) -> tuple[float, list[float]]:
        """The candidate with the least held-out mean squared error of the one-hot targets (fit on the rest)."""
        if stats["n_fit"] == 0 or stats["n_val"] == 0:
            raise RuntimeError(
                f"ranpac: cannot select the ridge parameter on task {ctx.task + 1}: {int(stats['n_fit'])} fit and "
                f"{int(stats['n_val'])} held-out samples; use more training images or set method.options.ridge"
            )
        candidates = list(self.options.ridges)
        sse = torch.full((len(candidates),), float("inf"), dtype=torch.float64, device=ctx.device)
        for i, lam in enumerate(candidates):
            try:
                w = ridge_solve(stats["g_fit"], stats["c_fit"], lam)
            except torch.linalg.LinAlgError:
                continue  # singular at this lambda: not a candidate
            if torch.isfinite(w).all():
                sse[i] = ((stats["h_val"] @ w - stats["y_val"]) ** 2).sum()
        # Held-out errors are sums over this process's held-out samples: add them up over processes.
        sse = ctx.all_reduce(sse)
        losses = (sse / (stats["n_val"] * ctx.num_new)).tolist()
        best = min(range(len(candidates)), key=lambda i: (losses[i], i))
        if not math.isfinite(losses[best]):
            raise RuntimeError("ranpac: every ridge candidate failed (singular or non-finite); check the features")
        log.info(
            "ranpac: ridge %.0e selected on task %d (held-out MSE %.6f)", candidates[best], ctx.task + 1, losses[best]
        )
        return float(candidates[best]), losses

    def export_backbone(self) -> nn.Module:
        """The backbone (after the Phase 1 merge, if any); the projection and ridge head are not part of it."""
        if isinstance(self.model, SDLoRAModel):
            return self.model.merge_and_unload()
        return self.model

    # ---------------------------------------------------------------------------------------- accounting
    def parameter_counts(self) -> dict[str, int]:
        """``stored``: projection, Gram matrix, target sums and ridge head (and the Phase 1 head while adapting)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        stored = sum(int(t.numel()) for t in (self.projection, self.gram, self.targets, self.weight))
        if self.adapting:
            stored += sum(p.numel() for p in self.head.parameters())
        if self.adapted is not None:
            stored += sum(int(t.numel()) for t in self.adapted[0].values())
        return {"trainable": trainable, "stored": stored}

    # -------------------------------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.adapting:
            raise RuntimeError("ranpac state is saved after a task, not while adapting on the first one")
        tensors: dict[str, Tensor] = {
            "ranpac.projection": self.projection,
            "ranpac.gram_upper": pack_symmetric(self.gram),  # G is symmetric: half the checkpoint size
            "ranpac.targets": self.targets,
            "ranpac.weight": self.weight,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta: dict[str, Any] = {"method": self.name, "ranpac": {"ridge": self.ridge, "samples": self.samples}}
        if self.adapted is not None:
            tensors.update({f"adapted.{k}": v for k, v in self.adapted[0].items()})
            meta["ranpac"]["adapted"] = self.adapted[1]
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.name:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r}, not {self.name!r}")
        saved = tensors["ranpac.projection"]
        if saved.shape != self.projection.shape:
            raise ValueError(
                f"ranpac state has a {tuple(saved.shape)} projection, this config builds "
                f"{tuple(self.projection.shape)} (method.options.projection_dim or the backbone differs)"
            )
        dev = self.projection.device
        self.projection = saved.to(dev, torch.float32)
        packed = tensors["ranpac.gram_upper"].to(dev, torch.float64)
        self.gram = unpack_symmetric(packed, self.dim if packed.numel() else 0)
        self.targets = tensors["ranpac.targets"].to(dev, torch.float64)
        self.weight = tensors["ranpac.weight"].to(dev, torch.float32)
        self.ridge = meta["ranpac"]["ridge"]
        self.samples = int(meta["ranpac"]["samples"])
        if "adapted" in meta["ranpac"]:
            adapter = SDLoRAModel(
                self.model, plain_lora_config(self.cfg.adapter), default_targets=self.default_targets
            )
            prefix = "adapted."
            adapter.load_adapter_state(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["ranpac"]["adapted"]
            )
            self.adapted = adapter.adapter_state()
            self.model = adapter.merge_and_unload()
            self.model.requires_grad_(False)
