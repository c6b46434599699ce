"""A calibrated head for methods that adapt the backbone: class statistics that follow the backbone across tasks
(drift compensation) and heads fitted on them (cosine nearest class mean, ridge regression). No input of an
earlier task is kept: per class only a count, a mean and (for the heads that need it) a covariance.

Why. SD-LoRA's loss after the first task covers the current task's logits only, so its linear head blocks are
never calibrated against each other (docs/method.md, "When SD-LoRA helps"). A head computed from per-class
statistics compares every class with every other by construction; but the statistics of an old class were taken
with the backbone of its task, and the backbone keeps changing (every task adds a component, and the official
protocol renormalises components and re-creates magnitudes when the next task starts). So the stored statistics
are moved with the backbone: the current task's training data (with evaluation transforms) is passed through the
model *before* the task (before ``begin_task``'s protocol transition, i.e. the function evaluated after the
previous task) and *after* it (the function evaluated now), and the drift estimated from these pairs is applied
to every stored class:

* ``drift: linear`` -- an affine map ``f_after ~ f_before A + b`` fitted in closed form by least squares with a
  ridge towards the identity (``A = I, b = 0`` when the data say nothing); means move exactly as
  ``mu A + b`` and covariances as ``A^T S A``. This is the closed-form counterpart of the learned linear drift
  compensation of LDC (Gomez-Villa et al., ECCV 2024).
* ``drift: sdc`` -- semantic drift compensation (Yu et al., CVPR 2020): each class mean moves by the average
  drift ``f_after - f_before`` of the current samples, weighted by a Gaussian kernel of their distance (before)
  to that mean; covariances do not change. Distances are measured in units of the mean feature norm, so the
  kernel width ``sdc_sigma`` (SDC: 0.3 on unit-norm embeddings) does not depend on the backbone's feature scale.

Heads (``head``):

* ``ncm`` -- cosine similarity to each class mean (SimpleCIL's classifier, on the adapted features).
* ``ridge`` with ``projection_dim: 0`` -- ridge regression of one-hot targets on ``[f, 1]``; its normal
  equations need ``G = sum f f^T`` and ``C = sum f y^T``, which are functions of per-class counts, means and the
  pooled within-class scatter, so they transform *exactly* under the linear drift map (``covariance: shared``
  keeps just that: d values per class plus one d x d matrix).
* ``ridge`` with ``projection_dim: M`` -- RanPAC's head (``methods/ranpac.py``: ``ReLU(f P)``, ``P`` d x M
  standard normal, closed-form ridge). The Gram matrix of a nonlinear projection cannot be moved with the
  features, so it is rebuilt after every task from Gaussian samples of the compensated class statistics
  (``samples_per_class`` per class, weighted to each class's count), as classifier alignment samples them.

Inputs of the head (``features``):

* ``adapted`` -- the method's own (adapted) features ``v``, as above.
* ``both`` -- the pretrained backbone's frozen features ``u`` beside the adapted ones (APER's concatenation of the
  pre-trained and the adapted model's embeddings; Zhou et al., IJCV 2024): the head sees ``[h, u, v]`` with
  ``h = ReLU(u P)`` RanPAC's random features of the *frozen* block when ``projection_dim`` is M > 0 (nothing
  when 0). The frozen block never drifts, so its statistics (and those of ``h``, which a nonlinear projection
  of drifting features could not keep) are exact sums; drift compensation moves only the adapted block ``v``,
  and with a pooled scatter (``covariance: shared``, required) the ridge's normal equations still move exactly.
  Each block is scaled to the same mean second moment before the relative ridge, so no block dominates by its
  scale, and the adapted block then by ``adapted_weight`` (its statistics are drift estimates, the others
  exact). The price: a second forward pass (the frozen backbone) per prediction and a copy of its weights in
  memory.

``ridge`` is relative: lambda = ``ridge`` x the mean diagonal entry of G, so one value fits backbones with
different feature scales. Everything here is a deviation from the SD-LoRA paper, off by default
(``method.calib``) and in every paper preset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .alignment import FeatureStatistics, symmetrised

__all__ = [
    "CalibConfig",
    "block_scales",
    "CalibratedHead",
    "calibrated_variant",
    "compensate_statistics",
    "gaussian_ridge_statistics",
    "linear_drift",
    "linear_drift_from_moments",
    "moment_ridge_statistics",
    "ridge_solve",
    "sdc_drift",
]


@dataclass
class CalibConfig:
    """The calibrated head and drift compensation (``method.calib``); off by default and in every paper preset.

    Attributes:
        head: ``linear`` (the trained ``IncrementalLinear`` head, as the paper), ``ncm`` (cosine to the class
            means) or ``ridge`` (ridge regression on the class statistics, see the module docstring).
        drift: compensation of stored class statistics for the backbone's change during each task: ``none``,
            ``linear`` (closed-form affine map) or ``sdc`` (kernel-weighted mean drift). Also applies to the
            statistics of classifier alignment (``method.align``) when that is on.
        covariance: what is kept beyond each class's count and mean: ``shared`` (one pooled within-class
            d x d matrix: all the linear ridge head needs), ``full`` (one d x d matrix per class, for the
            Gaussians of the projected ridge head), ``diagonal`` (d variances per class). ``ncm`` uses only the
            means.
        drift_ridge: ridge of the linear drift map towards the identity, relative to the mean eigenvalue of the
            before-features' second-moment matrix.
        sdc_sigma: SDC kernel width, in units of the mean feature norm of the before-features.
        projection_dim: ``ridge`` head: 0 for a ridge on the features themselves, M > 0 for RanPAC's random
            projection ``ReLU(f P)`` to M dimensions.
        ridge: the ridge parameter, relative to the mean diagonal entry of the Gram matrix.
        samples_per_class: ``ridge`` with a projection: Gaussian samples per class that build its Gram matrix.
        shrinkage: covariance shrinkage towards a scaled identity for those samples (as ``method.align``).
        features: what the head sees: ``adapted`` (the method's features) or ``both`` (the frozen pretrained
            backbone's features beside them, with ``projection_dim`` then projecting the frozen block exactly;
            needs ``covariance: shared``; see the module docstring).
        adapted_weight: ``features: both``: the adapted block's scale relative to the frozen blocks' (each block
            first scaled to one mean second moment), i.e. a ridge ``1 / adapted_weight^2`` times stronger on it.
            Its statistics are estimates (moved by the drift map) where the frozen blocks' are exact sums; 0.5
            measured best with compensated statistics and 1 with exact ones (docs/method.md).
    """

    head: Literal["linear", "ncm", "ridge"] = "linear"
    drift: Literal["none", "linear", "sdc"] = "none"
    covariance: Literal["full", "diagonal", "shared"] = "shared"
    drift_ridge: float = 1e-2
    sdc_sigma: float = 0.3
    projection_dim: int = 0
    ridge: float = 0.1
    samples_per_class: int = 256
    shrinkage: float = 0.0
    features: Literal["adapted", "both"] = "adapted"
    adapted_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.features == "both" and (self.head != "ridge" or self.covariance != "shared"):
            raise ValueError(
                "features: both needs head: ridge and covariance: shared (the statistics of the frozen block and its "
                f"projection are kept as one pooled scatter), got head: {self.head}, covariance: {self.covariance}"
            )
        for name in ("drift_ridge", "sdc_sigma", "ridge", "adapted_weight"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: ridge on the features), got {self.projection_dim}")
        if self.samples_per_class < 2:
            raise ValueError(f"samples_per_class must be >= 2, got {self.samples_per_class}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")

    @property
    def active(self) -> bool:
        """Whether anything here deviates from the paper (a head other than the trained one, or drift)."""
        return self.head != "linear" or self.drift != "none"


def calibrated_variant(cfg: CalibConfig) -> CalibConfig:
    """The configuration of the registry entries ``sdlora_calib`` and ``seq_lora_calib``: ``cfg`` with the head,
    its inputs and the drift compensation that measured best across the scenarios here (docs/method.md, "A
    calibrated head"): a ridge head on ``[ReLU(u P), u, v]`` (frozen features u projected to
    ``projection_dim`` dimensions, 4,096 unless given, and the adapted features v), v's statistics moved by the
    linear drift map. The other ``method.calib`` keys (the ridges, ``drift_ridge``) stay as given."""
    m = cfg.projection_dim or 4096
    return dataclasses.replace(
        cfg, head="ridge", drift="linear", features="both", covariance="shared", projection_dim=m
    )


# ------------------------------------------------------------------------------------------------ drift
def linear_drift(before: Tensor, after: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The affine map ``after ~ before A + b`` by ridge least squares towards ``A = I, b = 0`` (float64); see
    :func:`linear_drift_from_moments`, fed with this one process's samples.

    Returns:
        ``A`` (d, d) and ``b`` (d,).
    """
    if before.shape != after.shape or before.dim() != 2:
        raise ValueError(f"before and after must be two (samples, d) tensors, got {before.shape} and {after.shape}")
    xa = torch.cat([before.double(), before.new_ones(before.shape[0], 1, dtype=torch.float64)], 1)
    return linear_drift_from_moments(xa.t() @ xa, xa.t() @ after.double(), ridge)


