"""Torch ``Dataset`` wrappers: in-memory uint8 image arrays and lazily decoded image files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ArrayImageDataset", "FileImageDataset", "read_image_file"]


def read_image_file(path: str) -> torch.Tensor:
    """Decode an image file to ``uint8 [3, H, W]`` RGB with PIL (grayscale, palette and CMYK become RGB).

    PIL rather than ``torchvision.io``: torchvision's decoders are deprecated since 0.29.

    Raises:
        FileNotFoundError: If the file does not exist (the message names it).
        ValueError: If the file cannot be decoded as an image (the message names it).
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # one copy: HWC -> CHW, writable


class ArrayImageDataset(Dataset):
    """Images held in memory as one ``uint8 [N, C, H, W]`` tensor.

    Args:
        images: uint8 tensor, C in {1, 3}.
        targets: int64 labels, one per image.
        transform: Maps one ``uint8 [C, H, W]`` image to the model input.
    """

    def __init__(self, images: torch.Tensor, targets: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])


class FileImageDataset(Dataset):
    """Images decoded from files on access, so big folder datasets cost only a path list at construction.

    Args:
        paths: Absolute image paths.
        targets: int64 labels, one per path.
        transform: Maps one ``uint8 [3, H, W]`` image to the model input.
    """

    def __init__(self, paths: Sequence[str], targets: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image_file(self.paths[i])), int(self.targets[i])
