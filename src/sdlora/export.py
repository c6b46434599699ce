"""Hand what a run learned to other tools: ``sdlora export RUN_DIR --out PATH [--format merged|peft]``.

``merged`` (the default): the backbone with everything learned folded into its weights. For a timm backbone one
safetensors file (``safetensors``; same keys as the original backbone, its metadata says how to rebuild the
architecture and normalise inputs); for a Hugging Face ``hf:`` backbone a ``save_pretrained`` directory with the
tokenizer of text models (``hf``), which ``transformers.AutoModel.from_pretrained`` loads.

``peft``: a standard PEFT LoRA adapter directory, exact for inference. After task t an SD-LoRA layer computes
``W0 + sum_k s_k B_k A_k`` (s_k: magnitude, KD increment and normaliser of component k, as the forward uses them),
which is one LoRA of rank ``R = sum_k r_k`` with ``B' = [s_1 B_1 ... s_t B_t]`` and ``A' = [A_1; ...; A_t]``; on a
fused qkv projection the q and v units sit side by side with zero rows for k. Each adapted module gets
``lora_alpha = r`` (scaling 1); ranks that differ between modules (SD-LoRA-RR, KD absorption) go into
``rank_pattern``/``alpha_pattern``. The directory also holds the classifier (``classifier.safetensors``: the keys
of the timm model's classifier for ``num_classes`` = classes seen), the class names (``labels.txt``), the
unadapted backbone the adapter applies to (``base_model.safetensors``, unless ``include_base=False``), a
description (``sdlora_export.json``) and a README with the loading code. Tested with peft
:data:`PEFT_VERSION_TESTED`.

For a Hugging Face ``hf:`` backbone the adapter applies to the ``transformers`` model itself (module names as
``AutoModel`` names them, without sdlora's ``hf.`` wrapper prefix), so it loads with
``PeftModel.from_pretrained(AutoModel.from_pretrained(base), DIR)``; the base is a ``save_pretrained`` directory
``base/`` (unless ``include_base=False``: then the run's original model), the classifier is an
``nn.Linear(hidden_size, classes)`` state dict (``weight``, ``bias``), text runs add the tokenizer (saved in the
export directory itself), and the README shows the pooling (``cls`` or ``mean``, as the run recorded) that turns
``last_hidden_state`` into the features the classifier takes.

Only methods whose update is low-rank export to PEFT (the SD-LoRA family, seq_lora, the ablations, InfLoRA);
``full_ft`` and ``simplecil`` are refused with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .config import RunConfig
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from .methods import LowRankUpdate, Method

__all__ = [
    "EXPORT_FORMATS",
    "HF_FORMAT",
    "MERGED_FORMAT",
    "PEFT_EXPORT_FORMAT",
    "PEFT_VERSION_TESTED",
    "ExportError",
    "export_merged",
    "export_peft",
    "load_hint",
    "peft_adapter",
    "write_peft_export",
]

MERGED_FORMAT = "sdlora-merged-backbone/1"
HF_FORMAT = "sdlora-merged-hf/1"
PEFT_EXPORT_FORMAT = "sdlora-peft-export/1"
#: The peft release the PEFT export is tested against (tests/test_export.py loads it with PeftModel).
PEFT_VERSION_TESTED = "0.21.2"
EXPORT_FORMATS = ("merged", "safetensors", "hf", "peft")

_MARKER = "sdlora_export.json"


class ExportError(ValueError):
    """The run cannot be exported in the asked format, or the output path is unusable."""


@dataclass
class ExportSummary:
    """What an export wrote: ``path``, a one-line ``description``, the Python ``load_hint`` and further ``notes``."""

    path: Path
    description: str
    load_hint: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- helpers
def _timm_architecture(model: nn.Module) -> str | None:
    """The timm model name that rebuilds ``model`` (``pretrained_cfg.architecture``), if timm knows it."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        return None
    try:
        import timm

        return str(arch) if timm.is_model(arch) else None
    except ImportError:
        return None


def _timm_kwargs(cfg: Any) -> dict[str, Any]:
    return {"img_size": cfg.data.image_size, **cfg.backbone.kwargs}