def linear_drift_from_moments(xtx: Tensor, xty: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The ridge least-squares affine map from the moments of ``Xa = [X, 1]``: ``xtx = Xa^T Xa`` ((d+1)^2),
    ``xty = Xa^T Y`` ((d+1) x d); sums over samples, so shards of several processes add up.

    Minimises ``||Xa P - Y||^2 + lam ||P - [I; 0]||^2`` with ``lam = ridge * tr(X^T X) / d``:
    ``P = (Xa^T Xa + lam I)^{-1} (Xa^T Y + lam [I; 0])``. The ridge pulls towards no drift, not towards zero:
    with few samples (or directions the current task never excites) the stored statistics are left in place.
    """
    d = xty.shape[1]
    xtx, xty = xtx.double(), xty.double()
    lam = ridge * float(torch.diagonal(xtx)[:d].sum()) / d
    eye = torch.eye(d + 1, dtype=torch.float64, device=xtx.device)
    p = torch.linalg.solve(xtx + lam * eye, xty + lam * eye[:, :d])
    return p[:d], p[d]


def sdc_drift(before: Tensor, after: Tensor, means: Tensor, sigma: float) -> Tensor:
    """SDC: per class mean ``mu_c``, ``sum_i w_ic (after_i - before_i) / sum_i w_ic`` with
    ``w_ic = exp(-||before_i - mu_c||^2 / (2 (sigma s)^2))``, ``s`` the mean norm of ``before`` (float64).

    The weights are normalised per class in log space (a softmax over samples), so a class far from every
    current sample still gets the drift of its nearest samples instead of 0/0.

    Returns:
        (classes, d) mean shifts.
    """
    x, y, mu = before.double(), after.double(), means.double().to(before.device)
    scale = float(x.norm(dim=1).mean()) * sigma
    dist2 = torch.cdist(mu, x).square()  # (classes, samples)
    w = torch.softmax(-dist2 / (2 * scale * scale), dim=1)
    return w @ (y - x)


def apply_linear_drift(stats: FeatureStatistics, a: Tensor, b: Tensor) -> None:
    """Move every stored class through ``f -> f A + b``: means exactly, covariances as ``A^T S A`` (for
    ``diagonal``, the diagonal of that product: the map mixes dimensions, so this part is approximate).

    When the statistics are wider than ``A`` (``features: both``), only their last ``A.shape[0]`` columns (the
    adapted block) drift; the columns before them (frozen features and their projection) stay. With the pooled
    scatter ``S`` that is ``M^T S M`` for ``M = diag(I, A)``, computed by blocks.
    """
    a = a.double().cpu()
    b = b.double().cpu()
    start = stats.d - a.shape[0]
    if start:
        if stats.covariance != "shared":
            raise ValueError("drift of an adapted block inside wider statistics needs covariance: shared")
        means = stats.means.double()
        means[:, start:] = means[:, start:] @ a + b
        stats.means = means.float()
        s = stats.covs.double().clone()
        s[:, start:] = s[:, start:] @ a  # S M
        s[start:, :] = a.t() @ s[start:, :]  # M^T (S M)
        stats.covs = symmetrised(s)
        return
    stats.means = (stats.means.double() @ a + b).float()
    if stats.covariance == "shared":
        stats.covs = symmetrised(a.t() @ stats.covs @ a)
    elif stats.covariance == "full":
        stats.covs = torch.einsum("ji,cjk,kl->cil", a, stats.covs.double(), a).float()
    else:  # diag(A^T diag(v) A)_i = sum_j A_ji^2 v_j
        stats.covs = (stats.covs.double() @ (a * a)).float()


def apply_mean_shift(stats: FeatureStatistics, shifts: Tensor) -> None:
    """Move each stored class mean by its shift (SDC); covariances are unchanged by a translation. Shifts
    narrower than the statistics move their last columns (the adapted block of ``features: both``)."""
    means = stats.means.double()
    means[:, stats.d - shifts.shape[1] :] += shifts.double().cpu()
    stats.means = means.float()


# ------------------------------------------------------------------------------------------ ridge statistics
def moment_ridge_statistics(stats: FeatureStatistics) -> tuple[Tensor, Tensor]:
    """``G = sum_n z_n z_n^T`` and ``C = sum_n z_n y_n^T`` over every sample the statistics describe, with
    ``z = [f, 1]`` and one-hot ``y``, from counts, means and covariances alone (float64).

    ``sum_n f f^T = scatter + sum_c n_c mu_c mu_c^T`` (scatter: the within-class scatter, pooled or per class),
    ``sum_n f = sum_c n_c mu_c``, ``C[:, c] = n_c [mu_c, 1]``. With ``diagonal`` covariances the scatter is
    their diagonal.
    """
    n = stats.counts.double()
    mu = stats.means.double()
    d = stats.d
    if stats.covariance == "shared":
        scatter = stats.covs.double()
    elif stats.covariance == "full":
        scatter = torch.einsum("c,cij->ij", n - 1, stats.covs.double())
    else:
        scatter = torch.diag(((n - 1)[:, None] * stats.covs.double()).sum(0))
    za = torch.cat([mu, torch.ones(len(n), 1, dtype=torch.float64)], 1)  # per-class [mu, 1]
    g = za.t() @ (n[:, None] * za)
    g[:d, :d] += scatter
    c = (za * n[:, None]).t()
    return g, c


def gaussian_ridge_statistics(
    stats: FeatureStatistics, projection: Tensor, per_class: int, shrinkage: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``G`` and ``C`` of RanPAC's features ``h = ReLU(f P)`` over ``per_class`` Gaussian samples per class drawn
    from the stored (compensated) statistics, each class weighted to its count (float64)."""
    factors = stats.sampling_factors(shrinkage)
    p = projection.double().cpu()
    m = p.shape[1]
    k = stats.num_classes
    g = torch.zeros(m, m, dtype=torch.float64)
    c = torch.zeros(m, k, dtype=torch.float64)
    for cls, factor in enumerate(factors):
        z = torch.randn(per_class, stats.d, generator=generator, dtype=torch.float64)
        x = stats.means[cls].double() + (z * factor if factor.dim() == 1 else z @ factor.t())
        h = torch.relu(x @ p)
        w = float(stats.counts[cls]) / per_class
        g += w * (h.t() @ h)
        c[:, cls] = w * h.sum(0)
    return g, c


def ridge_solve(g: Tensor, c: Tensor, ridge: float) -> Tensor:
    """``(G + ridge I)^{-1} C`` in float64: Cholesky when G + ridge I is numerically positive definite, else LU.
    (RanPAC's solve; ``methods/ranpac.py`` uses it from here.)

    Raises:
        torch.linalg.LinAlgError: the system is singular even for LU.
    """
    a = g.double() + ridge * torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(c.double(), chol)
    return torch.linalg.solve(a, c.double())


def relative_ridge_solve(g: Tensor, c: Tensor, ridge: float) -> Tensor:
    """``(G + lam I)^{-1} C`` with ``lam = ridge * tr(G) / dim``."""
    lam = ridge * float(torch.diagonal(g).mean())
    return ridge_solve(g, c, max(lam, 1e-12))


# ------------------------------------------------------------------------------------------------ the head
class CalibratedHead:
    """Class statistics that follow the backbone, and the head fitted on them.

    Lifecycle per task (driven by ``Method.after_task``): :func:`compensate_statistics` moves the old classes,
    ``stats.add_classes`` adds the new ones (on :meth:`inputs`), ``fit(seed, task)`` solves the head;
    ``logits(inputs(...))`` then scores all seen classes. ``tensors()``/``load()`` hold the exact state for
    checkpoints: counts, means, covariances, the random projection and the fitted weights, nothing per sample.
    """

    def __init__(self, cfg: CalibConfig, num_features: int) -> None:
        self.cfg = cfg
        self.num_features = num_features
        dim = cfg.projection_dim + 2 * num_features if self.uses_frozen_features else num_features
        self.stats = FeatureStatistics(dim, cfg.covariance)
        # RanPAC's P (d x M, standard normal), drawn from the run's seed (not from the global generator, which
        # would change the training that follows) and saved with the state: at the first fit for the Gaussian
        # head on adapted features, before the first statistics for ``features: both``.
        self.projection = torch.zeros(num_features, 0)
        self.weight = torch.zeros(0, 0, dtype=torch.float32)  # (dim, classes) of the ridge head

    @property
    def num_classes(self) -> int:
        return self.stats.num_classes

    @property
    def uses_frozen_features(self) -> bool:
        """Whether :meth:`inputs` needs the frozen backbone's features (``features: both``)."""
        return self.cfg.features == "both"

    def numel(self) -> int:
        return self.stats.numel() + int(self.projection.numel()) + int(self.weight.numel())

    def ensure_projection(self, seed: int) -> None:
        """Draw ``P`` from ``seed`` unless it is there (a resumed run loads it)."""
        m = self.cfg.projection_dim
        if m and self.projection.shape[1] != m:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + 101) % (2**63 - 1))
            self.projection = torch.randn(self.num_features, m, generator=gen)

    def inputs(self, adapted: Tensor, frozen: Tensor | None = None) -> Tensor:
        """What the statistics and the head see: ``adapted`` itself, or ``[ReLU(u P), u, v]`` for ``features:
        both`` (``u = frozen``, ``v = adapted``; no projection block with ``projection_dim: 0``).

        Raises:
            ValueError: ``features: both`` without the frozen features, or before the projection was drawn.
        """
        if not self.uses_frozen_features:
            return adapted
        if frozen is None:
            raise ValueError("method.calib.features: both needs the frozen backbone's features")
        m = self.cfg.projection_dim
        blocks = [frozen.to(adapted.dtype), adapted]
        if m:
            if self.projection.shape[1] != m:
                raise ValueError("the calibrated head's projection has not been drawn yet (ensure_projection)")
            p = self.projection.to(device=frozen.device, dtype=adapted.dtype)
            blocks.insert(0, torch.relu(blocks[0] @ p))
        return torch.cat(blocks, 1)

    def _blocks(self) -> list[tuple[int, int, float]]:
        """Column ranges of the input blocks and their relative weights (one block unless ``features: both``)."""
        if not self.uses_frozen_features:
            return [(0, self.stats.d, 1.0)]
        m, d = self.cfg.projection_dim, self.num_features
        frozen = ([(0, m, 1.0)] if m else []) + [(m, m + d, 1.0)]
        return [*frozen, (m + d, m + 2 * d, self.cfg.adapted_weight)]

    def fit(self, seed: int, task: int) -> None:
        """Solve the ridge head on the current statistics (nothing to fit for ``ncm``)."""
        if self.cfg.head != "ridge":
            return
        m = self.cfg.projection_dim
        if m == 0 or self.uses_frozen_features:
            g, c = moment_ridge_statistics(self.stats)
        else:
            self.ensure_projection(seed)
            gen = torch.Generator().manual_seed((seed * 1_000_003 + task * 7_919 + 29) % (2**63 - 1))
            g, c = gaussian_ridge_statistics(
                self.stats, self.projection, self.cfg.samples_per_class, self.cfg.shrinkage, gen
            )
        scale = block_scales(g, self._blocks())
        w = relative_ridge_solve(scale[:, None] * g * scale[None, :], scale[:, None] * c, self.cfg.ridge)
        # The solve saw the inputs scaled by ``scale``; fold it into the weights so that logits take the inputs as
        # they are: [z, 1] (scale w) == ([z, 1] scale) w.
        self.weight = (scale[:, None] * w).float()

    def logits(self, z: Tensor) -> Tensor:
        """Scores over all seen classes (float32) of :meth:`inputs`: cosines for ``ncm``, ridge outputs for
        ``ridge``."""
        z = z.float()
        if self.cfg.head == "ncm":
            means = self.stats.means.to(z.device)
            return F.normalize(z, dim=-1) @ F.normalize(means, dim=-1).t()
        w = self.weight.to(z.device)
        if self.cfg.projection_dim and not self.uses_frozen_features:
            return torch.relu(z @ self.projection.to(z.device)) @ w
        return z @ w[:-1] + w[-1]

    def linear_map(self) -> tuple[Tensor, Tensor] | None:
        """``(weight, bias)`` with ``logits(f) == f @ weight.T + bias`` when the head is linear in the adapted
        features ``f`` alone."""
        if self.cfg.head == "ridge" and self.cfg.projection_dim == 0 and not self.uses_frozen_features:
            return self.weight[:-1].t().contiguous(), self.weight[-1].contiguous()
        return None

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = self.stats.tensors(prefix)
        out[f"{prefix}projection"] = self.projection.contiguous()
        out[f"{prefix}weight"] = self.weight.contiguous()
        return out

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        """Restore from ``tensors(prefix)``.

        Raises:
            ValueError: no projection, a projection of another width (checked first: the statistics' width
                follows from it) or statistics that do not fit.
        """
        proj = tensors.get(f"{prefix}projection")
        if proj is None:
            raise ValueError(f"checkpoint has no calibrated head projection ({prefix}projection)")
        if proj.shape[0] != self.num_features or proj.shape[1] not in (0, self.cfg.projection_dim):
            raise ValueError(
                f"calibrated head projection {tuple(proj.shape)} does not fit {self.num_features} features and "
                f"method.calib.projection_dim {self.cfg.projection_dim}; a run saved by a version with another "
                f"default loads with method.calib.projection_dim: {proj.shape[1]} in its config.yaml"
            )
        self.stats.load(tensors, prefix)
        self.projection = proj.float().clone()
        self.weight = tensors[f"{prefix}weight"].float().clone()


