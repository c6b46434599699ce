"""What a run's data was, in a form that can be compared later: ``data_identity``.

A run directory records the identity of the data it trained and tested on, so that code which comes back to the
run (``--resume``, ``sdlora learn``) can tell whether the data it rebuilds from the saved config is still the same
data, instead of silently mixing two versions of a dataset.

The identity is taken after the per-class subsetting (``train_per_class``/``test_per_class``), i.e. of exactly the
samples the run uses. Its digests:

* file datasets: sha256 over the sorted ``(path relative to the dataset root, label)`` list of each split (the
  image bytes are not read: hashing a 30k-file tree would cost minutes; a renamed, added, removed or relabelled
  file changes the digest, an image edited in place does not);
* in-memory datasets (Fashion-MNIST, CIFAR-100, synthetic): sha256 over the label array and the image bytes.

This module is a leaf: numpy, torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["IDENTITY_VERSION", "data_identity", "split_digest"]

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
    root: str | None = None,
) -> str:
    """sha256 of one split: labels plus image bytes (``images``) or the sorted ``(relative path, label)`` list.

    Args:
        targets: int labels aligned with ``images`` or ``paths``.
        images: uint8 ``[N, C, H, W]`` images held in memory.
        paths: image file paths (made relative to ``root`` when they lie under it, so moving the dataset
            directory keeps the digest).
        root: the dataset root.

    Raises:
        ValueError: neither or both of ``images`` and ``paths``, or a length mismatch.
    """
    if (images is None) == (paths is None):
        raise ValueError("split_digest needs exactly one of images or paths")
    labels = np.asarray(targets, dtype=np.int64)
    h = hashlib.sha256()
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
