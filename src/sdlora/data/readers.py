"""Dataset readers registered in :data:`sdlora.data.DATASETS`.

Each reader returns the official train/test split as labels plus in-memory uint8 images (small datasets) or file
paths (folder datasets, decoded lazily). ``docs/datasets.md`` describes how to obtain every dataset and the layout
each reader expects.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import default_cache_dir
from .base import DataConfig, RawDataset, SplitData, register_dataset, stratified_test_mask

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMG_EXTENSIONS",
    "read_idx",
    "scan_image_folder",
    "walk_visible",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_DOCS = "see docs/datasets.md"


def _data_cache_dir() -> Path:
    return default_cache_dir() / "data"


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ValueError(f"data.root must name the {cfg.name} directory ({what}); {_DOCS}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{cfg.name} root directory not found: {root} (expected {what}; {_DOCS})")
    return root


# --------------------------------------------------------------------------------------------------------------------
# IDX (MNIST-family) files
# --------------------------------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed if its name ends in ``.gz``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the header is not a valid IDX header or the payload size does not match it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{p}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{p}: IDX header says {dims} ({expected} bytes) but the file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


_FMNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_fmnist(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files (gzip or plain) under ``directory``, ``directory/raw`` or torchvision's layout."""
    for d in (directory, directory / "raw", directory / "FashionMNIST" / "raw"):
        found: dict[str, tuple[Path, Path]] = {}
        for split, stems in _FMNIST_STEMS.items():
            pair = []
            for stem in stems:
                hit = next((d / (stem + ext) for ext in (".gz", "") if (d / (stem + ext)).is_file()), None)
                if hit is None:
                    break
                pair.append(hit)
            if len(pair) == 2:
                found[split] = (pair[0], pair[1])
        if len(found) == 2:
            return found
    return None


