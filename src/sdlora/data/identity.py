"""What a run's data was, in a form that can be compared later: ``data_identity``.

A run directory records the identity of the data it trained and tested on, so that code which comes back to the
run (``--resume``, ``sdlora learn``) can tell whether the data it rebuilds from the saved config is still the same
data, instead of silently mixing two versions of a dataset.

The identity is taken after the per-class subsetting (``train_per_class``/``test_per_class``), i.e. of exactly the
samples the run uses. Its digests:

* file datasets: sha256 over the sorted ``(path relative to the dataset root, label)`` list of each split (the
  image bytes are not read: hashing a 30k-file tree would cost minutes; a renamed, added, removed or relabelled
  file changes the digest, an image edited in place does not);
* in-memory datasets (Fashion-MNIST, CIFAR-100, synthetic): sha256 over the label array and the image bytes;
* text datasets (WordNet, CSV, JSON lines, Hugging Face text): sha256 over the ``(label, text)`` pairs in order;
* image rows of a Hugging Face dataset: sha256 over the labels and each row's encoded image bytes, in order (the
  dataset's own fingerprint is not used: for data files it changes when a file is copied or touched).

This module is a leaf: numpy, torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["IDENTITY_VERSION", "data_identity", "identity_changes", "split_digest"]

#: Bumped when the way digests are computed changes (so an old identity is never compared with a new one blindly).
IDENTITY_VERSION = 1


def _relative(path: str, root: str | None) -> str:
    if root:
        rel = os.path.relpath(path, root)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return path.replace(os.sep, "/")


def split_digest(
    targets: np.ndarray,
    *,
    images: torch.Tensor | None = None,
    paths: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
    rows: Any = None,
    root: str | None = None,
) -> str:
    """sha256 of one split: labels plus image bytes (``images``), the sorted ``(relative path, label)`` list, the
    ``(label, text)`` pairs in order (``texts``), or labels plus each row's encoded image bytes (``rows``).

    Args:
        targets: int labels aligned with ``images`` or ``paths``.
        images: uint8 ``[N, C, H, W]`` images held in memory.
        paths: image file paths (made relative to ``root`` when they lie under it, so moving the dataset
            directory keeps the digest).
        texts: the texts of a text dataset (before tokenisation).
        rows: images read from another source (:class:`sdlora.data.datasets.ImageRows`: ``len`` and
            ``update_digest(h)``, which feeds each row's encoded bytes to the hash).
        root: the dataset root.

    Raises:
        ValueError: not exactly one of ``images``, ``paths`` and ``texts``, or a length mismatch.
    """
    if sum(v is not None for v in (images, paths, texts, rows)) != 1:
        raise ValueError("split_digest needs exactly one of images, paths, texts or rows")
    labels = np.asarray(targets, dtype=np.int64)
    h = hashlib.sha256()
    if rows is not None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} targets")
        h.update(b"rows|")
        h.update(labels.tobytes())
        rows.update_digest(h)
        return h.hexdigest()
    if texts is not None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} targets")
        h.update(b"texts|")
        for label, text in zip(labels.tolist(), texts, strict=True):
            data = text.encode()
            h.update(f"{label}\t{len(data)}\t".encode())  # length-prefixed: a text may hold tabs and newlines
            h.update(data)
        return h.hexdigest()
    if images is not None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} targets")
        h.update(f"images|{tuple(images.shape)}|{images.dtype}|".encode())
        h.update(labels.tobytes())
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    assert paths is not None
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} targets")
    entries = sorted(zip((_relative(p, root) for p in paths), labels.tolist(), strict=True))
    h.update(b"files|")
    for rel, label in entries:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def _counts(targets: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(int).tolist()


def data_identity(
    *,
    name: str,
    root: str | None,
    format: str | None,
    class_names: Sequence[str],
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    train_digest: str,
    test_digest: str,
) -> dict[str, Any]:
    """The JSON-able identity of a dataset as a run uses it.

    Args:
        name, root, format: the dataset's config values (``root`` as resolved by the reader).
        class_names: name of each original label (index = label).
        train_targets, test_targets: labels of the samples in use (after subsetting).
        train_digest, test_digest: :func:`split_digest` of each split.

    Returns:
        ``{"version", "name", "root", "format", "class_names", "train_counts", "test_counts", "train_sha256",
        "test_sha256", "sha256"}``; the counts are per original label (same order as ``class_names``) and
        ``sha256`` combines both splits' digests and the class names.
    """
    names = [str(c) for c in class_names]
    combined = hashlib.sha256(
        "\n".join([f"v{IDENTITY_VERSION}", train_digest, test_digest, *names]).encode()
    ).hexdigest()
    return {
        "version": IDENTITY_VERSION,
        "name": name,
        "root": root,
        "format": format,
        "class_names": names,
        "train_counts": _counts(train_targets, len(names)),
        "test_counts": _counts(test_targets, len(names)),
        "train_sha256": train_digest,
        "test_sha256": test_digest,
        "sha256": combined,
    }


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`data_identity` records, one line per kind of change (empty: the same data).

    The dataset root is not compared: moving a dataset keeps its identity (file paths are recorded relative to it).
    Records of another :data:`IDENTITY_VERSION` cannot be compared and give one line saying so.
    """
    if old.get("version") != new.get("version"):
        return [
            f"the data identity was recorded by another sdlora (version {old.get('version')} vs {new.get('version')})"
        ]
    lines = []
    for key in ("name", "format"):
        if old.get(key) != new.get(key):
            lines.append(f"dataset {key}: {old.get(key)!r} -> {new.get(key)!r}")
    old_names, new_names = list(old.get("class_names", [])), list(new.get("class_names", []))
    added = [c for c in new_names if c not in old_names]
    removed = [c for c in old_names if c not in new_names]
    if added:
        lines.append(f"classes added: {_some(added)}")
    if removed:
        lines.append(f"classes removed: {_some(removed)}")
    if not added and not removed and old_names != new_names:
        lines.append("the same classes under other labels (their order changed)")
    for split in ("train", "test"):
        old_counts = dict(zip(old_names, old.get(f"{split}_counts", []), strict=False))
        new_counts = dict(zip(new_names, new.get(f"{split}_counts", []), strict=False))
        changed = [
            f"{c} {old_counts[c]} -> {new_counts[c]}"
            for c in old_names
            if c in new_counts and old_counts.get(c) != new_counts[c]
        ]
        if changed:
            lines.append(f"{split} images per class changed: {_some(changed)}")
        if not added and not removed and not changed and old.get(f"{split}_sha256") != new.get(f"{split}_sha256"):
            what = "training" if split == "train" else "test"
            lines.append(f"{what} samples changed with the same counts per class (other files, labels or image bytes)")
    return lines
