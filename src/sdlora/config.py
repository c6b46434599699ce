"""The run configuration: one typed dataclass tree, loaded strictly from YAML (``configtools``).

Each section is owned by the module it configures (``AdapterConfig`` by ``lora``, ``BackboneConfig`` by
``backbones``, ``DataConfig`` by ``data``); the sections owned by the engine live here. Every key a user can
write is read by the code; unknown keys and wrong types raise with their key path.

This module knows nothing of the methods (they sit above it and import ``MethodConfig``): ``method.name`` and
``method.options`` are checked by ``sdlora.methods.resolve_method_config``, which
``sdlora.methods.load_run_config`` runs as part of loading.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .alignment import AlignConfig
from .backbones import BackboneConfig
from .calibration import CalibConfig
from .configtools import ConfigError, apply_overrides, from_dict, load_yaml, override_key, to_dict
from .data import DataConfig, Scenario, make_scenario
from .lora import AdapterConfig

__all__ = [
    "MethodConfig",
    "RunConfig",
    "ScenarioConfig",
    "TrainConfig",
    "load_config",
    "preset_dir",
    "preset_names",
    "resolve_config_path",
]


@dataclass
class MethodConfig:
    """Which continual-learning method runs, and its options.

    Attributes:
        name: a registered method (``sdlora list`` shows them): ``sdlora``, ``sdlora_rr``, ``sdlora_kd``, ...
        adapter: SD-LoRA adapter options (also the LoRA shape of LoRA baselines).
        loss_scope: after the first task, cross-entropy over the current task's logits only (``current``,
            the official code and the paper's protocol, see docs/method.md) or over all seen classes (``all``).
        head_init: initialisation of each new head block: ``kaiming`` (official ``SimpleLinear``) or ``zeros``
            (every task block starts with the same common offset, which the current-task loss never changes;
            see ``heads.IncrementalLinear.grow``).
        options: the method's own options, checked against the options dataclass the method declares next to
            its code (``Method.options_class``; e.g. ``InfLoRAOptions`` in ``methods/inflora.py``) by
            ``sdlora.methods.resolve_method_config`` when a run's config is loaded. Methods without options take
            none.
        align: optional classifier alignment after each task (SLCA, ``alignment.AlignConfig``), for every method
            with a trained head; off by default and in the paper presets (a deviation from the SD-LoRA paper).
            ``sdlora_ca`` and ``seq_lora_ca`` turn it on.
        calib: optional calibrated head on class statistics that follow the backbone (drift compensation;
            ``calibration.CalibConfig``), for every method with a trained head; off by default and in the paper
            presets (a deviation). ``sdlora_calib`` and ``seq_lora_calib`` turn it on.
    """

    name: str = "sdlora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss_scope: Literal["current", "all"] = "current"
    head_init: Literal["kaiming", "zeros"] = "kaiming"
    options: dict[str, Any] = field(default_factory=dict)
    align: AlignConfig = field(default_factory=AlignConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)


@dataclass
class ScenarioConfig:
    """Class-incremental split: class order from the seed, ``init_cls`` classes first, then ``increment``.

    Attributes:
        init_cls: classes of the first task.
        increment: classes of every later task; must divide the remaining classes.
        shuffle: permute classes with ``np.random.seed(seed); np.random.permutation(n)`` (PyCIL/PILOT/SD-LoRA).
        class_order: explicit order (a permutation of all class ids); overrides ``shuffle``.
        num_tasks: run only the first ``num_tasks`` tasks (None: all).
        seed: class-order seed; None: the run's ``seed``.
    """

    init_cls: int = 10
    increment: int = 10
    shuffle: bool = True
    class_order: list[int] | None = None
    num_tasks: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        # Messages start with the field name: configtools.from_dict turns that into the full key path.
        for name in ("init_cls", "increment"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_tasks is not None and self.num_tasks <= 0:
            raise ValueError(f"num_tasks: must be positive, got {self.num_tasks}")
        if self.seed is not None:
            _check_seed("seed", self.seed)

    def make(self, num_classes: int, run_seed: int) -> Scenario:
        """The scenario over ``num_classes`` classes (``seed`` falls back to the run's seed)."""
        return make_scenario(
            num_classes,
            self.init_cls,
            self.increment,
            seed=run_seed if self.seed is None else self.seed,
            shuffle=self.shuffle,
            class_order=self.class_order,
            num_tasks=self.num_tasks,
        )


#: The run trackers ``train.log_to`` may name (:mod:`sdlora.tracking` implements them).
LOG_TO = ("mlflow", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """Optimisation, per task.

    Attributes:
        epochs: epochs per task (``first_epochs`` for the first task when given).
        batch_size: training batch size (global: divided across processes under torchrun).
        eval_batch_size: evaluation batch size.
        optimizer: ``sgd`` (momentum, as the official code), ``adam`` (the paper), ``adamw``.
        lr: learning rate (``first_lr`` for the first task when given); a new optimiser is built per task.
        momentum: SGD momentum.
        weight_decay: weight decay (``adamw``: decoupled).
        betas: Adam/AdamW betas.
        scheduler: ``constant``, ``multistep`` (``milestones``, ``gamma``, stepped per epoch), ``cosine``
            (per epoch down to ``min_lr``).
        grad_clip: max gradient norm (None: no clipping).
        amp: bfloat16 autocast on CUDA (refused on CPU with a warning, never silently).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN benchmark.
        checkpoint: write a checkpoint after every task (needed for ``--resume``).
        keep_checkpoints: keep only the newest N task checkpoints, deleting older ones once the next task is
            committed (None: keep all). ``--resume``, ``predict``, ``learn`` and ``export`` read the newest only;
            ``sdlora diagnose --task K`` needs task K's. A checkpoint holds the method's whole state (a RanPAC run's
            Gram matrix, a calibrated head's scatter), so a long run with a large head saves disk with 1.
        threads: torch intra-op threads on CPU (None: torch's default).
        log_to: run trackers that also receive the run's progress: any of ``tensorboard``, ``mlflow``, ``wandb``
            (:mod:`sdlora.tracking`; each needs its package, ``pip install 'sdlora[track]'``). Empty: none.
    """

    epochs: int = 20
    first_epochs: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 8e-3
    first_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    device: str = "auto"
    deterministic: bool = False
    checkpoint: bool = True
    keep_checkpoints: int | None = None
    threads: int | None = None
    log_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Messages start with the field name: configtools.from_dict turns that into the full key path. Every float is
        # checked for NaN/inf here, since `x <= 0` is False for NaN and the run would fail late or train on garbage.
        for name in ("lr", "first_lr", "momentum", "weight_decay", "gamma", "min_lr", "grad_clip"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name}: must be a finite number, got {v}")
        for tracker in self.log_to:
            if tracker not in LOG_TO:
                raise ValueError(f"log_to: unknown tracker {tracker!r}; known: {', '.join(LOG_TO)}")
            if self.log_to.count(tracker) > 1:
                raise ValueError(f"log_to: {tracker!r} is named twice")
        if self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0, got {self.epochs}")
        if self.first_epochs is not None and self.first_epochs < 0:
            raise ValueError(f"first_epochs: must be >= 0 or null, got {self.first_epochs}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.first_lr is not None and self.first_lr <= 0:
            raise ValueError(f"first_lr: must be positive or null, got {self.first_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2:
            raise ValueError(f"betas: must have two values, got {self.betas}")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: both must be in [0, 1), got {self.betas}")
        if self.scheduler == "multistep" and not self.milestones:
            raise ValueError(
                "milestones: scheduler 'multistep' needs milestones (epochs at which lr is multiplied by gamma)"
            )
        if any(m <= 0 for m in self.milestones) or sorted(set(self.milestones)) != list(self.milestones):
            raise ValueError(f"milestones: must be positive and increasing, got {self.milestones}")
        if self.gamma <= 0:
            raise ValueError(
                f"gamma: must be positive (the lr is multiplied by it at each milestone), got {self.gamma}"
            )
        if self.min_lr < 0:
            raise ValueError(f"min_lr: must be >= 0 (the cosine schedule ends there), got {self.min_lr}")
        if self.scheduler == "cosine" and self.min_lr > min(self.lr, self.first_lr or self.lr):
            raise ValueError(
                f"min_lr: must be below lr ({min(self.lr, self.first_lr or self.lr)}) for the cosine schedule to "
                f"decrease, got {self.min_lr}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be positive or null, got {self.grad_clip}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints <= 0:
            raise ValueError(
                f"keep_checkpoints: must be positive (the newest checkpoint is what resume, predict and learn read) "
                f"or null (keep all), got {self.keep_checkpoints}"
            )
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads: must be positive or null, got {self.threads}")

    def epochs_for(self, task: int) -> int:
        return self.first_epochs if task == 0 and self.first_epochs is not None else self.epochs

    def lr_for(self, task: int) -> float:
        return self.first_lr if task == 0 and self.first_lr is not None else self.lr


@dataclass
class RunConfig:
    """A whole experiment. ``sdlora run CONFIG.yaml`` reads one of these.

    Attributes:
        name: label used in reports (default: the config file name).
        seed: seeds torch, numpy and Python's ``random`` (and the class order unless ``scenario.seed``).
        method, backbone, data, scenario, train: see their classes.
        reference: reference numbers of the setting (e.g. ``{acc: 77.34, aaa: 82.04}`` from the paper) for
            reports; not used in training.
    """

    name: str | None = None
    seed: int = 1993
    method: MethodConfig = field(default_factory=MethodConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_seed("seed", self.seed)


def _check_seed(name: str, seed: int) -> None:
    # numpy's legacy seeding (the peers' class order) takes 32-bit seeds; a negative one fails deep inside a run.
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name}: must be in [0, 2**32), got {seed}")


def preset_dir() -> Path:
    """Directory of the presets shipped with the package (``configs/`` in the repository links to it)."""
    return Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped preset (``demo``, ``imagenet_r_n10_official``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = preset_dir() / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file() and os.sep not in name_or_path:
        return candidate
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")


def _error_source(e: ConfigError, path: Path, overrides: list[str]) -> str:
    """Who set the value an error is about: the last ``--set`` of that key (or of a section holding it), else the
    file; a section-level error (say ``train``) with an override below it names both, since either may be at fault.
    """
    for item in reversed(overrides):
        key = override_key(item)
        if key and (e.path == key or e.path.startswith(key + ".")):
            return f"--set {item}"
    below = [item for item in overrides if e.path and override_key(item).startswith(e.path + ".")]
    if below:
        return f"{path} with --set {', '.join(below)}"
    return str(path)


def load_config(
    name_or_path: str,
    overrides: list[str] | None = None,
    *,
    check: Callable[[RunConfig], object] | None = None,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[RunConfig, dict[str, Any]]:
    """Load a YAML config (path or preset name), apply ``--set`` overrides, validate.

    The method's name and options are not checked here (this module does not know the methods):
    ``sdlora.methods.load_run_config`` is this function with ``check=resolve_method_config``.

    Args:
        name_or_path: a YAML file or the name of a shipped preset.
        overrides: ``--set key=value`` items, applied in order.
        check: a further check of the typed config by a layer that knows more (it may fill values in place); its
            ``ConfigError`` is attributed to the file or override like the others.
        prepare: applied to the file's data before the overrides (a saved run's config: the values its keys had
            before they existed, ``sdlora.methods.with_legacy_options``).

    Returns:
        The typed config and its plain-data form (what is written to the run directory).

    Raises:
        ConfigError: With the key path, attributed to the file or to the ``--set`` override that set the value
            (``FILE: train.lr: reason`` or ``--set train.lr=-1: train.lr: reason``). An empty file is refused.
    """
    path = resolve_config_path(name_or_path)
    overrides = list(overrides or [])
    data = load_yaml(path)
    if not data:
        raise ConfigError(
            "the config sets no keys (an empty file would run every default: the offline ViT-S/14 at 224 px, 20 "
            "epochs per task); start from a preset (sdlora list) or a file in configs/",
            source=str(path),
        )
    if prepare is not None:
        data = prepare(data)
    data = apply_overrides(data, overrides, RunConfig)
    try:
        cfg = from_dict(RunConfig, data)
        if check is not None:
            check(cfg)
    except ConfigError as e:
        raise e.with_source(_error_source(e, path, overrides)) from None
    if cfg.name is None:
        cfg.name = path.stem
    return cfg, to_dict(cfg)