@register_dataset("fashion_mnist")
def _fashion_mnist(cfg: DataConfig, seed: int) -> RawDataset:
    candidates = [Path(cfg.root).expanduser()] if cfg.root else [Path(FASHION_MNIST_SYSTEM_DIR), _data_cache_dir()]
    files = None
    for c in candidates:
        files = _find_fmnist(c)
        if files is not None:
            break
    if files is None:
        target = candidates[-1]
        where = " or ".join(str(c) for c in candidates)
        if not cfg.download:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz ...) not found in {where}. Install them with "
                "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), copy the four .gz files there, or set "
                "data.download=true"
            )
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(target), train=train, download=True)
        except Exception as e:
            raise RuntimeError(
                f"Fashion-MNIST not found in {where} and the download into {target} failed ({type(e).__name__}: {e}). "
                "Offline, install 'apt-get install dataset-fashion-mnist' or copy the four IDX .gz files into "
                "data.root"
            ) from e
        files = _find_fmnist(target)
        if files is None:
            raise FileNotFoundError(f"torchvision downloaded Fashion-MNIST but the IDX files are not under {target}")
    splits = {}
    for split, (img_path, lbl_path) in files.items():
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{img_path}: unexpected IDX shapes {images.shape} / {labels.shape}")
        splits[split] = SplitData(labels.astype(np.int64), images=torch.from_numpy(images).unsqueeze(1))
    return RawDataset(
        splits["train"],
        splits["test"],
        list(FASHION_MNIST_CLASSES),
        info={"root": str(files["train"][0].parent), "split": "official 60k train / 10k test"},
    )


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-100
# --------------------------------------------------------------------------------------------------------------------


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig, seed: int) -> RawDataset:
    from torchvision.datasets import CIFAR100

    root = Path(cfg.root).expanduser() if cfg.root else _data_cache_dir()
    folder = root / "cifar-100-python"
    present = all((folder / f).is_file() for f in ("train", "test", "meta"))
    if not present:
        if not cfg.download:
            raise FileNotFoundError(
                f"CIFAR-100 not found: {folder} (expected train/test/meta from cifar-100-python.tar.gz). Download "
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into data.root, or set "
                "data.download=true"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            CIFAR100(str(root), train=True, download=True)
        except Exception as e:
            raise RuntimeError(
                f"CIFAR-100 not found in {folder} and the download failed ({type(e).__name__}: {e}); without "
                "network, fetch https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz on another machine and "
                f"extract it into {root}"
            ) from e
    splits = {}
    for split in ("train", "test"):
        ds = CIFAR100(str(root), train=split == "train", download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits[split] = SplitData(np.asarray(ds.targets, dtype=np.int64), images=images)
        classes = list(ds.classes)
    return RawDataset(
        splits["train"], splits["test"], classes, info={"root": str(root), "split": "official 50k train / 10k test"}
    )


# --------------------------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------------------------


#: Folder names that mark a split of a dataset rather than a class (compared in lower case).
SPLIT_FOLDER_NAMES = {
    "train": "train", "training": "train", "trn": "train",
    "test": "test", "testing": "test", "tst": "test",
    "val": "test", "valid": "test", "validation": "test", "eval": "test", "evaluation": "test", "dev": "test",
}  # fmt: skip


def walk_visible(directory: str | os.PathLike[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``directory`` that follows directory links, each real directory once, without hidden entries.

    Yields ``(dirpath, dirnames, filenames)`` (sorted; names starting with ``.`` left out: macOS ``._x.png``
    resource forks, ``.thumbnails/``, ``.git/``, ...). A directory link that leads back to an enclosing folder (a
    loop such as ``up -> ..``) or to a directory already walked is skipped with a warning: following it would
    list the same files again, without end for a loop. The one walk that training readers and ``sdlora predict``
    share, so both see the same files.
    """
    seen: set[str] = set()
    top = os.fspath(directory)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        parent = os.path.realpath(os.path.dirname(dirpath)) if dirpath != top else ""
        loop = parent == real or parent.startswith(real.rstrip(os.sep) + os.sep)
        if loop or real in seen:
            log.warning(
                "skipped the directory link %s -> %s (%s)",
                dirpath,
                real,
                "a loop back to an enclosing folder" if loop else "a directory already read",
            )
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))


def _list_images(directory: Path, owner: dict[str, str], label: str) -> list[str]:
    """Image files under ``directory`` (:func:`walk_visible`: links followed, each real directory once, loops and
    hidden entries skipped).

    ``owner`` maps every real directory read so far to the class folder that read it: a directory reached from two
    class folders is an error, since an image belongs to one class.
    """
    out: list[str] = []
    for dirpath, _dirnames, filenames in walk_visible(directory):
        real = os.path.realpath(dirpath)
        if owner.setdefault(real, label) != label:
            raise ValueError(
                f"image folder: the directory {real} is read both for class {owner[real]!r} and for class {label!r} "
                f"(through {dirpath}); an image can belong to one class only: remove the link"
            )
        out.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
    return out


def _refuse_split_folders(d: Path, classes: list[str]) -> None:
    """Refuse a root whose 'classes' are split folders (``train/`` + ``val/``, the ImageNet layout, ...).

    One split-like name among ordinary class names is a class (CIFAR-100 has a class 'train'); two of them, or only
    split-like folders, mean that ``data.root`` points at a split layout sdlora does not read as such.
    """
    splits = [c for c in classes if c.lower() in SPLIT_FOLDER_NAMES]
    if not splits or (len(splits) < 2 and len(splits) < len(classes)):
        return
    renames = [f"{d / c} to {d / SPLIT_FOLDER_NAMES[c.lower()]}" for c in splits if SPLIT_FOLDER_NAMES[c.lower()] != c]
    hint = f"; for the pre-split layout rename {', '.join(renames)}" if renames else ""
    raise ValueError(
        f"{d} holds split folders ({', '.join(c + '/' for c in splits)}), not classes. sdlora reads an image folder "
        "as <root>/train/<class>/* and <root>/test/<class>/* (pre-split) or as <root>/<class>/* (one tree, split "
        f"with data.test_fraction){hint} ({_DOCS})"
    )


def scan_image_folder(directory: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """List an ImageFolder tree ``directory/<class>/**/<image>`` (torchvision conventions: sorted class names).

    Directory links are followed once each; loops are skipped (see :func:`_list_images`).

    Returns:
        ``(class_names, paths, targets)``.

    Raises:
        FileNotFoundError: If the directory is missing, has no class folders, or a class folder has no images.
        ValueError: If the class folders are split folders (``train/``, ``val/``, ...), or two class folders lead
            to the same directory.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder not found: {d}")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {d} (expected {d}/<class>/<image files>)")
    _refuse_split_folders(d, classes)
    paths: list[str] = []
    targets: list[int] = []
    owner: dict[str, str] = {}
    for ci, c in enumerate(classes):
        files = _list_images(d / c, owner, c)
        if not files:
            raise FileNotFoundError(f"class folder {d / c} holds no images ({', '.join(IMG_EXTENSIONS)})")
        paths.extend(files)
        targets.extend([ci] * len(files))
    return classes, paths, np.asarray(targets, dtype=np.int64)


def _presplit_folders(root: Path, name: str) -> RawDataset:
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{name}: {root / split} not found; expected pre-split folders {root}/train/<class>/... and "
                f"{root}/test/<class>/... ({_DOCS})"
            )
    classes, train_paths, train_t = scan_image_folder(root / "train")
    test_classes, test_paths, test_t = scan_image_folder(root / "test")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in test_classes if c not in index]
    if unknown:
        raise ValueError(f"{name}: test classes without training folder in {root / 'train'}: {unknown[:5]}")
    remap = np.asarray([index[c] for c in test_classes], dtype=np.int64)
    return RawDataset(
        SplitData(train_t, paths=train_paths),
        SplitData(remap[test_t], paths=test_paths),
        classes,
        info={"root": str(root), "split": "pre-split train/ and test/ folders"},
    )


def _single_tree_split(root: Path, name: str, test_fraction: float, seed: int) -> RawDataset:
    classes, paths, targets = scan_image_folder(root)
    is_test = stratified_test_mask(targets, test_fraction, np.random.default_rng([seed, 3]))
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    rel = [os.path.relpath(p, root) for p in paths]
    record = {
        "dataset": name,
        "root": str(root),
        "seed": seed,
        "test_fraction": test_fraction,
        "classes": classes,
        "train": [[rel[i], int(targets[i])] for i in tr],
        "test": [[rel[i], int(targets[i])] for i in te],
    }
    return RawDataset(
        SplitData(targets[tr], paths=[paths[i] for i in tr]),
        SplitData(targets[te], paths=[paths[i] for i in te]),
        classes,
        info={"root": str(root), "split": f"single tree split per class, test_fraction={test_fraction}, seed={seed}"},
        split_record=record,
    )


@register_dataset("imagefolder", formats=("presplit", "single_tree"))
def _imagefolder(cfg: DataConfig, seed: int) -> RawDataset:
    root = _require_root(cfg, "<root>/train/<class>/*, <root>/test/<class>/* or <root>/<class>/*")
    fmt = cfg.format
    if fmt is None:
        fmt = "presplit" if (root / "train").is_dir() and (root / "test").is_dir() else "single_tree"
    raw = (
        _presplit_folders(root, cfg.name)
        if fmt == "presplit"
        else _single_tree_split(root, cfg.name, cfg.test_fraction, seed)
    )
    raw.info["format"] = fmt
    return raw


@register_dataset("imagenet_a")
def _imagenet_a(cfg: DataConfig, seed: int) -> RawDataset:
    root = _require_root(cfg, "pre-split imagenet-a/{train,test}/<wnid>/*.jpg")
    return _presplit_folders(root, cfg.name)


# --------------------------------------------------------------------------------------------------------------------
# split-file conventions (CODA-Prompt YAML, DomainNet txt, CUB txt)
# --------------------------------------------------------------------------------------------------------------------


def _resolve_paths(root: Path, rels: list[str], source: Path) -> list[str]:
    """Map split-file paths onto ``root``.

    Split files carry the authors' prefix (``data/imagenet-r/<wnid>/x.jpg``); the number of leading components to
    drop is chosen once, from the first entry, so that ``root`` may be either the dataset folder itself or a parent.
    """
    if not rels:
        return []
    parts = Path(rels[0].replace("\\", "/")).parts
    strip = next((k for k in range(len(parts)) if root.joinpath(*parts[k:]).is_file()), None)
    if strip is None:
        raise FileNotFoundError(
            f"{source}: its first image {rels[0]!r} was not found under {root} (tried every suffix of the path); "
            f"is data.root the folder that holds the images? ({_DOCS})"
        )
    out = [str(root.joinpath(*Path(r.replace("\\", "/")).parts[strip:])) for r in rels]
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(out)} listed images are missing under {root}, e.g. {missing[:3]}"
        )
    return out


