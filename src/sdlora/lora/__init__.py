"""SD-LoRA adapters: the math of one adapted layer (``layer``), injection and task lifecycle (``model``)."""

from .config import PROTOCOLS, RR_SCHEDULE, AdapterConfig
from .layer import LowRankUnit, SDLoRALinear, component_norm
from .model import ADAPTER_FORMAT, SDLoRAModel

__all__ = [
    "ADAPTER_FORMAT",
    "PROTOCOLS",
    "RR_SCHEDULE",
    "AdapterConfig",
    "LowRankUnit",
    "SDLoRALinear",
    "SDLoRAModel",
    "component_norm",
]
