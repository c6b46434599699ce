"""Continual-learning methods behind one registry (``METHODS``); importing this package registers them."""

from . import (
    baselines,  # noqa: F401  (registers seq_lora, seq_lora_ca, seq_lora_calib, full_ft, simplecil, sdlora_ablation_*)
    inflora,  # noqa: F401  (registers inflora)
    lora_merge,  # noqa: F401  (registers lora_merge)
    prompts,  # noqa: F401  (registers l2p, coda_prompt)
    ranpac,  # noqa: F401  (registers ranpac)
    sdlora,  # noqa: F401  (registers sdlora, sdlora_rr, sdlora_kd, sdlora_ca, sdlora_calib)
)
from .base import (
    METHODS,
    LowRankUpdate,
    Method,
    NoOptions,
    TaskContext,
    UnsupportedBackbone,
    create_method,
    parse_options,
    register_method,
)
from .options import load_run_config, resolve_method_config, with_legacy_options

__all__ = [
    "METHODS",
    "LowRankUpdate",
    "Method",
    "NoOptions",
    "TaskContext",
    "UnsupportedBackbone",
    "create_method",
    "load_run_config",
    "parse_options",
    "register_method",
    "resolve_method_config",
    "with_legacy_options",
]
