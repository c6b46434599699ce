"""SD-LoRA adapters: the math of one adapted layer (``layer``), injection and task lifecycle (``model``), module
surgery and the fused-qkv layout shared by every adapter (``surgery``)."""

from .config import PROTOCOLS, RR_SCHEDULE, AdapterConfig
from .layer import LowRankUnit, SDLoRALinear, component_norm
from .model import ADAPTER_FORMAT, SDLoRAModel
from .surgery import QKV_ORDER, find_linears, is_fused_qkv, qkv_slices, replace_submodule

__all__ = [
    "ADAPTER_FORMAT",
    "PROTOCOLS",
    "QKV_ORDER",
    "RR_SCHEDULE",
    "AdapterConfig",
    "LowRankUnit",
    "SDLoRALinear",
    "SDLoRAModel",
    "component_norm",
    "find_linears",
    "is_fused_qkv",
    "qkv_slices",
    "replace_submodule",
]
