"""The method interface the engine sees, and the method registry.

A method owns a model (backbone + growing head) and implements hooks; the engine owns every loop, the
optimiser, the device, evaluation and checkpoints (style: avalanche/mammoth hooks, timm registry).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import AlignConfig, FeatureStatistics, align_head
from ..backbones import Backbone
from ..calibration import CalibConfig, CalibratedHead, compensate_statistics
from ..config import MethodConfig
from ..configtools import ConfigError, from_dict
from ..data import Batch
from ..heads import IncrementalLinear
from ..lora import AdapterConfig

__all__ = [
    "METHODS",
    "LowRankUpdate",
    "Method",
    "NoOptions",
    "TaskContext",
    "create_method",
    "parse_options",
    "register_method",
]

METHODS: dict[str, type[Method]] = {}


class UnsupportedBackbone(ValueError):
    """A method cannot work on this backbone at all (prefix-tuning on a model without timm ViT blocks, InfLoRA
    without key/value projections): raised while the method is built. ``sdlora compare --methods all`` skips such a
    method instead of counting it as a failed run."""


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as ``method.name: <name>``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        for hook in ("make_adapter_config", "make_align_config", "make_calib_config"):
            # resolve_method_config calls them on the class (the saved config must show them before a model
            # exists); an instance method would fail there with a bare TypeError.
            if not isinstance(inspect.getattr_static(cls, hook), classmethod | staticmethod):
                raise TypeError(
                    f"method {name!r}: {cls.__name__}.{hook} must be a @classmethod (it is applied to the run's "
                    "config before the method is built)"
                )
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


@dataclass
class NoOptions:
    """The options of a method that has none (``method.options`` must be empty)."""


def parse_options(cls: type[Method], options: dict[str, Any] | None) -> Any:
    """``method.options`` checked and typed by the options dataclass ``cls.options_class`` (defaults filled in).

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value, with its key path (``method.options.rank``).
    """
    try:
        return from_dict(cls.options_class, dict(options or {}), "method.options")
    except ConfigError:
        if cls.options_class is NoOptions and options:
            raise ConfigError(
                f"method {cls.name!r} takes no options, got {sorted(options)}", "method.options"
            ) from None
        raise


def create_method(cfg: MethodConfig, backbone: Backbone) -> Method:
    """Build the method named by ``cfg.name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    if cfg.name not in METHODS:
        raise KeyError(f"unknown method {cfg.name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.name](cfg, backbone)


@dataclass
class TaskContext:
    """What a method may know about the task being learned.

    Attributes:
        task: 0-based index.
        num_tasks: tasks in the scenario.
        class_start, class_end: this task's classes are label positions ``[class_start, class_end)``; after it
            ``class_end`` classes have been seen.
        device: where the engine keeps the model and batches.
        epochs: epochs the engine will train this task.
        statistics_batches: yields ``(x, y)`` batches of the current task's training data with evaluation
            transforms, on ``device`` (for prototypes, covariances); under torchrun each process gets its shard.
            ``x`` is an image tensor, or a dict of token tensors for text (:data:`sdlora.data.Batch`).
        all_reduce: sums a tensor over processes (identity in a single process).
        seed: the run's seed (for a method's own seeded draws, identical on every process).
    """

    task: int
    num_tasks: int
    class_start: int
    class_end: int
    device: torch.device
    epochs: int
    statistics_batches: Callable[[], Iterator[tuple[Batch, Tensor]]] = field(repr=False)
    all_reduce: Callable[[Tensor], Tensor] = field(repr=False, default=lambda t: t)
    seed: int = 0

    @property
    def num_new(self) -> int:
        return self.class_end - self.class_start


@dataclass
class LowRankUpdate:
    """What a LoRA-style method learned in the backbone, as plain LoRA factors (for export to PEFT).

    Attributes:
        base: a copy of the backbone before anything was learned (plain modules, pretrained weights W0).
        factors: ``{module name in base: (A (r, d_in), B (d_out, r))}``; the learned model is ``base`` with every
            named ``nn.Linear`` weight replaced by ``W0 + B @ A`` (modules not named are unchanged).
    """

    base: nn.Module
    factors: dict[str, tuple[Tensor, Tensor]]


def _identity(f: Batch) -> Tensor:
    """The statistics' "feature extractor" for batches that already hold features."""
    assert isinstance(f, Tensor)
    return f


class Method(nn.Module):
    """Base class: ``self.model`` (backbone features) followed by an ``IncrementalLinear`` head.

    Subclasses set ``self.model`` and override the hooks they change. Prediction is the argmax over all seen
    classes of ``forward(x)`` (class-incremental, no task id).
    """

    name: ClassVar[str] = "base"
    #: the dataclass of this method's own options (``method.options``), declared next to its code
    options_class: ClassVar[type] = NoOptions
    #: False for training-free methods: the engine then runs no optimisation epochs.
    trains: ClassVar[bool] = True
    #: backbone forward passes per prediction (prompt methods: 2, a query pass then the prompted pass); recorded
    #: in ``results.json`` and shown in the compare table as the inference cost
    inference_passes: ClassVar[int] = 1
    #: False for methods whose prediction does not come from ``self.head`` (classifier alignment is refused).
    uses_head: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__()
        self.cfg = cfg
        self.options = parse_options(type(self), cfg.options)
        self.backbone_info = backbone.info()
        self.num_features = backbone.num_features
        self.model: nn.Module = backbone.model
        self.head = IncrementalLinear(backbone.num_features, init=cfg.head_init)
        self.align_config = self.make_align_config(cfg.align)
        self.align_stats: FeatureStatistics | None = None
        if self.align_config.enabled:
            if not self.uses_head:
                raise ValueError(
                    f"method {self.name!r} does not predict with a trained head: method.align.enabled needs a "
                    "head-based method (sdlora, seq_lora, inflora, ...)"
                )
            self.align_stats = FeatureStatistics(backbone.num_features, self.align_config.covariance)
        self.calib_config = self.make_calib_config(cfg.calib)
        self.calib: CalibratedHead | None = None
        if self.calib_config.active and not self.uses_head:
            raise ValueError(
                f"method {self.name!r} does not predict with a trained head: method.calib needs a head-based method "
                "(sdlora, seq_lora, inflora, ...)"
            )
        if self.calib_config.head != "linear":
            self.calib = CalibratedHead(self.calib_config, backbone.num_features)
        # ``method.calib.features: both``: the pretrained backbone as it is now (subclasses adapt backbone.model
        # after this constructor), kept frozen and in eval mode for the head's frozen-feature block. Its weights
        # are the pretrained ones, rebuilt with the backbone, so checkpoints do not carry them.
        self.frozen_model: nn.Module | None = None
        if self.calib is not None and self.calib.uses_frozen_features:
            self.frozen_model = copy.deepcopy(backbone.model).eval()
            self.frozen_model.requires_grad_(False)
        # The current task's features before the task (this process's shard, for drift compensation); held only
        # from begin_task to after_task, never saved.
        self._features_before: Tensor | None = None

    @classmethod
    def make_adapter_config(cls, cfg: AdapterConfig) -> AdapterConfig:
        """Registry entries that are a configuration of the LoRA adapter (``sdlora_kd``, ``seq_lora``, the
        ablations: a variant is configuration, not a copy) set it here (applied to the run's config by
        ``resolve_method_config``, so the saved config shows the adapter the run uses, and again when the adapter is
        built)."""
        return cfg

    @classmethod
    def make_align_config(cls, cfg: AlignConfig) -> AlignConfig:
        """Registry entries that are "this method + classifier alignment" turn it on here (configuration; applied
        to the run's config by ``resolve_method_config``, so the saved config shows it)."""
        return cfg

    @classmethod
    def make_calib_config(cls, cfg: CalibConfig) -> CalibConfig:
        """Registry entries that are "this method + a calibrated head" set it here (configuration; applied to the
        run's config by ``resolve_method_config``, so the saved config shows the head the run uses)."""
        return cfg

    def _class_stores(self) -> list[FeatureStatistics]:
        """Every stored class statistic that drift compensation moves."""
        stores = [self.align_stats] if self.align_stats is not None else []
        return stores + ([self.calib.stats] if self.calib is not None else [])

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.frozen_model is not None:  # the frozen backbone never trains (no dropout in its features)
            self.frozen_model.eval()
        return self

    def passes_per_prediction(self) -> int:
        """Backbone forward passes per prediction: the class's ``inference_passes``, plus one for the frozen
        backbone of ``method.calib.features: both``."""
        return int(type(self).inference_passes) + (1 if self.frozen_model is not None else 0)

    def _calib_inputs(self, f: Tensor, x: Batch) -> Tensor:
        """The calibrated head's inputs for adapted features ``f`` of batch ``x``."""
        assert self.calib is not None
        frozen = self.frozen_model(x) if self.frozen_model is not None else None
        return self.calib.inputs(f, frozen)

    @torch.no_grad()
    def _task_features(self, ctx: TaskContext, frozen: bool = True) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """``(features float64, labels, frozen features float64 or None)`` per statistics batch of the current
        task, in the loader's fixed order (frozen features only for ``method.calib.features: both`` and when
        ``frozen`` asks for them: drift estimation needs only the adapted ones).

        With ``method.calib`` on, the global RNG is restored afterwards (the loader draws a seed from it), so the
        training and evaluation that follow are those of the method without it: the calibrated head changes
        predictions, not what is trained.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[], enabled=self.calib_config.active):
                return [
                    (
                        self.features(x).double(),
                        y,
                        None if self.frozen_model is None or not frozen else self.frozen_model(x).double(),
                    )
                    for x, y in ctx.statistics_batches()
                ]
        finally:
            self.train(was_training)

    @property
    def protocol(self) -> str:
        """The adapter protocol label recorded in results (``n/a`` for methods without one)."""
        return "n/a"

    # ------------------------------------------------------------------------------------------ hooks
    def features(self, x: Batch) -> Tensor:
        return self.model(x)

    def forward(self, x: Batch) -> Tensor:
        """Logits over all seen classes: the calibrated head (``method.calib``) once it has been fitted for every
        class of the trained head (after ``after_task``), else the trained head (while a task trains)."""
        f = self.features(x)
        if self.calib is not None and 0 < self.calib.num_classes == self.head.num_classes:
            return self.calib.logits(self._calib_inputs(f, x))
        return self.head(f)

    def num_seen_classes(self) -> int:
        """How many classes :meth:`forward` scores (the width of its logits; 0 before the first task). Override when
        prediction does not come from ``self.head`` (``uses_head = False``)."""
        return int(self.head.num_classes) if self.head.num_blocks else 0

    def begin_task(self, ctx: TaskContext) -> None:
        """Grow the head by the task's classes; only the new block trains unless the loss covers all classes.

        With drift compensation (``method.calib.drift``) and stored classes, first pass the task's data through
        the model as evaluated after the previous task (before any protocol transition a subclass performs
        after this call) and hold the features until ``after_task``.
        """
        self._features_before = None
        if self.calib_config.drift != "none" and ctx.num_new and any(s.num_classes for s in self._class_stores()):
            self._features_before = torch.cat([f for f, _, _ in self._task_features(ctx, frozen=False)])
        self.head.grow(ctx.num_new, device=ctx.device)
        self.head.set_trainable(train_old=self.cfg.loss_scope == "all")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable parameters in groups, each with its learning-rate factor (times ``train.lr``); the
        first group's learning rate is the one logged. Default: one group at factor 1."""
        return [(self.trainable_parameters(), 1.0)]

    def training_loss(self, logits: Tensor, y: Tensor, ctx: TaskContext) -> Tensor:
        """Cross-entropy; after the first task over the current task's logits only (``loss_scope: current``,
        the official code's ``F.cross_entropy(logits[:, known:], y - known)``), so old rows get no gradient."""
        if self.cfg.loss_scope == "current" and ctx.class_start > 0:
            return F.cross_entropy(logits[:, ctx.class_start : ctx.class_end], y - ctx.class_start)
        return F.cross_entropy(logits, y)

    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        """Called after training, before evaluation. Returns facts for the log (JSON-able)."""
        return {}

    @torch.no_grad()
    def after_task(self, ctx: TaskContext) -> dict[str, Any]:
        """Optional stage after ``end_task``, before evaluation: drift compensation and the calibrated head
        (``method.calib``), classifier alignment (``method.align``).

        The task's training data (evaluation transforms) goes through the model as it will be evaluated, once:
        with drift compensation the stored classes are first moved by the drift between these features and those
        taken in ``begin_task``; then the statistics of the task's classes are added (mean and covariance, summed
        over processes); alignment retrains every head block on Gaussian samples of all seen classes from the
        second task on (``alignment.align_head``) and the calibrated head is solved. The features of the task
        are dropped afterwards. Returns facts for the log (empty when both are off).
        """
        stores = self._class_stores()
        if not stores:
            return {}
        batches = self._task_features(ctx)
        report: dict[str, Any] = {}
        if self._features_before is not None:
            after = torch.cat([f for f, _, _ in batches])
            before = self._features_before
            report.update(compensate_statistics(stores, self.calib_config, before, after, ctx.all_reduce))
        self._features_before = None
        adapted = [(f, y) for f, y, _ in batches]
        if self.align_stats is not None:
            self.align_stats.add_classes(
                iter(adapted), _identity, ctx.class_start, ctx.class_end, ctx.all_reduce, ctx.device
            )
        if self.calib is not None:
            self.calib.ensure_projection(ctx.seed)
            calib = self.calib
            inputs = [(calib.inputs(f, u), y) for f, y, u in batches]
            calib.stats.add_classes(
                iter(inputs), _identity, ctx.class_start, ctx.class_end, ctx.all_reduce, ctx.device
            )
        if self.align_stats is not None:
            report["align_classes"] = self.align_stats.num_classes
            if self.head.num_blocks > 1 and self.align_config.epochs > 0:
                report.update(align_head(self.head, self.align_stats, self.align_config, seed=ctx.seed, task=ctx.task))
        if self.calib is not None:
            self.calib.fit(ctx.seed, ctx.task)
            report["calib_head"] = self.calib_config.head
        return report

    def export_backbone(self) -> nn.Module:
        """A plain backbone (same class as the original) with everything learned folded in."""
        return self.model

    def low_rank_update(self) -> LowRankUpdate | None:
        """The learned backbone update as plain LoRA factors over the untouched backbone, exactly the function
        ``features`` computes; ``None`` (the default) when the method's update is not low-rank or it keeps the
        backbone unchanged. Used by ``sdlora export --format peft``."""
        return None

    def classifier(self) -> tuple[Tensor, Tensor] | None:
        """``(weight (classes, features), bias (classes,))`` such that ``forward(x) == features(x) @ weight.T +
        bias``, rows in label-position order; ``None`` when the method's logits are not a linear map of the
        features."""
        if not self.head.num_blocks:
            return None
        if self.calib is not None and self.calib.num_classes == self.head.num_classes:
            return self.calib.linear_map()
        w = torch.cat([w.detach() for w in self.head.weights], 0)
        b = torch.cat([b.detach() for b in self.head.biases], 0)
        return w, b

    @torch.no_grad()
    def merge_for_inference(self) -> None:
        """Fold what was learned into the backbone so that ``forward`` costs what the bare backbone costs. After
        this the method is for inference only (its state may no longer be saved or trained). The default swaps
        in ``export_backbone()``; methods whose ``export_backbone`` is their model already change nothing."""
        plain = self.export_backbone()
        if plain is not self.model:
            self.model = plain
        self.eval()

    # ---------------------------------------------------------------------------------------- accounting
    def parameter_counts(self) -> dict[str, int]:
        """``trainable``: scalars that learn in the current task (head included); ``stored``: scalars kept
        beyond the frozen pretrained backbone (adapters, magnitudes, head, prototypes...)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        head = sum(p.numel() for p in self.head.parameters())
        stats = 0 if self.align_stats is None else self.align_stats.numel()
        stats += 0 if self.calib is None else self.calib.numel()
        return {"trainable": trainable, "stored": head + stats}

    # -------------------------------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON meta that restore this method after a task (checkpoints, export)."""
        tensors: dict[str, Tensor] = {}
        for i, (w, b) in enumerate(zip(self.head.weights, self.head.biases)):
            tensors[f"head.weight.{i}"] = w.detach().cpu().contiguous()
            tensors[f"head.bias.{i}"] = b.detach().cpu().contiguous()
        if self.align_stats is not None:
            tensors.update(self.align_stats.tensors("align."))
        if self.calib is not None:
            tensors.update(self.calib.tensors("calib."))
        return tensors, {"method": self.name, "head_blocks": self.head.block_sizes()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.name:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r}, not {self.name!r}")
        device = next(self.parameters()).device
        self.head = IncrementalLinear(self.num_features, init=self.cfg.head_init).to(device)
        for i, n in enumerate(meta["head_blocks"]):
            self.head.grow(n, device=device)
            self.head.weights[i].copy_(tensors[f"head.weight.{i}"])
            self.head.biases[i].copy_(tensors[f"head.bias.{i}"])
        self.head.set_trainable(train_old=False)
        if self.align_stats is not None:
            self.align_stats.load(tensors, "align.")
        if self.calib is not None:
            self.calib.load(tensors, "calib.")
