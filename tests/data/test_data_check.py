"""Dataset pre-scan: every unreadable image named, every class of the scenario trainable and tested."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.data import DataConfig
from sdlora.data.check import check_dataset, check_image_files, coverage_problems


def _corrupt_tree(root, helpers):
    """A pre-split folder: 3 classes; one truncated PNG and one text file named .jpg among the images."""
    helpers.write_tree(root / "train", {"a": 3, "b": 3, "c": 3})
    helpers.write_tree(root / "test", {"a": 2, "b": 2, "c": 2})
    good = (root / "train" / "b" / "img1.png").read_bytes()
    (root / "train" / "b" / "img1.png").write_bytes(good[: len(good) // 2])
    (root / "test" / "c" / "img0.png").unlink()
    (root / "test" / "c" / "bad.jpg").write_text("not a jpeg")
    return [root / "train" / "b" / "img1.png", root / "test" / "c" / "bad.jpg"]


@pytest.mark.parametrize("workers", [0, 2])
def test_check_names_every_unreadable_file(tmp_path, helpers, workers):
    bad = _corrupt_tree(tmp_path, helpers)
    check = check_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16), seed=0, workers=workers)
    assert check.files_checked == 15
    assert [p for p, _ in check.bad_files] == [str(p) for p in bad]
    assert all(str(p) in reason and "cannot decode image" in reason for p, reason in check.bad_files)
    assert not check.problems and not check.ok
    text = check.format()
    assert all(str(p) in text for p in bad) and "2 unreadable" in text


def test_check_image_files_same_with_and_without_workers(tmp_path, helpers):
    paths = [str(p) for p in helpers.write_tree(tmp_path, {"a": 4})]
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    paths.insert(2, str(tmp_path / "wide.tif"))
    paths.append(str(tmp_path / "gone.png"))
    serial, parallel = check_image_files(paths), check_image_files(paths, workers=2)
    assert serial == parallel
    assert [p for p, _ in serial] == [str(tmp_path / "wide.tif"), str(tmp_path / "gone.png")]


def test_coverage_names_classes_without_train_or_test_images():
    names = ["cat", "dog", "eel", "fox"]
    train = np.array([0, 0, 1, 2, 2])
    test = np.array([0, 2, 3])
    problems = coverage_problems(names, train, test, [[2, 1], [3, 0]])
    assert problems == [
        "class 'dog' (label 1, task 1) has no test images",
        "class 'fox' (label 3, task 2) has no training images",
    ]
    assert coverage_problems(names, train, test, [[0, 2]]) == []  # classes outside the tasks do not matter


def test_check_reports_a_class_left_without_test_images(tmp_path, helpers):
    """Single tree with a 1-image class: the split gives it no test image, which the run would silently drop."""
    helpers.write_tree(tmp_path, {"a": 5, "b": 5, "c": 1})
    check = check_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16), seed=0)
    assert check.problems == ["class 'c' (label 2, task 1) has no test images"]
    assert not check.ok and "class 'c'" in check.format()


def test_check_in_memory_dataset(tmp_path):
    check = check_dataset(DataConfig(name="synthetic", image_size=16, synthetic_classes=4), seed=1)
    assert check.ok and check.files_checked == 0
    assert check.train_counts == [16] * 4 and check.test_counts == [8] * 4


def test_check_reads_and_tokenises_a_text_dataset(tmp_path, tiny_bert_dir):
    """check-data on a text config: every row read and tokenised with the backbone's tokenizer (truncation counted);
    a bad row is named by file and line; without a tokenizer the check says what it needs."""
    from transformers import AutoTokenizer

    from hf_helpers import class_texts, write_jsonl

    path = write_jsonl(tmp_path / "d.jsonl", class_texts(3, 8))
    cfg = DataConfig(name="text_jsonl", root=str(path), max_length=4, test_fraction=0.25)
    asked = []

    def tokenizer():
        asked.append(1)
        return AutoTokenizer.from_pretrained(str(tiny_bert_dir))

    check = check_dataset(cfg, seed=0, tokenizer=tokenizer)
    assert check.ok and asked == [1] and sum(check.train_counts) + sum(check.test_counts) == 24
    report = check.format()
    assert report.splitlines()[0].endswith("train / 6 test texts")
    assert "train texts per class" in report and "tokenised" in report
    assert check.info["tokens"]["at_max_length"] > 0  # max_length 4 truncates these texts
    with pytest.raises(ValueError, match="needs the backbone's tokenizer"):
        check_dataset(cfg, seed=0)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=rf"{path}:25: invalid JSON"):
        check_dataset(cfg, seed=0, tokenizer=tokenizer)