def _find_split_file(root: Path, filename: str, hint: str) -> Path:
    for d in (root, root / "splits", root.parent):
        if (d / filename).is_file():
            return d / filename
    raise FileNotFoundError(
        f"split file {filename} not found in {root}, {root / 'splits'} or {root.parent}; {hint} ({_DOCS})"
    )


def _load_yaml_split(path: Path) -> tuple[list[str], np.ndarray]:
    import yaml

    # The C loader parses the 1 MB ImageNet-R split files ~20x faster than the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        doc: Any = yaml.load(f, Loader=loader)  # noqa: S506 - a SafeLoader variant
    if not isinstance(doc, dict) or "data" not in doc or "targets" not in doc:
        raise ValueError(f"{path}: expected a YAML mapping with 'data' (paths) and 'targets' (ints)")
    data, targets = list(doc["data"]), list(doc["targets"])
    if len(data) != len(targets):
        raise ValueError(f"{path}: {len(data)} paths but {len(targets)} targets")
    return [str(p) for p in data], np.asarray(targets, dtype=np.int64)


def _names_from_parents(paths: list[str], targets: np.ndarray, num_classes: int) -> list[str]:
    names = [f"class_{i}" for i in range(num_classes)]
    seen: set[int] = set()
    for p, t in zip(paths, targets):
        if int(t) not in seen:
            names[int(t)] = Path(p).parent.name
            seen.add(int(t))
    return names