def block_scales(g: Tensor, blocks: list[tuple[int, int, float]]) -> Tensor:
    """Per-column factors of ``[z, 1]`` that give every block ``(start, stop, weight)`` of ``z`` the mean second
    moment ``weight^2`` (the mean of its diagonal of ``G = sum [z,1][z,1]^T``, relative to the sample count); all
    ones for one block. Blocks of different scales (raw features beside ReLU random features) then share one
    relative ridge as the weights say, not as their units happen to be."""
    scale = torch.ones(g.shape[0], dtype=torch.float64, device=g.device)
    if len(blocks) < 2:
        return scale
    n = float(g[-1, -1])
    for lo, hi, weight in blocks:
        second = float(torch.diagonal(g)[lo:hi].mean()) / max(n, 1.0)
        if second > 0:
            scale[lo:hi] = weight * second**-0.5
    return scale


def compensate_statistics(
    stores: list[FeatureStatistics],
    cfg: CalibConfig,
    before: Tensor,
    after: Tensor,
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, float]:
    """Move every store's classes by the drift ``cfg.drift`` estimated from ``before``/``after``: the same samples
    (this process's shard of the current task) through the model before and after the task. ``before``/``after``
    are the adapted features; a store wider than them (``features: both``) moves only its last columns.

    ``linear``: the map's moments are summed over processes (``all_reduce``), so every process applies the same
    map. ``sdc`` needs every sample's kernel weight normalised over all samples: single process only.

    Returns:
        ``{"drift_mean_shift": mean norm of the applied mean shifts, "drift_samples": samples used}``.

    Raises:
        RuntimeError: ``sdc`` with more than one process.
    """
    if cfg.drift == "none" or not any(s.num_classes for s in stores):
        return {}
    n = all_reduce(torch.tensor([float(before.shape[0]), 1.0], dtype=torch.float64, device=before.device))
    if cfg.drift == "sdc" and float(n[1]) > 1:
        raise RuntimeError("method.calib.drift: sdc runs in a single process; use drift: linear under torchrun")
    old = [s.means.double().clone() for s in stores]
    if cfg.drift == "linear":
        xa = torch.cat([before.double(), before.new_ones(before.shape[0], 1, dtype=torch.float64)], 1)
        a, b = linear_drift_from_moments(all_reduce(xa.t() @ xa), all_reduce(xa.t() @ after.double()), cfg.drift_ridge)
        for s in stores:
            apply_linear_drift(s, a, b)
    else:
        for s in stores:
            if s.num_classes:
                adapted = s.means[:, s.d - before.shape[1] :]
                apply_mean_shift(s, sdc_drift(before, after, adapted, cfg.sdc_sigma))
    shifts = torch.cat([(s.means.double() - o).norm(dim=1) for s, o in zip(stores, old) if s.num_classes])
    return {"drift_mean_shift": round(float(shifts.mean()), 6), "drift_samples": int(n[0])}
