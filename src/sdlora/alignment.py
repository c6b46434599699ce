"""Classifier alignment: an optional stage after each task that retrains the head on all seen classes from
stored per-class feature statistics (no images).

Method: SLCA (Zhang, Wang, Kang, Chen, Wei, "SLCA: Slow Learner with Classifier Alignment for Continual Learning
on a Pre-trained Model", ICCV 2023) and SLCA++ (arXiv 2408.08295, 2024). After task t the mean and covariance of
the backbone features of each new class are stored; then the whole head is trained for a few epochs on features
drawn from the Gaussians of every class seen so far, with cross-entropy over all of them. This calibrates the
head blocks of different tasks against each other, which the current-task-only loss of SD-LoRA (and of every
method here with ``loss_scope: current``) never does. It is a deviation from the SD-LoRA paper, off unless asked
for (``method.align.enabled`` or the registry entries ``sdlora_ca``, ``seq_lora_ca``).

Facts followed from the SLCA paper and code (GengDavid/SLCA): statistics of a class are computed once, after the
task that introduces it, on its training images with evaluation transforms; alignment runs after every task but
the first; 256 samples per class, fresh each epoch; 5 epochs of SGD (lr 0.01, momentum 0.9, weight decay 5e-4,
cosine schedule); optional logit normalisation (logits divided by the mean over task blocks of each block's logit
norm, then by a temperature, 0.1 in SLCA's configs). Choices made here: a relative covariance shrinkage instead of
a fixed ``1e-4 I``; SLCA's per-task scaling of the class means (0.9 + a decay) is not used; samples come from a
generator seeded by (run seed, task, epoch), so every process under torchrun draws the same samples and trains an
identical head, and a resumed run draws what the uninterrupted one drew.

Memory: ``covariance: full`` keeps one d x d matrix per class (ViT-B: 2.4 MB per class in float32); ``diagonal``
keeps d variances per class; ``shared`` keeps one pooled within-class d x d matrix for all classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.text import Batch
from .heads import IncrementalLinear

__all__ = [
    "AlignConfig",
    "FeatureStatistics",
    "align_head",
    "block_normalised_logits",
    "pack_symmetric",
    "symmetrised",
    "unpack_symmetric",
]


@dataclass
class AlignConfig:
    """Classifier alignment (``method.align``), SLCA's stage 2. Off by default and in every paper preset.

    Attributes:
        enabled: run the stage after every task (statistics are stored from the first task, the head is
            retrained from the second on).
        covariance: ``full`` (one d x d covariance per class, as SLCA), ``diagonal`` (per-class variances) or
            ``shared`` (one pooled within-class covariance).
        shrinkage: lambda in ``(1 - lambda) S + lambda (tr S / d) I``: shrinks each covariance towards a scaled
            identity (useful when a class has fewer images than feature dimensions). 0: the sample covariance.
        samples_per_class: features drawn per class and epoch (SLCA: 256).
        epochs: passes over freshly drawn samples (SLCA: 5).
        batch_size: samples per step (SLCA: 256).
        optimizer: ``sgd`` (momentum, as SLCA) or ``adam``.
        lr: initial learning rate, annealed to 0 by a cosine schedule over ``epochs`` (SLCA: 0.01).
        momentum: SGD momentum.
        weight_decay: weight decay (SLCA: 5e-4).
        logit_norm: temperature of SLCA's logit normalisation (0.1 in its configs); ``None``: plain
            cross-entropy on the logits.
        params: what trains: ``head`` (every weight and bias, SLCA) or ``block_affine`` (one scale and one
            offset per task block, folded into the head afterwards: it recalibrates the blocks against each
            other and leaves each block's ranking of its own classes as trained on real images; the
            bias-correction layer of BiC, Wu et al., CVPR 2019, fitted on sampled features instead of exemplars).
            ``block_affine`` is fitted to convergence by L-BFGS on all the samples drawn (``epochs`` x
            ``samples_per_class`` per class); ``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
            ``batch_size`` and ``logit_norm`` apply to ``head`` only.
    """

    enabled: bool = False
    covariance: Literal["full", "diagonal", "shared"] = "full"
    shrinkage: float = 0.0
    samples_per_class: int = 256
    epochs: int = 5
    batch_size: int = 256
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    logit_norm: float | None = 0.1
    params: Literal["head", "block_affine"] = "head"

    def __post_init__(self) -> None:
        # Written so that NaN fails every check (``nan <= 0`` is False, ``0 <= nan`` too).
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        for name in ("samples_per_class", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.logit_norm is not None and not (self.logit_norm > 0 and math.isfinite(self.logit_norm)):
            raise ValueError(f"logit_norm must be a positive number or null, got {self.logit_norm}")


def pack_symmetric(g: Tensor) -> Tensor:
    """The upper triangle of the symmetric matrix ``g`` (row by row, diagonal included) as one vector."""
    return torch.cat([g[i, i:] for i in range(g.shape[0])]) if g.numel() else g.new_zeros(0)


def symmetrised(s: Tensor) -> Tensor:
    """``(S + S^T) / 2``: exactly symmetric (each pair of entries is the same sum), so a pooled scatter that is
    symmetric up to round-off survives :func:`pack_symmetric` (checkpoints) bit for bit."""
    return 0.5 * (s + s.t())


def unpack_symmetric(v: Tensor, m: int) -> Tensor:
    """Inverse of :func:`pack_symmetric` for an ``m`` x ``m`` matrix.

    Raises:
        ValueError: ``v`` has not ``m (m + 1) / 2`` entries.
    """
    if v.numel() != m * (m + 1) // 2:
        raise ValueError(f"packed symmetric matrix has {v.numel()} entries, expected {m * (m + 1) // 2} for {m} x {m}")
    g = v.new_zeros(m, m)
    offset = 0
    for i in range(m):
        row = v[offset : offset + m - i]
        g[i, i:] = row
        g[i:, i] = row
        offset += m - i
    return g


class FeatureStatistics:
    """Per-class feature means and covariances of every class seen so far, in label-position order.

    Accumulated in float64 (sums of x and x x^T per class, summed over processes), stored in float32 except the
    pooled scatter of ``covariance: shared`` (float64, it keeps accumulating). ``tensors()``/``load()`` give the
    exact state for checkpoints.
    """

    def __init__(self, num_features: int, covariance: str) -> None:
        if covariance not in ("full", "diagonal", "shared"):
            raise ValueError(f"covariance must be full, diagonal or shared, got {covariance!r}")
        self.d = num_features
        self.covariance = covariance
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.means = torch.zeros(0, num_features, dtype=torch.float32)
        if covariance == "full":
            self.covs = torch.zeros(0, num_features, num_features, dtype=torch.float32)
        elif covariance == "diagonal":
            self.covs = torch.zeros(0, num_features, dtype=torch.float32)
        else:  # pooled scatter sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T
            self.covs = torch.zeros(num_features, num_features, dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    def numel(self) -> int:
        """Stored scalars (counted in a method's "stored params")."""
        return int(self.counts.numel() + self.means.numel() + self.covs.numel())

    def _second_shape(self, n_new: int) -> tuple[int, ...]:
        """Second moments accumulated for ``n_new`` classes: per class (d or d x d), or one pooled d x d."""
        if self.covariance == "diagonal":
            return (n_new, self.d)
        return (self.d, self.d) if self.covariance == "shared" else (n_new, self.d, self.d)

    @torch.no_grad()
    def add_classes(
        self,
        batches: Iterator[tuple[Batch, Tensor]],
        features: Callable[[Batch], Tensor],
        class_start: int,
        class_end: int,
        all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
        device: torch.device | None = None,
    ) -> None:
        """Add the statistics of classes ``[class_start, class_end)`` from ``(x, y)`` batches.

        Under torchrun each process passes its shard and ``all_reduce`` sums the moments over processes, so every
        process ends with the same statistics; ``device`` is where a process without any batch puts its zeros
        (the device of the collectives).

        Raises:
            ValueError: the classes do not follow the stored ones, a label is outside the range, or a class
                has fewer than two samples (no covariance).
        """
        if class_start != self.num_classes:
            raise ValueError(f"statistics hold {self.num_classes} classes but new classes start at {class_start}")
        n_new = class_end - class_start
        d = self.d
        sums = counts = second = None
        for x, y in batches:
            f = features(x).double()
            idx = (y.to(f.device) - class_start).long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_new):
                raise ValueError(f"a statistics batch has labels outside [{class_start}, {class_end})")
            if sums is None:
                sums = f.new_zeros(n_new, d)
                counts = f.new_zeros(n_new)
                second = f.new_zeros(self._second_shape(n_new))
            assert counts is not None and second is not None
            sums.index_add_(0, idx, f)
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
            if self.covariance == "diagonal":
                second.index_add_(0, idx, f * f)
            elif self.covariance == "shared":  # the pooled scatter needs only the sum over classes
                second += f.t() @ f
            else:  # one Gram matrix per class present (a (batch, d, d) outer-product tensor would be huge)
                for c in torch.unique(idx).tolist():
                    fc = f[idx == c]
                    second[c] += fc.t() @ fc
        if sums is None:  # this process got no batch: contribute zeros to the sums
            dev = device if device is not None else torch.device("cpu")
            sums = torch.zeros(n_new, d, dtype=torch.float64, device=dev)
            counts = torch.zeros(n_new, dtype=torch.float64, device=dev)
            second = torch.zeros(self._second_shape(n_new), dtype=torch.float64, device=dev)
        assert counts is not None and second is not None
        sums, counts, second = all_reduce(sums), all_reduce(counts), all_reduce(second)
        few = [class_start + i for i in torch.nonzero(counts < 2).flatten().tolist()]
        if few:
            raise ValueError(
                f"classifier alignment needs at least 2 training images per class; classes {few} have fewer"
            )
        sums, counts, second = sums.cpu(), counts.cpu(), second.cpu()
        mean = sums / counts[:, None]
        # Unbiased covariance from the moments: (sum x x^T - n mu mu^T) / (n - 1), in float64.
        if self.covariance == "diagonal":
            scatter = second - counts[:, None] * mean * mean
        elif self.covariance == "shared":  # sum_c (sum_i x x^T - n_c mu_c mu_c^T), already summed over c
            scatter = symmetrised(second - mean.t() @ (counts[:, None] * mean))
        else:
            scatter = second - counts[:, None, None] * mean[:, :, None] * mean[:, None, :]
        self.counts = torch.cat([self.counts, counts])
        self.means = torch.cat([self.means, mean.float()])
        if self.covariance == "shared":
            self.covs = self.covs + scatter
        else:
            cov = scatter / (counts - 1).view(-1, *([1] * (scatter.dim() - 1)))
            self.covs = torch.cat([self.covs, cov.float()])

    def covariance_of(self, c: int) -> Tensor:
        """The float64 covariance of class ``c`` ((d, d), or (d,) variances for ``diagonal``), unshrunk."""
        if self.covariance == "shared":
            return self.covs / float((self.counts - 1).sum())
        return self.covs[c].double()

    def sampling_factors(self, shrinkage: float) -> list[Tensor]:
        """Per class, L with L L^T = the shrunk covariance (a (d,) standard deviation for ``diagonal``).

        Symmetric square roots from ``eigh`` (negative round-off eigenvalues clamped to 0): the sample covariance
        of a class with fewer images than dimensions is singular, which a Cholesky factor would refuse.
        """
        out: list[Tensor] = []
        shared: Tensor | None = None
        for c in range(self.num_classes):
            if self.covariance == "shared" and shared is not None:
                out.append(shared)
                continue
            cov = self.covariance_of(c)
            if self.covariance == "diagonal":
                var = (1 - shrinkage) * cov + shrinkage * cov.mean()
                out.append(var.clamp_min(0).sqrt())
                continue
            cov = symmetrised(cov)
            cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / self.d) * torch.eye(self.d, dtype=cov.dtype)
            evals, evecs = torch.linalg.eigh(cov)
            factor = evecs * evals.clamp_min(0).sqrt()
            out.append(factor)
            shared = factor if self.covariance == "shared" else None
        return out

    def sample(self, factors: list[Tensor], per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``per_class`` Gaussian features per class (float64, CPU) and their labels, class by class."""
        xs, ys = [], []
        for c, factor in enumerate(factors):
            z = torch.randn(per_class, self.d, generator=generator, dtype=torch.float64)
            noise = z * factor if factor.dim() == 1 else z @ factor.t()
            xs.append(self.means[c].double() + noise)
            ys.append(torch.full((per_class,), c, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """Counts, means and covariances; the pooled scatter of ``shared`` as its upper triangle (``covs_upper``:
        it is symmetric, and in float64 at ``calib.features: both`` widths it is most of a checkpoint)."""
        out = {f"{prefix}counts": self.counts.contiguous(), f"{prefix}means": self.means.contiguous()}
        if self.covariance == "shared":
            out[f"{prefix}covs_upper"] = pack_symmetric(self.covs)
        else:
            out[f"{prefix}covs"] = self.covs.contiguous()
        return out

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        """Restore from ``tensors(prefix)``.

        Raises:
            ValueError: missing keys, or shapes of another feature size or covariance kind.
        """
        packed = self.covariance == "shared" and f"{prefix}covs_upper" in tensors  # older checkpoints: d x d
        keys = ("counts", "means", "covs_upper" if packed else "covs")
        try:
            counts, means, covs = (tensors[f"{prefix}{k}"] for k in keys)
        except KeyError as e:
            raise ValueError(f"checkpoint has no classifier-alignment statistics ({e.args[0]})") from None
        if packed:
            covs = unpack_symmetric(covs, self.d)
        c = counts.numel()
        want = {"full": (c, self.d, self.d), "diagonal": (c, self.d), "shared": (self.d, self.d)}[self.covariance]
        if tuple(means.shape) != (c, self.d) or tuple(covs.shape) != want:
            raise ValueError(
                f"classifier-alignment statistics do not fit: means {tuple(means.shape)}, covariances "
                f"{tuple(covs.shape)}; expected {(c, self.d)} and {want} (covariance: {self.covariance})"
            )
        self.counts = counts.to(torch.float64).clone()
        self.means = means.to(torch.float32).clone()
        if self.covariance == "shared" and not packed:  # an older checkpoint's d x d: symmetric to round-off
            covs = symmetrised(covs.double())
        self.covs = covs.to(self.covs.dtype).clone()


def block_normalised_logits(logits: Tensor, block_sizes: list[int], temperature: float) -> Tensor:
    """SLCA's logit normalisation: logits divided by the mean over task blocks of each block's L2 norm, then by
    ``temperature``. A positive per-sample factor: the argmax is unchanged."""
    norms = torch.stack([b.norm(dim=-1) for b in logits.split(block_sizes, dim=-1)], -1)
    return logits / (norms.mean(-1, keepdim=True) + 1e-7) / temperature


def _generator(seed: int, task: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + task * 7_919 + epoch + 17) % (2**63 - 1))


def _fit_block_affine(
    head: IncrementalLinear, stats: FeatureStatistics, cfg: AlignConfig, factors: list[Tensor], seed: int, task: int
) -> tuple[int, float]:
    """Fit one scale ``exp(rho_b)`` and one offset ``c_b`` per block on sampled features, fold them into the head.

    The head is fixed, so the logits of the samples are computed once and the 2 x blocks parameters are fitted by
    full-batch L-BFGS (float64) to convergence, with a small ridge ``1e-3 (rho^2 + c^2)`` towards the identity
    (without it the fit may run off to an infinite scale when the sampled blocks separate perfectly).
    """
    params = list(head.parameters())
    device, dtype = params[0].device, params[0].dtype
    xs, ys = [], []
    for epoch in range(max(cfg.epochs, 1)):  # the same draws as the head variant's epochs
        x, y = stats.sample(factors, cfg.samples_per_class, _generator(seed, task, epoch))
        xs.append(x)
        ys.append(y)
    y = torch.cat(ys).to(device)
    with torch.no_grad():
        z = head(torch.cat(xs).to(device=device, dtype=dtype)).double()
    sizes = torch.tensor(head.block_sizes(), device=device)
    rho = torch.zeros(len(sizes), device=device, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(len(sizes), device=device, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([rho, shift], lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss_fn() -> Tensor:
        calibrated = z * torch.repeat_interleave(rho.exp(), sizes) + torch.repeat_interleave(shift, sizes)
        return F.cross_entropy(calibrated, y) + 1e-3 * (rho.square().sum() + shift.square().sum())

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(loss_fn().detach())
    if not math.isfinite(final):
        raise RuntimeError(f"classifier alignment (block_affine) diverged after task {task + 1}")
    with torch.no_grad():
        for b, (w, bias) in enumerate(zip(head.weights, head.biases)):
            scale = rho[b].exp().to(dtype)
            w.mul_(scale)
            bias.mul_(scale).add_(shift[b].to(dtype))
    return len(ys[0]), final


def align_head(
    head: IncrementalLinear, stats: FeatureStatistics, cfg: AlignConfig, *, seed: int, task: int
) -> dict[str, Any]:
    """Retrain ``head`` on Gaussian features of all classes in ``stats`` (cross-entropy over all seen classes).

    ``cfg.params == "head"``: every weight and bias of every block trains with the configured optimiser (SLCA).
    ``"block_affine"``: one scale and one offset per task block, fitted by L-BFGS (``_fit_block_affine``) and
    folded into the block (``W_b <- s_b W_b``, ``b_b <- s_b b_b + c_b``): the head keeps its shape and each
    block's ranking of its own classes. The head's ``requires_grad`` flags are restored afterwards.
    Deterministic given ``(seed, task)``.

    Returns:
        ``{"align_epochs", "align_samples", "align_loss"}``: samples drawn per epoch, mean loss of the last
        epoch (for ``block_affine``: the final loss of the fit).
    """
    if head.num_classes != stats.num_classes:
        raise ValueError(f"the head has {head.num_classes} classes but the statistics hold {stats.num_classes}")
    factors = stats.sampling_factors(cfg.shrinkage)
    if cfg.params == "block_affine":
        per_epoch, fit_loss = _fit_block_affine(head, stats, cfg, factors, seed, task)
        return {"align_epochs": cfg.epochs, "align_samples": per_epoch, "align_loss": fit_loss}
    params = list(head.parameters())
    flags = [p.requires_grad for p in params]
    device = params[0].device
    dtype = params[0].dtype
    sizes = head.block_sizes()
    for p in params:
        p.requires_grad_(True)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    last_loss = float("nan")
    n = 0
    try:
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                for group in opt.param_groups:  # cosine annealing to 0 over the epochs (SLCA), set per epoch
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
                gen = _generator(seed, task, epoch)
                x, y = stats.sample(factors, cfg.samples_per_class, gen)
                order = torch.randperm(len(y), generator=gen)
                x, y = x[order].to(device=device, dtype=dtype), y[order].to(device)
                n = len(y)
                total = 0.0
                for i in range(0, n, cfg.batch_size):
                    logits = head(x[i : i + cfg.batch_size])
                    if cfg.logit_norm is not None:
                        logits = block_normalised_logits(logits, sizes, cfg.logit_norm)
                    loss = F.cross_entropy(logits, y[i : i + cfg.batch_size])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(logits)
                last_loss = total / max(n, 1)
                if not math.isfinite(last_loss):
                    raise RuntimeError(
                        f"classifier alignment diverged after task {task + 1} (loss {last_loss}); "
                        "lower method.align.lr"
                    )
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
    return {"align_epochs": cfg.epochs, "align_samples": n, "align_loss": last_loss}
