"""Baselines and SD-LoRA ablations in the same engine: ``seq_lora`` (``seq_lora_ca`` with classifier alignment,
``seq_lora_calib`` with the calibrated head), ``full_ft``, ``simplecil`` and the three ablations of paper
Table 4 (``sdlora_ablation_first``, ``sdlora_ablation_single``, ``sdlora_ablation_fixed``).

The LoRA baselines and the ablations are configurations of the one SD-LoRA implementation (``SDLoRA`` with another
``make_adapter_config``), so they share injection, targets, ranks, forward path, checkpoints and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import AlignConfig
from ..backbones import Backbone
from ..calibration import CalibConfig, calibrated_variant
from ..config import MethodConfig
from ..data import Batch
from ..lora import AdapterConfig
from .base import Method, TaskContext, register_method
from .sdlora import SDLoRA

__all__ = [
    "FullFineTune",
    "SDLoRAAblationFirst",
    "SDLoRAAblationFixed",
    "SDLoRAAblationSingle",
    "SeqLoRA",
    "SeqLoRACA",
    "SeqLoRACalib",
    "SimpleCIL",
    "plain_lora_config",
]


# ------------------------------------------------------------------------------------------------ LoRA baselines
def plain_lora_config(cfg: AdapterConfig) -> AdapterConfig:
    """``cfg`` as plain LoRA ``W + B A``: one component that keeps learning, unnormalised, magnitude fixed at 1
    (``AdapterConfig`` documents this combination as plain LoRA); ``rank_schedule`` and ``kd`` do not apply. Used
    by ``seq_lora``, ``lora_merge`` and RanPAC's first-task adaptation."""
    return dataclasses.replace(
        cfg,
        components="single",
        normalise_current=False,
        alpha_init=1.0,
        train_magnitudes=False,
        rank_schedule=None,
        kd=False,
    )


@register_method("seq_lora")
class SeqLoRA(SDLoRA):
    """Sequential LoRA: one plain LoRA ``W0 + B A`` (same targets, projections and rank as SD-LoRA) trained
    continually across all tasks, no decoupling and no magnitudes: the classic forgetting baseline.

    It is the adapter with ``components="single"`` (the one component keeps learning), no normalisation of the
    current component and a fixed magnitude of 1 (``AdapterConfig`` documents this combination as plain LoRA).
    ``rank_schedule`` and ``kd`` of ``method.adapter`` are ignored: a single component has one rank.
    """

    @classmethod
    def make_adapter_config(cls, cfg: AdapterConfig) -> AdapterConfig:
        return plain_lora_config(cfg)

    @property
    def protocol(self) -> str:
        return "plain"


@register_method("seq_lora_ca")
class SeqLoRACA(SeqLoRA):
    """Sequential LoRA with classifier alignment after each task (SLCA, ``method.align``; see ``alignment.py``):
    the same adapter as ``seq_lora``, with ``method.align.enabled`` forced on."""

    @classmethod
    def make_align_config(cls, cfg: AlignConfig) -> AlignConfig:
        return dataclasses.replace(cfg, enabled=True)


@register_method("seq_lora_calib")
class SeqLoRACalib(SeqLoRA):
    """Sequential LoRA with the calibrated head of ``sdlora_calib`` (``calibration.calibrated_variant``): the
    same head and drift compensation on the ``seq_lora`` adapter, the comparison that isolates SD-LoRA's
    decoupled update."""

    @classmethod
    def make_calib_config(cls, cfg: CalibConfig) -> CalibConfig:
        return calibrated_variant(cfg)


@register_method("sdlora_ablation_first")
class SDLoRAAblationFirst(SDLoRA):
    """Paper Table 4 row 1, ``W0 + alpha * dir(A1 B1)``: the direction is learned on the first task only and frozen;
    afterwards only its magnitude (and the head) trains. The other adapter settings (protocol, rank, targets)
    are those of ``method.adapter``; ``kd`` is off (there is no second direction to distil)."""

    @classmethod
    def make_adapter_config(cls, cfg: AdapterConfig) -> AdapterConfig:
        return dataclasses.replace(cfg, components="first_only", kd=False, train_magnitudes=True)


@register_method("sdlora_ablation_single")
class SDLoRAAblationSingle(SDLoRA):
    """Paper Table 4 row 2, ``W0 + alpha * dir(A B)``: a single decoupled component (normalised direction times a
    learned magnitude) that keeps learning across all tasks.

    The direction is normalised while it trains (``normalise_current=True``) whatever the protocol: under the
    official protocol the current component is otherwise unnormalised and, since this one is never frozen,
    it would never be decoupled at all. B starts at zero, so the first step sees the smoothed 0/0 of
    ``AdapterConfig.normalise_current``: use Adam (as the demo does)."""

    @classmethod
    def make_adapter_config(cls, cfg: AdapterConfig) -> AdapterConfig:
        return dataclasses.replace(
            cfg, components="single", normalise_current=True, train_magnitudes=True, rank_schedule=None, kd=False
        )


@register_method("sdlora_ablation_fixed")
class SDLoRAAblationFixed(SDLoRA):
    """Paper Table 4 row 3, ``W0 + dir(A1 B1) + ... + alpha_t * dir(At Bt)``: one direction per task as SD-LoRA, but
    the magnitudes of earlier tasks are frozen ("no rescaling"): only the current task's magnitude learns.

    Earlier magnitudes keep the values they ended their own task with (``alpha_carry_over=True`` whatever the
    protocol): the official protocol's re-creation of every magnitude at ``alpha_init`` would itself rescale
    the old directions."""

    @classmethod
    def make_adapter_config(cls, cfg: AdapterConfig) -> AdapterConfig:
        return dataclasses.replace(
            cfg, components="per_task", train_magnitudes=True, train_old_magnitudes=False, alpha_carry_over=True
        )