def _split_file_dataset(
    root: Path,
    train: tuple[list[str], np.ndarray],
    test: tuple[list[str], np.ndarray],
    sources: tuple[Path, Path],
    info: dict[str, Any],
) -> RawDataset:
    train_paths = _resolve_paths(root, train[0], sources[0])
    test_paths = _resolve_paths(root, test[0], sources[1])
    all_t = np.concatenate([train[1], test[1]])
    if len(all_t) and all_t.min() < 0:
        raise ValueError(f"{sources[0]}: negative class labels")
    num_classes = int(all_t.max()) + 1 if len(all_t) else 0
    names = _names_from_parents(train_paths + test_paths, all_t, num_classes)
    return RawDataset(SplitData(train[1], paths=train_paths), SplitData(test[1], paths=test_paths), names, info=info)


def _coda_yaml(root: Path, prefix: str, name: str) -> RawDataset:
    hint = (
        f"get {prefix}_train.yaml and {prefix}_test.yaml from GT-RIPL/CODA-Prompt "
        "(dataloaders/splits/) and put them in data.root"
    )
    files = (_find_split_file(root, f"{prefix}_train.yaml", hint), _find_split_file(root, f"{prefix}_test.yaml", hint))
    info = {
        "root": str(root),
        "split": f"CODA-Prompt {prefix}_{{train,test}}.yaml",
        "split_files": [str(f) for f in files],
    }
    return _split_file_dataset(root, _load_yaml_split(files[0]), _load_yaml_split(files[1]), files, info=info)


@register_dataset("imagenet_r", formats=("folders", "coda_yaml"), default_format="folders")
def _imagenet_r(cfg: DataConfig, seed: int) -> RawDataset:
    if cfg.resolved_format == "coda_yaml":
        root = _require_root(cfg, "the raw imagenet-r/<wnid>/*.jpg tree plus imagenet-r_{train,test}.yaml")
        return _coda_yaml(root, "imagenet-r", cfg.name)
    root = _require_root(cfg, "pre-split imagenet-r/{train,test}/<wnid>/*.jpg")
    return _presplit_folders(root, cfg.name)


def _read_txt_split(path: Path) -> tuple[list[str], np.ndarray]:
    paths, targets = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            rel, _, label = line.rpartition(" ")
            if not rel or not label.lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected '<relative path> <label>', got {line!r}")
            paths.append(rel)
            targets.append(int(label))
    return paths, np.asarray(targets, dtype=np.int64)