def _classifier_name(model: nn.Module) -> str:
    """Module name of the model's classifier (timm: ``get_classifier()``, ``head`` for ViTs)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        target = get()
        for name, module in model.named_modules():
            if module is target and name:
                return name
    return "head"


def _state_cpu(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ merged
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _staging_siblings(target: Path) -> list[Path]:
    """Staging (``.tmp``) and set-aside (``.old``) directories that earlier exports to ``target`` left behind."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(tmp|old)$")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.match(p.name) and p.is_dir())


def _recover_staging(target: Path) -> None:
    """Clean up after exports to ``target`` that were killed: an earlier export set aside (``.old``) while
    ``target`` is missing (killed between the two renames of the fallback install) is put back; every other
    staging directory (a half-written ``.tmp``, an ``.old`` already replaced) is deleted. Not safe against a
    second export to the same ``--out`` running at the same time (one export per target)."""
    left = _staging_siblings(target)
    if not target.exists():
        old = [p for p in left if p.name.endswith(".old")]
        if old:
            os.replace(old[-1], target)
            left.remove(old[-1])
    for p in left:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """A fresh directory next to ``target`` to write an export into; put at ``target`` when the block ends without
    an error, deleted when the block raises. An earlier export at ``target`` is swapped with the new one in one
    step where the system can (Linux ``renameat2``), so ``target`` always holds one whole export, the old or the
    new one; elsewhere it is moved aside first and a kill between the two renames is repaired by the next export
    (:func:`_recover_staging`), which also deletes what killed exports left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_staging(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # holds the earlier export now
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_merged_file_target(out: Path) -> None:
    """``out`` may be new or an earlier merged export (its safetensors metadata says so); anything else, such as a
    run's own ``results.json`` or a checkpoint, is never replaced."""
    if not out.exists():
        return
    fmt = None
    if out.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(out), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:  # not a safetensors file at all
            fmt = None
    if fmt != MERGED_FORMAT:
        raise ExportError(
            f"{out} exists and is not an earlier sdlora merged export; choose a new --out file (an export never "
            "replaces other files)"
        )


def load_hint(rebuild: dict[str, Any], weights: str) -> str:
    """One line of Python (after ``import timm, safetensors.torch``) that builds the bare architecture described by
    ``rebuild`` (``Backbone.rebuild``) and loads the exported weights into it."""
    args = ", ".join(f"{k}={v!r}" for k, v in rebuild["kwargs"].items())  # Python literals (JSON's true is not)
    if "timm_class" in rebuild:
        build = f"{rebuild['timm_class']}({args})"
    else:
        build = f"timm.create_model({rebuild['timm_model']!r}, pretrained=False{', ' + args if args else ''})"
    return f"{build}.load_state_dict(safetensors.torch.load_file({weights!r}))"


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "merged") -> ExportSummary:
    """Write the merged backbone of a run: a safetensors file for timm backbones (``fmt`` ``merged`` or
    ``safetensors``), a ``save_pretrained`` directory for Hugging Face ``hf:`` backbones (``merged`` or ``hf``).

    Raises:
        ExportError: ``fmt`` does not fit the run's backbone, or ``out`` holds something else (hf directories).
    """
    from .backbones.hf import HFFeatureExtractor
    from .rundir import build_method_from_run

    if fmt not in ("merged", "safetensors", "hf"):
        raise ExportError(f"unknown merged format {fmt!r}")
    if Path(out).is_file() or (Path(out).exists() and fmt == "safetensors"):
        _check_merged_file_target(Path(out))  # before the work: a file that is not ours is never replaced
    method, cfg, record = build_method_from_run(run_dir)
    plain = method.export_backbone()
    is_hf = isinstance(plain, HFFeatureExtractor)
    if fmt == "hf" and not is_hf:
        raise ExportError(f"--format hf needs a Hugging Face (hf:) backbone; this run used {cfg.backbone.name!r}")
    if fmt == "safetensors" and is_hf:
        raise ExportError(
            f"the run's backbone {cfg.backbone.name!r} is a Hugging Face model: export it with --format hf "
            "(a save_pretrained directory that AutoModel.from_pretrained loads)"
        )
    if is_hf:
        assert isinstance(plain, HFFeatureExtractor)
        return _export_hf(plain, cfg, record, method.backbone_info, Path(out))
    return _export_safetensors(plain, cfg, record, method.backbone_info, Path(out))


