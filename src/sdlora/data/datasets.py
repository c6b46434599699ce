"""Torch ``Dataset`` wrappers: in-memory uint8 image arrays and lazily decoded image files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "WIDE_MODES",
    "ArrayImageDataset",
    "FileImageDataset",
    "ImageRows",
    "RowImageDataset",
    "decode_image",
    "read_image_file",
    "wide_to_uint8",
]


#: PIL modes holding more than 8 bits per sample. ``convert("RGB")`` clips them (a 16-bit PNG becomes solid white,
#: a float image in [0, 1] solid black), so :func:`wide_to_uint8` scales them instead.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def wide_to_uint8(arr: np.ndarray, mode: str, path: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel image ``[H, W]`` to uint8, or refuse it.

    16-bit samples map linearly onto 0..255 (``round(v * 255 / 65535)``: full-scale white stays white and images
    keep their relative brightness); 32-bit integer images (PIL mode ``I``, which is also how some readers give
    16-bit files) are read as 16-bit when their values fit; float images when their values lie in [0, 1], the
    usual convention. Anything else is refused by name, since any other scaling would be a guess.

    Raises:
        ValueError: Values outside the ranges above (the message names the file, the mode and the range).
    """
    if mode == "F":
        lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (0.0, 0.0)
        if not (np.isfinite(arr).all() and lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"cannot decode image {path}: a float (mode F) image with values in [{lo:g}, {hi:g}]; sdlora reads "
                "float images only with values in [0, 1]; convert it to 8-bit"
            )
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(
            f"cannot decode image {path}: a 32-bit integer (mode {mode}) image with values in [{lo}, {hi}]; "
            "sdlora reads 8-bit and 16-bit images; convert it to 8-bit"
        )
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def read_image_file(path: str) -> torch.Tensor:
    """Decode an image file to ``uint8 [3, H, W]`` RGB with PIL (grayscale, palette and CMYK become RGB).

    16-bit grayscale and float images are scaled to 8 bits or refused (see :func:`wide_to_uint8`); the whole file
    is decoded here, so a truncated file fails on first read. PIL rather than ``torchvision.io``: torchvision's
    decoders are deprecated since 0.29.

    Raises:
        FileNotFoundError: If the file does not exist (the message names it).
        ValueError: If the file cannot be decoded as an image, is truncated, or holds samples that cannot be read as
            8-bit (the message names it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_image(path, path)


def decode_image(source: str | IO[bytes], name: str) -> torch.Tensor:
    """Decode an image (a file path or a binary stream) to ``uint8 [3, H, W]`` RGB, as :func:`read_image_file`;
    ``name`` says where it came from in error messages (a file, or a dataset row).

    Raises:
        ValueError: The data cannot be decoded as an image, is truncated, or holds samples that cannot be read as
            8-bit (the message names ``name``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im) if mode in WIDE_MODES else np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # ValueError: a mode PIL cannot convert to RGB; SyntaxError: some PIL plugins' "not a valid file".
        raise ValueError(f"cannot decode image {name}: {e}") from e
    if mode in WIDE_MODES:
        arr = np.repeat(wide_to_uint8(arr, mode, name)[:, :, None], 3, axis=2)
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


class ImageRows(Protocol):
    """Images read one at a time from a source other than files, e.g. the rows of a Hugging Face dataset
    (:class:`sdlora.data.hf.HFImageRows`): selectable, hashable, decoded on access."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> torch.Tensor:
        """The ``i``-th image as ``uint8 [3, H, W]``; ``ValueError`` naming the row when it cannot be decoded."""
        ...

    def name(self, i: int) -> str:
        """Where the ``i``-th image comes from, for messages and predictions."""
        ...

    def select(self, idx: np.ndarray) -> ImageRows:
        """The rows at ``idx`` (in that order)."""
        ...

    def update_digest(self, h: Any) -> None:
        """Feed the encoded bytes of every row, in order, to the hash object ``h``."""
        ...


class RowImageDataset(Dataset):
    """Images decoded from :class:`ImageRows` on access (the file-less counterpart of :class:`FileImageDataset`).

    Args:
        rows: The image source.
        targets: int64 labels, one per row.
        transform: Maps one ``uint8 [3, H, W]`` image to the model input.
    """

    def __init__(self, rows: ImageRows, targets: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.rows = rows
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.rows.read(i)), int(self.targets[i])
