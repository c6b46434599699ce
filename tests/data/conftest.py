"""Helpers that write tiny dataset trees and files into ``tmp_path``."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    """Write a small solid-colour RGB PNG (``value`` sets the red channel, so tests can tell images apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*size, 3), 40, dtype=np.uint8)
    img[..., 0] = value
    Image.fromarray(img).save(path)
    return path


def write_tree(root: Path, counts: dict[str, int], ext: str = ".png") -> list[Path]:
    """``root/<class>/img<i><ext>`` for each class with the given number of images."""
    out = []
    for ci, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            out.append(write_image(root / cls / f"img{i}{ext}", value=10 * ci + i))
    return out


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write an IDX file (uint8 payload) as the MNIST family stores it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped IDX directory: 10 classes, 5 train and 2 test images per class, 28x28."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    for split, per in (("train", 5), ("t10k", 2)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # lets tests check that images and labels stay aligned
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def helpers():
    """The writers above, as a fixture (test modules cannot import conftest reliably)."""
    import types

    return types.SimpleNamespace(write_image=write_image, write_tree=write_tree, write_idx=write_idx)