def _export_safetensors(
    plain: nn.Module, cfg: Any, record: dict[str, Any], info: dict[str, Any], out: Path
) -> ExportSummary:
    from safetensors.torch import save

    state = _state_cpu(plain)
    rebuild = info.get("rebuild")
    if rebuild is None:  # a backbone that does not say how to rebuild it: its timm architecture, as timm names it
        arch = (getattr(plain, "pretrained_cfg", None) or {}).get("architecture") or type(plain).__name__
        rebuild = {"timm_model": arch, "kwargs": {"num_classes": 0, **_timm_kwargs(cfg)}}
    mean, std = info.get("mean", [0.0, 0.0, 0.0]), info.get("std", [1.0, 1.0, 1.0])
    metadata = {
        "format": MERGED_FORMAT,
        "backbone": str(cfg.backbone.name),
        # How to build the architecture before load_state_dict (the sdlora backbone name may be an alias).
        "timm_architecture": str(rebuild.get("timm_model") or rebuild.get("timm_class")),
        "timm_kwargs": json.dumps(rebuild["kwargs"]),
        "load_with": load_hint(rebuild, "<this file>"),
        # The input the weights expect: the run's test-time preprocessing (data/transforms.py).
        "image_size": str(cfg.data.image_size),
        "input_normalize": str(info.get("normalize")),
        "input_mean": json.dumps(mean),
        "input_std": json.dumps(std),
        "input": (
            f"RGB, shorter side resized to floor({cfg.data.image_size} * 256 / 224) (bicubic), center crop "
            f"{cfg.data.image_size}, scaled to [0, 1], then (x - mean) / std with input_mean and input_std"
        ),
        "weights_tag": str(info.get("tag")),
        "method": cfg.method.name,
        "completed_tasks": str(record["task"] + 1),
    }
    _check_merged_file_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(state, metadata=metadata))
    return ExportSummary(
        out,
        f"{len(state)} tensors of the merged backbone after task {record['task'] + 1}",
        f"import timm, safetensors.torch; {load_hint(rebuild, str(out))}",
        [f"inputs: {cfg.data.image_size} px RGB in [0, 1], normalised with mean {mean} and std {std}"],
    )


