"""Datasets, transforms, class order and task split.

Public API: :class:`DataConfig`, :func:`build_dataset` -> :class:`DatasetBundle`, :data:`DATASETS` (registry,
extend with :func:`register_dataset`), :class:`Scenario` and :func:`make_scenario`; text: :class:`TextEncoder`
(:func:`sdlora.rundir.text_encoder_for_run` builds it for a run), :func:`batch_to` (a model-input batch is a tensor,
or a dict of tensors for text).
"""

from . import emoji_r as _emoji_r  # noqa: F401  (registers emoji_r)
from . import readers as _readers  # noqa: F401  (fills DATASETS)
from . import text_readers as _text_readers  # noqa: F401  (registers wordnet, text_csv, text_jsonl)
from .base import (
    DATASETS,
    DataConfig,
    DatasetBundle,
    DatasetSpec,
    RawDataset,
    SplitData,
    build_dataset,
    keep_largest_classes,
    load_raw_dataset,
    per_class_subset,
    register_dataset,
    stratified_test_mask,
)
from .datasets import ArrayImageDataset, FileImageDataset, read_image_file
from .readers import read_idx, scan_image_folder
from .scenario import Scenario, TaskSubset, make_scenario, peer_class_order
from .text import Batch, TextDataset, TextEncoder, batch_to, encode_texts
from .text_readers import read_text_table, read_texts, read_wordnet_nouns
from .transforms import ImageTransform

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "Batch",
    "DataConfig",
    "DatasetBundle",
    "DatasetSpec",
    "FileImageDataset",
    "ImageTransform",
    "RawDataset",
    "Scenario",
    "SplitData",
    "TaskSubset",
    "TextDataset",
    "TextEncoder",
    "batch_to",
    "build_dataset",
    "load_raw_dataset",
    "encode_texts",
    "keep_largest_classes",
    "make_scenario",
    "peer_class_order",
    "per_class_subset",
    "read_idx",
    "read_image_file",
    "read_text_table",
    "read_texts",
    "read_wordnet_nouns",
    "register_dataset",
    "scan_image_folder",
    "stratified_test_mask",
]
