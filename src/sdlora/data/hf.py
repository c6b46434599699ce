"""Hugging Face ``datasets`` as a data source: ``data.name: hf``.

``data.root`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (format ``disk``),
a data file or a directory of data files that ``datasets.load_dataset`` reads (format ``files``: parquet, arrow,
csv, json / jsonl; split names from the file names, e.g. ``train.parquet`` and ``test.parquet``), or a hub id
(format ``hub``: needs network, or the ``datasets`` cache with ``HF_DATASETS_OFFLINE=1``). ``load_dataset`` keeps
an Arrow copy of data files and hub downloads in the ``datasets`` cache (``HF_DATASETS_CACHE``).

A dataset with an ``Image`` column ``data.image_column`` holds images: they stay in the dataset (memory-mapped
Arrow) and are decoded when a sample is read (:class:`HFImageRows`). Otherwise ``data.text_column`` holds the
texts. Labels come from ``data.label_column``: a ``ClassLabel`` gives the class names (classes without any
sample in the splits in use are left out), other labels (names or ints) are sorted as ``text_csv`` sorts them.

Splits: ``data.train_split`` (default ``train``, or the only split) and ``data.test_split`` (default ``test`` when
it exists); without a test split the training split is split per class with ``data.test_fraction`` and the seed.

The data identity hashes the labels and the content (image bytes, texts) of the rows in use, not the dataset's
``_fingerprint``: for data files that fingerprint depends on the files' paths and modification times (a copied or
touched parquet file gets another one, datasets 5.2), so a moved dataset would look changed. The fingerprint is
recorded in the dataset info for reference.

``datasets`` is optional (``pip install sdlora[hf]``); it is imported only when an ``hf`` dataset is loaded.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataConfig, RawDataset, SplitData, register_dataset, stratified_test_mask
from .datasets import decode_image

__all__ = [
    "HF_FORMATS",
    "HF_PREFIX",
    "HFImageRows",
    "HFSource",
    "hf_source_format",
    "import_datasets",
    "load_hf",
    "parse_hf_spec",
]

log = logging.getLogger(__name__)

HF_FORMATS = ("disk", "files", "hub")
#: Data-file suffixes and the ``load_dataset`` builder that reads them.
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_DOCS = "see docs/datasets.md (Hugging Face datasets)"


def import_datasets() -> Any:
    """The ``datasets`` package, or an ``ImportError`` that says how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"data.name hf needs the Hugging Face 'datasets' package ({e}); install it with "
            "pip install 'sdlora[hf]' (or pip install datasets)"
        ) from None
    return datasets


def hf_source_format(root: str) -> str:
    """``disk``, ``files`` or ``hub``: how ``root`` is read when ``data.format`` is not given."""
    p = Path(root).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return "disk"
    return "files" if p.exists() else "hub"