def _export_hf(plain: Any, cfg: Any, record: dict[str, Any], info: dict[str, Any], out: Path) -> ExportSummary:
    """Write the merged ``transformers`` model with ``save_pretrained`` (plus its tokenizer for text) into ``out``.

    The directory is written next to ``out`` and renamed into place; an existing ``out`` is replaced only when it
    holds an earlier sdlora export (its marker file), never other files.
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / _MARKER).is_file())):
        raise ExportError(
            f"{out} exists and is not an earlier sdlora export; choose a new --out directory for the hf format"
        )
    with _staged_dir(out) as tmp:
        plain.hf.save_pretrained(str(tmp))
        if plain.modality == "text":
            from .backbones.hf import load_tokenizer

            load_tokenizer(cfg.backbone).save_pretrained(str(tmp))
        meta = {
            "format": HF_FORMAT,
            "backbone": str(cfg.backbone.name),
            "weights_tag": info.get("tag"),
            "weights_sha256": info.get("weights_sha256"),
            "model_class": type(plain.hf).__name__,
            "modality": plain.modality,
            "pooling": plain.pooling,
            "max_length": cfg.data.max_length if plain.modality == "text" else None,
            "image_size": cfg.data.image_size if plain.modality == "image" else None,
            "method": cfg.method.name,
            "completed_tasks": record["task"] + 1,
        }
        atomic_write_json(tmp / _MARKER, meta)
    pooled = (
        "mean of last_hidden_state over the tokens attention_mask keeps"
        if plain.pooling == "mean" and plain.modality == "text"
        else "mean of last_hidden_state over the patch tokens"
        if plain.pooling == "mean"
        else "last_hidden_state[:, 0]"
    )
    return ExportSummary(
        out,
        f"merged {type(plain.hf).__name__} after task {record['task'] + 1} ({cfg.method.name})",
        f"transformers.AutoModel.from_pretrained({str(out)!r}); features = {pooled}",
    )


# -------------------------------------------------------------------------------------------------- PEFT
def peft_adapter(update: LowRankUpdate, base_name: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT LoRA adapter (``adapter_config.json`` content, ``adapter_model.safetensors`` tensors) computing
    exactly ``update``.

    Every module of ``update.factors`` becomes a LoRA target with ``lora_A = A``, ``lora_B = B`` and
    ``lora_alpha = r`` (PEFT scales by ``lora_alpha / r`` = 1). ``r`` is the most common rank; modules of another
    rank are listed, as escaped full names, in ``rank_pattern`` and ``alpha_pattern``.

    Raises:
        ExportError: nothing learned yet (no factors).
    """
    ranks = {name: int(a.shape[0]) for name, (a, _) in update.factors.items()}
    if not ranks:
        raise ExportError("the adapter holds no component yet: nothing to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the end of a module name ("(.*\.)?(key)$"): escape the dots.
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "revision": None,
        "auto_mapping": {
            "base_model_class": type(update.base).__name__,
            "parent_library": type(update.base).__module__,
        },
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in update.factors.items():
        # PEFT's saved key layout: the PeftModel prefix, no adapter name.
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous().clone()
    return config, tensors


def _peft_readme_hf(meta: dict[str, Any], has_base: bool) -> str:
    """README of a PEFT export over a Hugging Face model: loading, preprocessing and pooling, runnable as shown."""
    text = meta["modality"] == "text"
    base = '"base"' if has_base else repr(meta["base_model"])
    base_expr = 'f"{d}/base"' if has_base else repr(meta["base_model"])
    lines = [
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        f"from transformers import AutoModel{', AutoTokenizer' if text else ''}",
        "",
        'd = "."  # this directory',
        'labels = open(f"{d}/labels.txt", encoding="utf-8").read().splitlines()',
        f"model = PeftModel.from_pretrained(AutoModel.from_pretrained({base_expr}), d).eval()",
        "# (model.merge_and_unload() folds the adapter in: the bare model's cost)",
        f"head = torch.nn.Linear({meta['hidden_size']}, len(labels))",
        'head.load_state_dict(load_file(f"{d}/classifier.safetensors"))  # strict',
        "",
    ]
    if text:
        lines += [
            "tokenizer = AutoTokenizer.from_pretrained(d)",
            'texts = ["a text to classify", "another one"]',
            f"batch = tokenizer(texts, padding=True, truncation=True, max_length={meta['max_length']}, "
            'return_tensors="pt")',
            "with torch.no_grad():",
            "    hidden = model(**batch).last_hidden_state",
        ]
        if meta["pooling"] == "mean":
            lines += [
                '    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
                "    features = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mean over the kept tokens",
            ]
        else:
            lines += ["    features = hidden[:, 0]  # the first ([CLS]) token"]
    else:
        flag = ", interpolate_pos_encoding=True" if meta["interpolate_pos_encoding"] else ""
        lines += [
            f"x = ...  # [B, 3, {meta['preprocessing']['crop']}, {meta['preprocessing']['crop']}] float, "
            "preprocessed as below",
            "with torch.no_grad():",
            f"    hidden = model(pixel_values=x{flag}).last_hidden_state",
        ]
        if meta["pooling"] == "mean":
            lines += [f"    features = hidden[:, {meta['prefix_tokens']}:].mean(1)  # mean over the patch tokens"]
        else:
            lines += ["    features = hidden[:, 0]  # the class token"]
    lines += ["    logits = head(features)", "print([labels[i] for i in logits.argmax(1)])"]
    out = (
        f"# sdlora export: PEFT LoRA adapter + classifier\n\n"
        f"Run: method `{meta['method']}`, {meta['completed_tasks']} task(s), {meta['num_classes']} classes; "
        f"backbone `{meta['backbone']}` ({meta['model_class']}, {meta['modality']}, pooling `{meta['pooling']}`; "
        f"weights {meta['weights_tag']}).\n\n"
        f"The adapter is exact: with the pooling below it gives the features sdlora computes (tested with peft "
        f"{PEFT_VERSION_TESTED}). It applies to the transformers model itself (module names as AutoModel names "
        "them).\n\n"
    )
    if has_base:
        out += "`base/` is the unadapted model (save_pretrained), the one the adapter was trained on.\n\n"
    else:
        out += (
            f"The base model is not included: load {base} (weights sha256 {meta['weights_sha256']}), the model the "
            "adapter was trained on.\n\n"
        )
    out += "```python\n" + "\n".join(lines) + "\n```\n"
    if text:
        out += (
            f"\nTexts are tokenised as in training: truncated to {meta['max_length']} tokens (sdlora pads to that "
            "length and drops the padding no text of a batch uses; padding does not change the features).\n"
        )
    else:
        pre = meta["preprocessing"]
        out += (
            f"\nInputs: RGB, shorter side resized to {pre['resize']} px (bicubic, antialiased), centre crop "
            f"{pre['crop']} px, values in [0, 1], then (x - mean) / std with mean {pre['mean']} and std "
            f"{pre['std']}.\n"
        )
    return out


def _peft_readme(meta: dict[str, Any], has_base: bool) -> str:
    arch = meta["timm_architecture"]
    kwargs = json.dumps(meta["timm_kwargs"])
    pre = meta["preprocessing"]
    if arch is None:
        build = (
            "# This backbone is not a timm model name: build it as sdlora does\n"
            "from sdlora.backbones import BackboneConfig, create_backbone\n"
            f"model = create_backbone(BackboneConfig(**{meta['backbone_config']!r}), "
            f"{meta['timm_kwargs']['img_size']}).model\n"
            "model.reset_classifier(len(labels))\n"
        )
    else:
        build = (
            f"model = timm.create_model({arch!r}, pretrained={not has_base}, num_classes=len(labels), **{kwargs})\n"
        )
    load = (
        'model.load_state_dict({**load_file(f"{d}/base_model.safetensors"), '
        '**load_file(f"{d}/classifier.safetensors")})  # strict\n'
        if has_base
        else 'missing, unexpected = model.load_state_dict(load_file(f"{d}/classifier.safetensors"), strict=False)\n'
    )
    return (
        f"# sdlora export: PEFT LoRA adapter + classifier\n\n"
        f"Run: method `{meta['method']}`, {meta['completed_tasks']} task(s), {meta['num_classes']} classes; "
        f"backbone `{meta['backbone']}` (weights {meta['weights_tag']}).\n\n"
        f"The adapter is exact: it computes what sdlora computes (tested with peft {PEFT_VERSION_TESTED}).\n\n"
        "```python\n"
        "import timm, torch\n"
        "from peft import PeftModel\n"
        "from safetensors.torch import load_file\n\n"
        'd = "."  # this directory\n'
        'labels = open(f"{d}/labels.txt", encoding="utf-8").read().splitlines()\n'
        f"{build}{load}"
        "model = PeftModel.from_pretrained(model, d).eval()  # or .merge_and_unload() for bare-backbone cost\n"
        "```\n\n"
        f"Inputs: RGB, shorter side resized to {pre['resize']} px (bicubic, antialiased), centre crop "
        f"{pre['crop']} px, values in [0, 1], then (x - mean) / std with mean {pre['mean']} and std {pre['std']}. "
        "`labels[logits.argmax(1)]` names the prediction.\n"
    )


def export_peft(run_dir: str | os.PathLike, out: str | os.PathLike, *, include_base: bool = True) -> ExportSummary:
    """Write a run's adapter (newest checkpoint) as a PEFT LoRA directory with its classifier and class names
    (see the module docstring and :func:`write_peft_export`).

    Raises:
        ExportError: the method's update is not low-rank, nothing was learned yet, or ``out`` is in use.
        RunError: not a run directory or no checkpoint.
    """
    from .predict import run_class_names
    from .rundir import build_method_from_run

    _check_target(Path(out))
    method, cfg, record = build_method_from_run(run_dir)
    head = method.classifier()
    names = run_class_names(run_dir, cfg, int(head[0].shape[0])) if head is not None else []
    return write_peft_export(
        method, out, config=cfg, completed_tasks=int(record["task"]) + 1, class_names=names, include_base=include_base
    )


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / _MARKER).exists())):
        raise ExportError(
            f"{target} exists and is not an earlier sdlora PEFT export; choose an empty or new --out directory"
        )