# ------------------------------------------------------------------------------------------ full fine-tuning
@dataclasses.dataclass
class FullFineTuneOptions:
    """Options of ``full_ft`` (``method.options``).

    Attributes:
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr`` (the head trains at
            ``train.lr``). A learning rate chosen for adapters or a head destroys the pretrained features when
            every backbone weight moves with it; a slower backbone is SLCA's "slow learner" (Zhang et al., ICCV
            2023: backbone 1e-4 against head 1e-2, the default ratio 0.01 here; SLCA++ uses 0.1).
    """

    #: What a saved config without the key ran with (before the option existed the backbone trained at train.lr):
    #: ``methods.with_legacy_options`` fills it in (resume and compare, learn, predict, diagnose), so such a run
    #: shows a difference instead of passing for a new one, and continues as it trained.
    LEGACY: ClassVar[dict[str, Any]] = {"backbone_lr_scale": 1.0}

    backbone_lr_scale: float = 0.01

    def __post_init__(self) -> None:
        if not self.backbone_lr_scale > 0.0:
            raise ValueError(f"backbone_lr_scale must be positive, got {self.backbone_lr_scale}")


@register_method("full_ft")
class FullFineTune(Method):
    """Full fine-tuning: every backbone parameter trains in every task, with the same growing head and loss as
    SD-LoRA (paper Table 2, first row). Nothing protects earlier tasks: an upper bound on forgetting. The backbone
    trains at ``method.options.backbone_lr_scale`` times ``train.lr``.
    """

    options_class = FullFineTuneOptions

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.model.requires_grad_(True)

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        in_backbone = {id(p) for p in self.model.parameters()}
        head: list[nn.Parameter] = []
        backbone: list[nn.Parameter] = []
        for p in self.trainable_parameters():
            (backbone if id(p) in in_backbone else head).append(p)
        # The head first: its learning rate (train.lr) is the one logged.
        return [(head, 1.0), (backbone, self.options.backbone_lr_scale)]

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        # The whole fine-tuned backbone must be kept beyond the pretrained one.
        counts["stored"] += sum(p.numel() for p in self.model.parameters())
        return counts

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        for k, v in self.model.state_dict().items():
            tensors[f"backbone.{k}"] = v.detach().cpu().contiguous().clone()
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        prefix = "backbone."
        self.model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def export_backbone(self) -> nn.Module:
        return self.model


# ----------------------------------------------------------------------------------------------- SimpleCIL
@register_method("simplecil")
class SimpleCIL(Method):
    """SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", IJCV 2024): the
    frozen pretrained backbone and one prototype per class (the mean feature of its training images, evaluation
    transforms), predicting the class of highest cosine similarity. No training at all.

    Prototypes live in the ``prototypes`` buffer (classes x features, label-position order); the linear head is
    never grown. Logits are ``scale * cos(feature, prototype)`` (``scale`` does not change the argmax).
    """

    prototypes: Tensor  # a registered buffer, declared for the type checker

    trains = False
    uses_head = False
    scale = 1.0

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.model.requires_grad_(False)
        ref = next(self.model.parameters())
        self.register_buffer("prototypes", torch.zeros(0, self.num_features, device=ref.device, dtype=torch.float32))

    def forward(self, x: Batch) -> Tensor:
        if self.prototypes.shape[0] == 0:
            raise RuntimeError("simplecil has no prototypes yet: they are computed at the end of each task")
        f = F.normalize(self.features(x).float(), dim=-1)
        p = F.normalize(self.prototypes, dim=-1)
        return self.scale * f @ p.t()

    def num_seen_classes(self) -> int:
        return int(self.prototypes.shape[0])

    def begin_task(self, ctx: TaskContext) -> None:
        """Nothing to grow or train: the prototypes of the task's classes are added in ``end_task``."""
        if self.prototypes.shape[0] != ctx.class_start:
            raise RuntimeError(
                f"simplecil holds {self.prototypes.shape[0]} prototypes but task {ctx.task} starts at class "
                f"{ctx.class_start}"
            )

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        """Prototypes of the task's classes: per-class feature sums and counts over the task's training data
        (summed over processes), then their ratio."""
        was_training = self.training
        self.eval()
        try:
            sums = torch.zeros(ctx.num_new, self.num_features, device=ctx.device, dtype=torch.float64)
            counts = torch.zeros(ctx.num_new, device=ctx.device, dtype=torch.float64)
            for x, y in ctx.statistics_batches():
                f = self.features(x).double()
                idx = (y - ctx.class_start).long()
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= ctx.num_new):
                    raise RuntimeError(f"statistics batch has labels outside [{ctx.class_start}, {ctx.class_end})")
                sums.index_add_(0, idx, f)
                counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        finally:
            self.train(was_training)
        sums = ctx.all_reduce(sums)
        counts = ctx.all_reduce(counts)
        missing = [ctx.class_start + i for i in torch.nonzero(counts == 0).flatten().tolist()]
        if missing:
            raise RuntimeError(f"simplecil: no training images for classes {missing}")
        protos = (sums / counts[:, None]).to(self.prototypes)
        self.prototypes = torch.cat([self.prototypes, protos], 0)
        return {"prototypes": int(self.prototypes.shape[0]), "images": int(counts.sum())}

    def parameter_counts(self) -> dict[str, int]:
        return {"trainable": 0, "stored": int(self.prototypes.numel())}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        tensors["prototypes"] = self.prototypes.detach().cpu().contiguous()
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.prototypes = tensors["prototypes"].to(self.prototypes)