@register_dataset("domainnet", formats=("coda_yaml", "txt"), default_format="coda_yaml")
def _domainnet(cfg: DataConfig, seed: int) -> RawDataset:
    root = _require_root(cfg, "the DomainNet domain folders <domain>/<class>/*.jpg and the split files")
    if cfg.resolved_format == "coda_yaml":
        return _coda_yaml(root, "domainnet", cfg.name)
    domains = [
        d for d in DOMAINNET_DOMAINS if (root / f"{d}_train.txt").is_file() or (root / f"{d}_test.txt").is_file()
    ]
    if not domains:
        raise FileNotFoundError(
            f"no DomainNet split files <domain>_train.txt / <domain>_test.txt in {root} (domains: "
            f"{', '.join(DOMAINNET_DOMAINS)}); download them from the DomainNet site ({_DOCS})"
        )
    missing = [d for d in DOMAINNET_DOMAINS if d not in domains]
    if missing:
        warnings.warn(f"DomainNet: no split files for domains {missing} in {root}; using {domains}", stacklevel=2)
    splits: dict[str, tuple[list[str], np.ndarray]] = {}
    for split in ("train", "test"):
        paths: list[str] = []
        targets: list[np.ndarray] = []
        for d in domains:
            f = root / f"{d}_{split}.txt"
            if not f.is_file():
                raise FileNotFoundError(f"DomainNet split file not found: {f}")
            p, t = _read_txt_split(f)
            paths += p
            targets.append(t)
        splits[split] = (paths, np.concatenate(targets))
    sources = (root / f"{domains[0]}_train.txt", root / f"{domains[0]}_test.txt")
    info = {"root": str(root), "split": "official <domain>_{train,test}.txt", "domains": domains}
    return _split_file_dataset(root, splits["train"], splits["test"], sources, info=info)


@register_dataset("cub200")
def _cub200(cfg: DataConfig, seed: int) -> RawDataset:
    root = _require_root(cfg, "CUB_200_2011 with images.txt, image_class_labels.txt, train_test_split.txt, images/")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"

    def table(filename: str) -> dict[int, str]:
        f = root / filename
        if not f.is_file():
            raise FileNotFoundError(
                f"CUB-200-2011 file not found: {f}; extract CUB_200_2011.tgz (Caltech) and point data.root at the "
                f"CUB_200_2011 folder ({_DOCS})"
            )
        out = {}
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    key, _, value = line.strip().partition(" ")
                    if not key.isdigit() or not value:
                        raise ValueError(f"{f}:{lineno}: expected '<id> <value>', got {line.strip()!r}")
                    out[int(key)] = value.strip()
        return out

    images, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    ids = sorted(images)
    if set(ids) != set(labels) or set(ids) != set(is_train):
        raise ValueError(f"{root}: images.txt, image_class_labels.txt and train_test_split.txt list different ids")
    targets = np.asarray([int(labels[i]) - 1 for i in ids], dtype=np.int64)  # files are 1-based
    train_mask = np.asarray([is_train[i] == "1" for i in ids])
    paths = [str(root / "images" / images[i]) for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} images listed in images.txt are missing, e.g. {missing[:3]}")
    num_classes = int(targets.max()) + 1
    if (root / "classes.txt").is_file():
        names_tab = table("classes.txt")
        names = [names_tab.get(c + 1, f"class_{c}").split(".", 1)[-1] for c in range(num_classes)]
    else:
        names = _names_from_parents(paths, targets, num_classes)
    tr, te = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    return RawDataset(
        SplitData(targets[tr], paths=[paths[i] for i in tr]),
        SplitData(targets[te], paths=[paths[i] for i in te]),
        names,
        info={"root": str(root), "split": "official train_test_split.txt"},
    )


# --------------------------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------------------------

SYNTHETIC_SIZE = 32
SYNTHETIC_CELLS = 4


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig, seed: int) -> RawDataset:
    """Class prototypes (a random 4x4 grid of colours at 32 px) plus Gaussian noise, all drawn from ``seed``.

    The grid cells line up with 8-px patches, so a tiny ViT separates the classes within a few steps.
    """
    rng = np.random.default_rng([seed, 4])
    n_cls = cfg.synthetic_classes
    cell = SYNTHETIC_SIZE // SYNTHETIC_CELLS
    protos = rng.integers(0, 256, size=(n_cls, 3, SYNTHETIC_CELLS, SYNTHETIC_CELLS)).astype(np.float32)
    protos = protos.repeat(cell, axis=2).repeat(cell, axis=3)

    def make(per_class: int) -> SplitData:
        targets = np.repeat(np.arange(n_cls, dtype=np.int64), per_class)
        noise = rng.normal(0.0, 24.0, size=(len(targets), 3, SYNTHETIC_SIZE, SYNTHETIC_SIZE)).astype(np.float32)
        images = np.clip(protos[targets] + noise, 0, 255).round().astype(np.uint8)
        return SplitData(targets, images=torch.from_numpy(images))

    train = make(cfg.train_per_class or 16)
    test = make(cfg.test_per_class or 8)
    return RawDataset(
        train,
        test,
        [f"class_{i}" for i in range(n_cls)],
        info={"root": None, "split": f"synthetic prototypes + noise, seed={seed}"},
    )