def _load(cfg: DataConfig, root: str, fmt: str) -> dict[str, Any]:
    """``{split name: datasets.Dataset}`` of ``root``."""
    datasets = import_datasets()
    p = Path(root).expanduser()
    try:
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(p))
        elif fmt == "files":
            if p.is_file():
                builder = _BUILDERS.get(p.suffix.lower())
                if builder is None:
                    raise ValueError(
                        f"{p}: not a data file datasets reads here ({', '.join(_BUILDERS)}); use a save_to_disk "
                        "directory or convert the file"
                    )
                loaded = datasets.load_dataset(builder, data_files=str(p))
            elif p.is_dir():
                loaded = datasets.load_dataset(str(p))
            else:
                raise FileNotFoundError(f"hf: data.root {p} does not exist ({_DOCS})")
        else:
            loaded = datasets.load_dataset(root, cfg.subset)
    except (FileNotFoundError, ValueError) as e:
        if fmt != "hub":
            raise type(e)(f"hf: cannot read {p} as {fmt!r}: {e}") from None
        raise
    except Exception as e:  # the hub client raises many types (connection, offline mode, missing repo)
        if fmt != "hub":
            raise ValueError(f"hf: cannot read {p} ({fmt}): {type(e).__name__}: {e} ({_DOCS})") from None
        raise FileNotFoundError(
            f"hf: cannot load {root!r} from the Hugging Face hub ({type(e).__name__}: {e}). A hub id needs network "
            "access or a copy in the datasets cache; for a local dataset give an existing path (a save_to_disk "
            f"directory or data files) ({_DOCS})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {"train": loaded}  # save_to_disk of one Dataset: its only split


def _pick_splits(cfg: DataConfig, splits: dict[str, Any], root: str) -> tuple[str, str | None]:
    names = list(splits)
    shown = ", ".join(names)
    train = cfg.train_split
    if train is None:
        if "train" in splits:
            train = "train"
        elif len(names) == 1:
            train = names[0]
        else:
            raise ValueError(f"hf {root}: no split 'train' (splits: {shown}); set data.train_split")
    if train not in splits:
        raise ValueError(f"hf {root}: data.train_split {train!r} is not a split of the dataset (splits: {shown})")
    test = cfg.test_split
    if test is None:
        test = "test" if "test" in splits and train != "test" else None
    elif test not in splits:
        raise ValueError(f"hf {root}: data.test_split {test!r} is not a split of the dataset (splits: {shown})")
    return train, test


def _column(ds: Any, name: str) -> list[Any]:
    return list(ds.select_columns([name]).with_format(None)[name])


class HFImageRows:
    """Rows of the ``Image`` column of a Hugging Face dataset, decoded one at a time (the
    :class:`~sdlora.data.datasets.ImageRows` of ``hf`` datasets).

    Args:
        ds: The dataset (one split); only ``column`` is kept, with decoding turned off (sdlora decodes).
        column: The ``Image`` column.
        where: Names the split in messages, e.g. ``hf:/data/pets[train]``.
        index: Row numbers in ``ds`` (default: every row).
    """

    def __init__(self, ds: Any, column: str, where: str, index: np.ndarray | None = None) -> None:
        datasets = import_datasets()
        self.ds = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format(None)
        self.column = column
        self.where = where
        self.index = np.arange(len(ds), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def name(self, i: int) -> str:
        return f"{self.where}#{int(self.index[i])}"

    def _encoded(self, i: int) -> tuple[bytes | None, str | None]:
        cell = self.ds[int(self.index[i])][self.column]
        if cell is None:
            return None, None
        return cell.get("bytes"), cell.get("path")

    def read(self, i: int) -> torch.Tensor:
        data, path = self._encoded(i)
        if data is not None:
            return decode_image(io.BytesIO(data), self.name(i))
        if path:
            if not os.path.isfile(path):
                raise ValueError(f"cannot decode image {self.name(i)}: its file {path} does not exist")
            return decode_image(path, f"{self.name(i)} ({path})")
        raise ValueError(f"cannot decode image {self.name(i)}: the row has no image")

    def select(self, idx: np.ndarray) -> HFImageRows:
        out = HFImageRows.__new__(HFImageRows)
        out.ds, out.column, out.where = self.ds, self.column, self.where
        out.index = self.index[np.asarray(idx, dtype=np.int64)]
        return out

    def update_digest(self, h: Any) -> None:
        for i in range(len(self)):
            data, path = self._encoded(i)
            if data is None and path and os.path.isfile(path):
                with open(path, "rb") as f:
                    data = f.read()
            data = data if data is not None else f"missing:{path}".encode()
            h.update(f"{len(data)}|".encode())
            h.update(data)


def _labels(cfg: DataConfig, parts: list[tuple[str, Any]], root: str) -> tuple[list[np.ndarray], list[str]]:
    """Labels of each ``(split name, dataset)`` as class ids, and the class names."""
    datasets = import_datasets()
    col = cfg.label_column
    for split, ds in parts:
        if col not in ds.column_names:
            raise ValueError(
                f"hf {root}[{split}]: no label column {col!r} (columns: {', '.join(ds.column_names)}); set "
                "data.label_column"
            )
    feature = parts[0][1].features[col]
    values = [_column(ds, col) for _, ds in parts]
    for (split, _), vals in zip(parts, values):
        bad = next(
            (i for i, v in enumerate(vals) if v is None or isinstance(v, bool) or not isinstance(v, (int, str))), None
        )
        if bad is not None:
            raise ValueError(
                f"hf {root}[{split}] row {bad}: label {col!r} is {vals[bad]!r}; labels are names, ints or a ClassLabel"
            )
    if isinstance(feature, datasets.ClassLabel):
        ids = [np.asarray(v, dtype=np.int64) for v in values]
        used = np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
        if len(used) and (used.min() < 0 or used.max() >= feature.num_classes):
            raise ValueError(f"hf {root}: label ids outside the ClassLabel's 0..{feature.num_classes - 1}")
        remap = np.full(feature.num_classes, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        if len(used) < feature.num_classes:
            log.info(
                "hf %s: %d of %d ClassLabel classes have samples; the others are left out",
                root,
                len(used),
                feature.num_classes,
            )
        return [remap[i] for i in ids], [feature.names[int(c)] for c in used]
    from .text_readers import _class_names

    strings = [[str(v).strip() for v in vals] for vals in values]
    for (split, _), vals in zip(parts, strings):
        if "" in vals:
            raise ValueError(f"hf {root}[{split}] row {vals.index('')}: empty label in column {col!r}")
    classes = _class_names(strings[0])
    index = {c: i for i, c in enumerate(classes)}
    for (split, _), vals in zip(parts[1:], strings[1:]):
        unknown = next((i for i, v in enumerate(vals) if v not in index), None)
        if unknown is not None:
            raise ValueError(
                f"hf {root}[{split}] row {unknown}: label {vals[unknown]!r} never occurs in the training split "
                f"{parts[0][0]!r}; every test class needs training samples"
            )
    return [np.asarray([index[v] for v in vals], dtype=np.int64) for vals in strings], classes


def _texts(cfg: DataConfig, ds: Any, where: str) -> list[str]:
    col = cfg.text_column
    if col not in ds.column_names:
        image = f" and no image column {cfg.image_column!r}" if cfg.image_column else ""
        raise ValueError(
            f"{where}: no text column {col!r}{image} (columns: {', '.join(ds.column_names)}); set "
            "data.text_column or data.image_column"
        )
    texts = _column(ds, col)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{where} row {i}: text {col!r} is {t!r}; every row needs a non-empty string")
    return [t.strip() for t in texts]


def _is_image_dataset(cfg: DataConfig, ds: Any, where: str) -> bool:
    datasets = import_datasets()
    col = cfg.image_column
    if col is None or col not in ds.column_names:
        return False
    if not isinstance(ds.features[col], datasets.Image):
        raise ValueError(
            f"{where}: column {col!r} is {ds.features[col]}, not an Image feature; cast it with "
            f"ds.cast_column({col!r}, datasets.Image()) before save_to_disk, or set data.image_column: null to read "
            "the text column"
        )
    return True


def _split_data(cfg: DataConfig, ds: Any, targets: np.ndarray, where: str, image: bool) -> SplitData:
    if image:
        return SplitData(targets, rows=HFImageRows(ds, str(cfg.image_column), where))
    return SplitData(targets, texts=_texts(cfg, ds, where))


def load_hf(cfg: DataConfig, seed: int) -> RawDataset:
    """The ``hf`` reader (module docstring).

    Raises:
        ImportError: ``datasets`` is not installed (the message says how to install it).
        FileNotFoundError: A local root that does not exist, or a hub id that cannot be loaded.
        ValueError: A missing split or column, an image column that is not an ``Image`` feature, bad labels or
            texts (split and row named).
    """
    if cfg.root is None:
        raise ValueError(f"data.root must name the Hugging Face dataset (a local path or a hub id); {_DOCS}")
    fmt = cfg.format or hf_source_format(cfg.root)
    root = str(Path(cfg.root).expanduser().resolve()) if fmt != "hub" else cfg.root
    splits = _load(cfg, root, fmt)
    train_name, test_name = _pick_splits(cfg, splits, root)
    train_ds = splits[train_name]
    where = f"hf:{root}[{train_name}]"
    image = _is_image_dataset(cfg, train_ds, where)
    parts = [(train_name, train_ds)] + ([(test_name, splits[test_name])] if test_name else [])
    targets, classes = _labels(cfg, parts, root)
    info: dict[str, Any] = {
        "root": root,
        "format": fmt,
        "train_split": train_name,
        "test_split": test_name,
        "column": cfg.image_column if image else cfg.text_column,
        "label_column": cfg.label_column,
        "fingerprints": {name: getattr(splits[name], "_fingerprint", None) for name, _ in parts},
    }
    if cfg.subset is not None:
        info["subset"] = cfg.subset
    train = _split_data(cfg, train_ds, targets[0], where, image)
    if test_name is not None:
        test = _split_data(cfg, splits[test_name], targets[1], f"hf:{root}[{test_name}]", image)
        info["split"] = f"splits {train_name!r} / {test_name!r}"
    else:
        is_test = stratified_test_mask(train.targets, cfg.test_fraction, np.random.default_rng([seed, 3]))
        train, test = train.select(np.flatnonzero(~is_test)), train.select(np.flatnonzero(is_test))
        info["split"] = f"split {train_name!r} split per class, test_fraction={cfg.test_fraction}, seed={seed}"
    return RawDataset(train, test, classes, info=info)


@register_dataset("hf", formats=HF_FORMATS)
def _hf(cfg: DataConfig, seed: int) -> RawDataset:
    """A Hugging Face ``datasets`` dataset (images or texts); see :func:`load_hf`."""
    return load_hf(cfg, seed)


# ----------------------------------------------------------------------------------------------- inputs to predict
#: The prefix that marks a Hugging Face dataset on the command line (``predict``, ``learn --data``).
HF_PREFIX = "hf:"


class HFSource:
    """One split of a Hugging Face dataset named on the command line: ``hf:ROOT`` or ``hf:ROOT:SPLIT``.

    ``ROOT`` is read as :func:`load_hf` reads ``data.root``; ``SPLIT`` defaults to ``test`` when the dataset has
    it, else the only split (a dataset with several splits and no ``test`` needs it named).
    """

    def __init__(self, spec: str) -> None:
        self.root, self.split = parse_hf_spec(spec)

    def load(self, cfg: DataConfig) -> tuple[Any, str]:
        """``(dataset of the split, the split's name)``."""
        fmt = hf_source_format(self.root)
        root = str(Path(self.root).expanduser().resolve()) if fmt != "hub" else self.root
        splits = _load(cfg, root, fmt)
        split = self.split
        if split is None:
            if "test" in splits:
                split = "test"
            elif len(splits) == 1:
                split = next(iter(splits))
            else:
                raise ValueError(f"hf:{self.root}: several splits ({', '.join(splits)}); name one as hf:ROOT:SPLIT")
        if split not in splits:
            raise ValueError(f"hf:{self.root}: no split {split!r} (splits: {', '.join(splits)})")
        return splits[split], split

    def image_rows(self, cfg: DataConfig) -> HFImageRows:
        """The images of the split (the column ``cfg.image_column``)."""
        ds, split = self.load(cfg)
        where = f"hf:{self.root}:{split}"
        if not _is_image_dataset(cfg, ds, where):
            raise ValueError(
                f"{where}: no image column {cfg.image_column!r} (columns: {', '.join(ds.column_names)}); the run "
                "reads data.image_column"
            )
        return HFImageRows(ds, str(cfg.image_column), where)

    def texts(self, cfg: DataConfig) -> tuple[list[str], str]:
        """The texts of the split (the column ``cfg.text_column``) and the split's name for messages."""
        ds, split = self.load(cfg)
        where = f"hf:{self.root}:{split}"
        return _texts(cfg, ds, where), where


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:ROOT[:SPLIT]`` -> ``(ROOT, SPLIT or None)``. A ``ROOT`` that exists as a path is taken whole (so a
    path holding ``:`` works); otherwise the text after the last ``:`` is the split.

    Raises:
        ValueError: ``spec`` does not start with ``hf:`` or names no dataset.
    """
    if not spec.startswith(HF_PREFIX):
        raise ValueError(f"{spec!r} is not a Hugging Face dataset spec (hf:ROOT or hf:ROOT:SPLIT)")
    rest = spec[len(HF_PREFIX) :]
    if not os.path.exists(os.path.expanduser(rest)) and ":" in rest:
        root, split = rest.rsplit(":", 1)
        if root and split:
            return root, split
    if not rest:
        raise ValueError(f"{spec!r}: no dataset after hf: (hf:ROOT or hf:ROOT:SPLIT)")
    return rest, None