def write_peft_export(
    method: Method,
    out: str | os.PathLike,
    *,
    config: RunConfig,
    completed_tasks: int,
    class_names: list[str],
    include_base: bool = True,
) -> ExportSummary:
    """Write ``method``'s adapter, classifier and class names as a PEFT export directory ``out``.

    The directory is built next to ``out`` and renamed into place, so an interrupted export leaves no partial
    directory; an existing earlier export in ``out`` is replaced, any other non-empty ``out`` is refused.

    Args:
        method: a method of the run described by ``config`` (its ``classifier()`` rows are ``class_names``).
        config: the run's config (backbone and preprocessing are recorded from it).
        completed_tasks: tasks the method has learned (recorded).
        class_names: names of the classifier's rows, in order.
        include_base: also write ``base_model.safetensors`` (the backbone before training).

    Raises:
        ExportError: the method's update is not low-rank or it has no linear classifier, nothing was learned
            yet, the class names do not match the classifier, or ``out`` is in use.
    """
    from safetensors.torch import save

    target = Path(out)
    _check_target(target)
    cfg = config
    update = method.low_rank_update()
    if update is None:
        raise ExportError(
            f"method {cfg.method.name!r} has no low-rank adapter over the untouched backbone to express in PEFT "
            "(full_ft changes every weight, simplecil and ranpac keep it, lora_merge folds each task in, the prompt "
            "methods prefix attention); use --format merged for its backbone"
        )
    head = method.classifier()
    if head is None and method.calib is not None:
        both = method.calib_config.features == "both"
        raise ExportError(
            f"this run predicts with method.calib.head={method.calib_config.head!r}"
            f"{' on a random projection' if method.calib_config.projection_dim else ''}"
            f"{' with the frozen backbone features beside the adapted ones' if both else ''}"
            ", which is not a linear map of the adapted features, so a PEFT classifier cannot carry it; use `sdlora "
            "predict RUN_DIR` (it predicts with that head) or a run with method.calib.head=ridge, features=adapted "
            "and projection_dim 0 (linear, exported exactly)"
        )
    if head is None:
        raise ExportError(f"method {cfg.method.name!r} has no linear classifier over its features to export")
    names = list(class_names)
    if len(names) != head[0].shape[0]:
        raise ExportError(f"{len(names)} class names for a classifier of {head[0].shape[0]} classes")
    from .backbones.hf import HFFeatureExtractor

    extractor = update.base if isinstance(update.base, HFFeatureExtractor) else None
    base_name: str | None
    if extractor is not None:
        update, base_name = _hf_update(update, extractor, cfg)
        arch = None
        clf_name = ""  # an nn.Linear(hidden_size, classes): keys weight, bias
    else:
        arch = base_name = _timm_architecture(update.base)
        clf_name = _classifier_name(update.base) + "."
    adapter_config, adapter_tensors = peft_adapter(update, base_name=base_name)
    classifier = {
        f"{clf_name}weight": head[0].detach().cpu().contiguous().clone(),
        f"{clf_name}bias": head[1].detach().cpu().contiguous().clone(),
    }
    ranks = {n: int(a.shape[0]) for n, (a, _) in update.factors.items()}
    meta = _peft_meta(
        method, cfg, extractor, arch, base_name, ranks, sorted(classifier), names, completed_tasks, include_base
    )
    with _staged_dir(target) as tmp:
        atomic_write_json(tmp / "adapter_config.json", adapter_config)
        files = {
            "adapter_model.safetensors": save(adapter_tensors, metadata={"format": "pt"}),
            "classifier.safetensors": save(classifier, metadata={"format": "pt"}),
        }
        if include_base and extractor is None:
            files["base_model.safetensors"] = save(_state_cpu(update.base), metadata={"format": "pt"})
        for fname, blob in files.items():
            atomic_write_bytes(tmp / fname, blob)
        if extractor is not None:
            _write_hf_extras(tmp, extractor, cfg, include_base)
        atomic_write_text(tmp / "labels.txt", "".join(f"{n}\n" for n in names))
        meta["files"] = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        readme = _peft_readme(meta, include_base) if extractor is None else _peft_readme_hf(meta, include_base)
        atomic_write_text(tmp / "README.md", readme)
        atomic_write_json(tmp / _MARKER, meta)
    return _peft_summary(target, meta, cfg, include_base, completed_tasks)


