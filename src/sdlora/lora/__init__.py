"""SD-LoRA adapters: the math of one adapted layer (``layer``), injection and task lifecycle (``model``)."""

from .config import PROTOCOLS, RR_SCHEDULE, AdapterConfig
from .layer import COMPUTE_MODES, LowRankUnit, SDLoRALinear, component_norm, route_costs
from .model import ADAPTER_FORMAT, SDLoRAModel

__all__ = [
    "ADAPTER_FORMAT",
    "COMPUTE_MODES",
    "PROTOCOLS",
    "RR_SCHEDULE",
    "AdapterConfig",
    "LowRankUnit",
    "SDLoRALinear",
    "SDLoRAModel",
    "component_norm",
    "route_costs",
]
