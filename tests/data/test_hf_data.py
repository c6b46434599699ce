"""``data.name: hf``: Hugging Face datasets built in the test (``Dataset.from_dict``, ``save_to_disk``, parquet),
read offline. The reference for "right" is the reader sdlora already has for the same samples: an ``hf`` dataset
holding an image folder's pictures (or a JSON-lines file's texts) in the same order gives the same labels, class
names and pixels."""

from __future__ import annotations

import io
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: it reads these once
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine_helpers import write_image_folder  # noqa: E402
from sdlora.configtools import ConfigError, from_dict  # noqa: E402
from sdlora.data import DataConfig, build_dataset, load_raw_dataset  # noqa: E402
from sdlora.data.check import check_dataset  # noqa: E402
from sdlora.data.hf import HFSource, hf_source_format, parse_hf_spec  # noqa: E402
from sdlora.data.identity import identity_changes  # noqa: E402

datasets = pytest.importorskip("datasets", reason="the hf data source needs `pip install sdlora[hf]`")

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    """Data files are converted into the datasets cache: keep it in the test's directory, never the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def folder_as_hf(folder: Path, class_label: bool = True) -> Any:
    """The pre-split image folder as a DatasetDict: same images, same order, labels as a ClassLabel."""
    from PIL import Image

    from sdlora.data import scan_image_folder

    splits = {}
    for split in ("train", "test"):
        classes, paths, targets = scan_image_folder(folder / split)
        label_feature = datasets.ClassLabel(names=classes) if class_label else datasets.Value("string")
        features = datasets.Features({"image": datasets.Image(), "label": label_feature})
        labels = [int(t) for t in targets] if class_label else [classes[t] for t in targets]
        images = [Image.open(p).copy() for p in paths]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def _images(bundle_split) -> torch.Tensor:
    return torch.stack([bundle_split[i][0] for i in range(len(bundle_split))])


def test_save_to_disk_images_match_the_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / "f", {"cat": 3, "dog": 4, "eel": 2}, {"cat": 2, "dog": 1, "eel": 2})
    folder_as_hf(folder).save_to_disk(str(tmp_path / "disk"))
    ref = build_dataset(
        DataConfig(name="imagefolder", root=str(folder), image_size=32, augment=False), mean=MEAN, std=STD, seed=1
    )
    cfg = DataConfig(name="hf", root=str(tmp_path / "disk"), image_size=32, augment=False)
    got = build_dataset(cfg, mean=MEAN, std=STD, seed=1)
    assert got.class_names == ref.class_names == ["cat", "dog", "eel"]
    assert np.array_equal(got.train_targets, ref.train_targets) and np.array_equal(got.test_targets, ref.test_targets)
    assert torch.equal(_images(got.train), _images(ref.train)) and torch.equal(_images(got.test), _images(ref.test))
    assert got.info["format"] == "disk" and got.info["split"] == "splits 'train' / 'test'"
    assert got.identity["train_counts"] == [3, 4, 2] and got.identity["name"] == "hf"
    # the identity is the content: a copy elsewhere is the same data, a changed pixel is not
    moved = tmp_path / "moved"
    folder_as_hf(folder).save_to_disk(str(moved))
    again = build_dataset(
        DataConfig(name="hf", root=str(moved), image_size=32, augment=False), mean=MEAN, std=STD, seed=1
    )
    assert identity_changes(got.identity, again.identity) == []
    edited = folder_as_hf(folder)
    from PIL import Image

    pic = np.zeros((32, 32, 3), np.uint8)
    edited["test"] = edited["test"].map(
        lambda row, i: {"image": Image.fromarray(pic)} if i == 0 else {}, with_indices=True
    )
    edited.save_to_disk(str(tmp_path / "edited"))
    changed = build_dataset(
        DataConfig(name="hf", root=str(tmp_path / "edited"), image_size=32, augment=False), mean=MEAN, std=STD, seed=1
    )
    assert identity_changes(got.identity, changed.identity) == [
        "test samples changed with the same counts per class (other files, labels or image bytes)"
    ]


def test_parquet_files_and_string_labels(tmp_path):
    folder = write_image_folder(tmp_path / "f", {"b": 2, "a": 3}, {"b": 1, "a": 1})
    data = folder_as_hf(folder, class_label=False)
    (tmp_path / "pq").mkdir()
    for split in ("train", "test"):
        data[split].to_parquet(str(tmp_path / "pq" / f"{split}.parquet"))
    assert hf_source_format(str(tmp_path / "pq")) == "files"
    got = build_dataset(
        DataConfig(name="hf", root=str(tmp_path / "pq"), image_size=32, augment=False), mean=MEAN, std=STD, seed=0
    )
    ref = build_dataset(
        DataConfig(name="imagefolder", root=str(folder), image_size=32, augment=False), mean=MEAN, std=STD, seed=0
    )
    assert got.class_names == ["a", "b"] and np.array_equal(got.train_targets, ref.train_targets)
    assert torch.equal(_images(got.train), _images(ref.train))
    # one parquet file: one split, split here per class with the seed (and the same split for the same seed)
    one = tmp_path / "one.parquet"
    data["train"].to_parquet(str(one))
    cfg = DataConfig(name="hf", root=str(one), image_size=32, test_fraction=0.4)
    a, b = load_raw_dataset(cfg, 3), load_raw_dataset(cfg, 3)
    assert len(a.train) + len(a.test) == 5 and np.bincount(a.test.targets).tolist() == [1, 1]
    assert [a.train.rows.name(i) for i in range(len(a.train))] == [b.train.rows.name(i) for i in range(len(b.train))]
    assert "split per class" in a.info["split"]


def test_text_dataset_matches_the_jsonl_reader(tmp_path):
    from hf_helpers import class_texts, write_jsonl

    rows = [(t, f"c{c}") for t, c in class_texts(3, 4)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_dict({"sentence": [t for t, _ in rows], "label": [lab for _, lab in rows]})
    ds.save_to_disk(str(tmp_path / "disk"))
    ref = load_raw_dataset(DataConfig(name="text_jsonl", root=str(tmp_path / "d.jsonl")), 5)
    got = load_raw_dataset(DataConfig(name="hf", root=str(tmp_path / "disk"), text_column="sentence"), 5)
    assert got.class_names == ref.class_names and got.train.texts == ref.train.texts
    assert np.array_equal(got.test.targets, ref.test.targets) and got.test.texts == ref.test.texts


def test_class_label_names_splits_and_classes_without_samples(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "y": datasets.ClassLabel(names=["x", "y", "z"])})
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "y": [2, 0, 2, 0]}, features=feats)
    val = datasets.Dataset.from_dict({"text": ["e", "f"], "y": [0, 2]}, features=feats)
    datasets.DatasetDict(fit=train, val=val).save_to_disk(str(tmp_path / "d"))
    cfg = DataConfig(name="hf", root=str(tmp_path / "d"), label_column="y", train_split="fit", test_split="val")
    raw = load_raw_dataset(cfg, 0)
    # class "y" has no sample: left out, the others keep their ClassLabel order
    assert raw.class_names == ["x", "z"] and raw.train.targets.tolist() == [1, 0, 1, 0]
    assert raw.test.targets.tolist() == [0, 1] and raw.test.texts == ["e", "f"]
    with pytest.raises(ValueError, match=r"no split 'train' \(splits: fit, val\); set data.train_split"):
        load_raw_dataset(DataConfig(name="hf", root=str(tmp_path / "d"), label_column="y"), 0)
    with pytest.raises(ValueError, match=r"data.test_split 'dev' is not a split .*splits: fit, val"):
        load_raw_dataset(
            DataConfig(name="hf", root=str(tmp_path / "d"), label_column="y", train_split="fit", test_split="dev"), 0
        )
    with pytest.raises(ValueError, match=r"no label column 'label' \(columns: text, y\)"):
        load_raw_dataset(DataConfig(name="hf", root=str(tmp_path / "d"), train_split="fit"), 0)


def test_bad_input_is_named(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "", "c"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"\[train\] row 1: text 'text' is ''"):
        load_raw_dataset(DataConfig(name="hf", root=str(tmp_path / "empty")), 0)
    paths = datasets.Dataset.from_dict({"image": ["x.png"], "label": [0]})
    paths.save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(ValueError, match=r"column 'image' is .*string.*not an Image feature; cast it"):
        load_raw_dataset(DataConfig(name="hf", root=str(tmp_path / "paths")), 0)
    with pytest.raises(FileNotFoundError, match=r"cannot load 'nobody/no-such-dataset' from the Hugging Face hub"):
        load_raw_dataset(DataConfig(name="hf", root="nobody/no-such-dataset"), 0)
    with pytest.raises(ValueError, match=r"data.root must name the Hugging Face dataset"):
        load_raw_dataset(DataConfig(name="hf"), 0)


def test_config_options_are_typed_and_strict():
    with pytest.raises(ConfigError, match=r"data.train_split: applies to data.name hf only"):
        from_dict(DataConfig, {"name": "imagefolder", "train_split": "train"}, "data")
    with pytest.raises(ConfigError, match=r"data.test_split"):
        from_dict(DataConfig, {"name": "hf", "train_split": "a", "test_split": "a"}, "data")
    with pytest.raises(ConfigError, match=r"data.image_column"):
        from_dict(DataConfig, {"name": "hf", "image_column": 3}, "data")
    with pytest.raises(ConfigError, match=r"data.format.*allowed: disk, files, hub"):
        from_dict(DataConfig, {"name": "hf", "format": "parquet"}, "data")
    assert from_dict(DataConfig, {"name": "hf", "image_column": None}, "data").image_column is None


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"pip install 'sdlora\[hf\]'"):
        load_raw_dataset(DataConfig(name="hf", root="/nonexistent"), 0)


def test_check_data_decodes_every_row_and_names_a_bad_one(tmp_path):
    folder = write_image_folder(tmp_path / "f", {"a": 2, "b": 2}, {"a": 1, "b": 1})
    data = folder_as_hf(folder)
    bad = data["test"].cast_column("image", datasets.Image(decode=False))
    bad = bad.map(lambda row, i: {"image": {"bytes": b"not a png", "path": None}} if i == 1 else {}, with_indices=True)
    data["test"] = bad.cast_column("image", datasets.Image())
    data.save_to_disk(str(tmp_path / "d"))
    check = check_dataset(DataConfig(name="hf", root=str(tmp_path / "d"), image_size=32, augment=False), 0)
    assert check.files_checked == 6 and not check.ok
    assert [name for name, _ in check.bad_files] == [f"hf:{(tmp_path / 'd').resolve()}[test]#1"]
    assert "decoded 6 dataset images: 1 unreadable" in check.format()


def test_hf_input_specs(tmp_path):
    assert parse_hf_spec("hf:user/pets:test") == ("user/pets", "test")
    assert parse_hf_spec("hf:user/pets") == ("user/pets", None)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_hf_spec(f"hf:{odd}") == (str(odd), None)  # an existing path is taken whole
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    one = datasets.Dataset.from_dict({"text": ["p", "q"], "label": [0, 1]}, features=feats)
    datasets.DatasetDict(train=one, extra=one).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"several splits \(train, extra\); name one as hf:ROOT:SPLIT"):
        HFSource(f"hf:{tmp_path / 'two'}").texts(DataConfig(name="hf"))
    texts, where = HFSource(f"hf:{tmp_path / 'two'}:extra").texts(DataConfig(name="hf"))
    assert texts == ["p", "q"] and where.endswith(":extra")


def test_identity_sees_one_changed_pixel(tmp_path):
    """BMP bytes have the same length whatever the pixels: only the bytes themselves tell the two datasets apart."""
    from PIL import Image

    def bmp(value: int) -> bytes:
        buf = io.BytesIO()
        pixels = np.full((8, 8, 3), 50, np.uint8)
        pixels[0, 0, 0] = value
        Image.fromarray(pixels).save(buf, format="BMP")
        return buf.getvalue()

    ids = []
    for value in (50, 51):
        rows = [{"bytes": bmp(v), "path": None} for v in (value, 9, 9, 9)]
        ds = datasets.Dataset.from_dict({"image": rows, "label": [0, 1, 0, 1]})
        ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / str(value)))
        cfg = DataConfig(name="hf", root=str(tmp_path / str(value)), image_size=8, test_fraction=0.5)
        ids.append(build_dataset(cfg, mean=MEAN, std=STD, seed=0).identity)
    assert ids[0]["train_counts"] == ids[1]["train_counts"] and ids[0]["sha256"] != ids[1]["sha256"]
