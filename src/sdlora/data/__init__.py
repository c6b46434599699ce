"""Datasets, transforms, class order and task split.

Public API: :class:`DataConfig`, :func:`build_dataset` -> :class:`DatasetBundle`, :data:`DATASETS` (registry,
extend with :func:`register_dataset`), :class:`Scenario` and :func:`make_scenario`.
"""

from . import readers as _readers  # noqa: F401  (fills DATASETS)
from .base import (
    DATASETS,
    DataConfig,
    DatasetBundle,
    DatasetSpec,
    RawDataset,
    SplitData,
    build_dataset,
    load_raw_dataset,
    per_class_subset,
    register_dataset,
)
from .datasets import ArrayImageDataset, FileImageDataset, read_image_file
from .readers import read_idx, scan_image_folder
from .scenario import Scenario, TaskSubset, make_scenario, peer_class_order
from .transforms import ImageTransform

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "DataConfig",
    "DatasetBundle",
    "DatasetSpec",
    "FileImageDataset",
    "ImageTransform",
    "RawDataset",
    "Scenario",
    "SplitData",
    "TaskSubset",
    "build_dataset",
    "load_raw_dataset",
    "make_scenario",
    "peer_class_order",
    "per_class_subset",
    "read_idx",
    "read_image_file",
    "register_dataset",
    "scan_image_folder",
]