def _peft_meta(
    method: Method,
    cfg: RunConfig,
    extractor: Any,
    arch: str | None,
    base_name: str | None,
    ranks: dict[str, int],
    classifier_keys: list[str],
    names: list[str],
    completed_tasks: int,
    include_base: bool,
) -> dict[str, Any]:
    """The export's record (``sdlora_export.json``) without its ``files`` digests: what was learned, on which
    backbone, with which preprocessing; the timm or transformers facts a loader needs."""
    from .data.transforms import resize_size_for

    info = method.backbone_info
    meta: dict[str, Any] = {
        "format": PEFT_EXPORT_FORMAT,
        "peft_version_tested": PEFT_VERSION_TESTED,
        "method": cfg.method.name,
        "protocol": method.protocol,
        "completed_tasks": int(completed_tasks),
        "num_classes": len(names),
        "class_names": names,
        "backbone": cfg.backbone.name,
        "backbone_config": {
            "name": cfg.backbone.name,
            "pretrained": cfg.backbone.pretrained,
            "weights": cfg.backbone.weights,
            "kwargs": dict(cfg.backbone.kwargs),
        },
        "weights_tag": info.get("tag"),
        "weights_sha256": info.get("weights_sha256"),
        "classifier_keys": classifier_keys,
        "preprocessing": {
            "crop": cfg.data.image_size,
            "resize": resize_size_for(cfg.data.image_size),
            "interpolation": "bicubic",
            "mean": list(info["mean"]),
            "std": list(info["std"]),
        },
        "adapter_ranks": ranks,
        "total_rank": sum(ranks.values()),
        "files": {},
    }
    if extractor is None:
        meta.update(library="timm", timm_architecture=arch, timm_kwargs=_timm_kwargs(cfg))
    else:
        meta.update(
            library="transformers",
            base_model=base_name,
            base_included=include_base,
            model_class=type(extractor.hf).__name__,
            hidden_size=extractor.num_features,
            modality=extractor.modality,
            pooling=extractor.pooling,
            prefix_tokens=extractor.prefix_tokens,
            interpolate_pos_encoding=extractor.interpolate_pos_encoding,
            max_length=cfg.data.max_length if extractor.modality == "text" else None,
        )
        if extractor.modality == "text":
            del meta["preprocessing"]
    return meta


