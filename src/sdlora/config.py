"""The run configuration: one typed dataclass tree, loaded strictly from YAML (``configtools``).

Each section is owned by the module it configures (``AdapterConfig`` by ``lora``, ``BackboneConfig`` by
``backbones``, ``DataConfig`` by ``data``); the sections owned by the engine live here. Every key a user can
write is read by the code; unknown keys and wrong types raise with their key path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .alignment import AlignConfig
from .backbones import BackboneConfig
from .configtools import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .data import DataConfig
from .lora import AdapterConfig

__all__ = [
    "MethodConfig",
    "RunConfig",
    "ScenarioConfig",
    "TrainConfig",
    "load_config",
    "resolve_method_config",
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
            its code (``Method.options_class``; e.g. ``InfLoRAOptions`` in ``methods/inflora.py``) when the config
            is loaded. Methods without options take none.
        align: optional classifier alignment after each task (SLCA, ``alignment.AlignConfig``), for every method
            with a trained head; off by default and in the paper presets (a deviation from the SD-LoRA paper).
            ``sdlora_ca`` and ``seq_lora_ca`` turn it on.
    """

    name: str = "sdlora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss_scope: Literal["current", "all"] = "current"
    head_init: Literal["kaiming", "zeros"] = "kaiming"
    options: dict[str, Any] = field(default_factory=dict)
    align: AlignConfig = field(default_factory=AlignConfig)


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
        if self.init_cls <= 0 or self.increment <= 0:
            raise ValueError(f"init_cls and increment must be positive, got {self.init_cls}, {self.increment}")
        if self.num_tasks is not None and self.num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {self.num_tasks}")


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
        threads: torch intra-op threads on CPU (None: torch's default).
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
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or (self.first_epochs is not None and self.first_epochs < 0):
            raise ValueError("epochs must be >= 0")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError("batch sizes must be positive")
        if self.lr <= 0 or (self.first_lr is not None and self.first_lr <= 0):
            raise ValueError("lr must be positive")
        if len(self.betas) != 2:
            raise ValueError(f"betas must have two values, got {self.betas}")
        if self.scheduler == "multistep" and not self.milestones:
            raise ValueError("scheduler 'multistep' needs milestones (epochs at which lr is multiplied by gamma)")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("grad_clip must be positive or null")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError("threads must be positive or null")

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


def resolve_method_config(cfg: RunConfig) -> RunConfig:
    """Check ``method.name`` against the registry and ``method.options`` against the method's options dataclass,
    filling the options' defaults in place (so the saved config lists every option). Returns ``cfg``.

    Raises:
        ConfigError: unknown method (the message lists the registered ones) or bad options (with the key path).
    """
    from .methods import METHODS, parse_options

    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}", "method.name")
    cfg.method.options = to_dict(parse_options(METHODS[name], cfg.method.options))
    return cfg


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


def load_config(name_or_path: str, overrides: list[str] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """Load a YAML config (path or preset name), apply ``--set`` overrides, validate.

    Returns:
        The typed config and its plain-data form (what is written to the run directory).
    """
    path = resolve_config_path(name_or_path)
    data = load_yaml(path)
    data = apply_overrides(data, overrides or [], RunConfig)
    try:
        cfg = from_dict(RunConfig, data)
        resolve_method_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.path) from None
    if cfg.name is None:
        cfg.name = path.stem
    return cfg, to_dict(cfg)