def _write_hf_extras(tmp: Path, extractor: Any, cfg: RunConfig, include_base: bool) -> None:
    """What a transformers export adds: the unadapted model as a ``save_pretrained`` directory ``base/`` and, for
    text models, the tokenizer."""
    if include_base:
        hf_model: Any = extractor.hf  # a transformers PreTrainedModel (W0: the unadapted copy)
        hf_model.save_pretrained(str(tmp / "base"))
    if extractor.modality == "text":
        from .backbones.hf import load_tokenizer

        load_tokenizer(cfg.backbone).save_pretrained(str(tmp))


def _peft_summary(
    target: Path, meta: dict[str, Any], cfg: RunConfig, include_base: bool, completed_tasks: int
) -> ExportSummary:
    """What ``sdlora export --format peft`` prints about the directory it wrote."""
    ranks, names = meta["adapter_ranks"], meta["class_names"]
    transformers = meta["library"] == "transformers"
    desc = (
        f"PEFT LoRA adapter on {len(ranks)} module(s) (total rank {meta['total_rank']}), classifier for "
        f"{len(names)} classes" + (", base backbone" if include_base else "") + f", after task {completed_tasks}"
    )
    notes = []
    if transformers:
        notes.append(
            f"the adapter applies to the transformers {meta['model_class']} itself; features = {meta['pooling']} "
            "pooling of last_hidden_state (README.md)"
        )
        if not include_base and not cfg.backbone.pretrained:
            notes.append(
                "the run's backbone was randomly initialised (backbone.pretrained=false): without base/ nothing "
                "outside this run has its weights; export again without --no-base"
            )
    return ExportSummary(target, desc, f"see {target / 'README.md'}", notes)


def _hf_update(update: LowRankUpdate, extractor: Any, cfg: RunConfig) -> tuple[LowRankUpdate, str]:
    """``update`` over sdlora's :class:`~sdlora.backbones.hf.HFFeatureExtractor`, re-expressed over the
    ``transformers`` model it wraps (``extractor.hf``: module names without the ``hf.`` prefix), and the name of
    the original model (hub id or local directory) for ``base_model_name_or_path``."""
    from .backbones.hf import hf_source

    outside = [n for n in update.factors if not n.startswith("hf.")]
    if outside:
        raise ExportError(
            f"adapted modules {outside} are outside the transformers model (sdlora's wrapper names its modules "
            "hf.<name>); set method.adapter.targets to attention projections of the model"
        )
    factors = {name.removeprefix("hf."): f for name, f in update.factors.items()}
    try:
        source = hf_source(cfg.backbone)[0]
    except (OSError, ValueError):  # the original directory is gone: the name is only a record here
        source = cfg.backbone.name.removeprefix("hf:")
    return LowRankUpdate(extractor.hf, factors), source
