"""``data_identity``: what data a run used, comparable later (digests, per-class counts after subsetting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.data import DataConfig, build_dataset
from sdlora.data.identity import data_identity, split_digest


def test_image_digest_sees_labels_and_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = np.array([0, 0, 1, 1, 2, 2])
    ref = split_digest(labels, images=images)
    assert split_digest(labels.copy(), images=images.clone()) == ref
    relabelled = labels.copy()
    relabelled[0] = 1
    assert split_digest(relabelled, images=images) != ref
    edited = images.clone()
    edited[3, 0, 2, 2] ^= 1
    assert split_digest(labels, images=edited) != ref


def test_file_digest_is_relative_to_root_and_order_free():
    paths = ["/a/root/cat/1.jpg", "/a/root/dog/2.jpg", "/a/root/dog/3.jpg"]
    labels = np.array([0, 1, 1])
    ref = split_digest(labels, paths=paths, root="/a/root")
    moved = [p.replace("/a/root", "/elsewhere/data") for p in paths]
    assert split_digest(labels, paths=moved, root="/elsewhere/data") == ref  # moving the dataset keeps it
    assert split_digest(labels[::-1], paths=paths[::-1], root="/a/root") == ref  # listing order does not matter
    assert split_digest(np.array([0, 1, 0]), paths=paths, root="/a/root") != ref  # a relabelled file changes it
    assert split_digest(labels[:2], paths=paths[:2], root="/a/root") != ref  # so does a removed one
    with pytest.raises(ValueError, match="exactly one"):
        split_digest(labels)


def test_identity_combines_splits_and_counts_per_class():
    a = data_identity(
        name="x",
        root=None,
        format=None,
        class_names=["a", "b", "c"],
        train_targets=np.array([0, 2, 2]),
        test_targets=np.array([1]),
        train_digest="t1",
        test_digest="s1",
    )
    assert a["train_counts"] == [1, 0, 2] and a["test_counts"] == [0, 1, 0]
    b = data_identity(**{**_args(a), "test_digest": "s2"})
    assert b["sha256"] != a["sha256"] and b["train_sha256"] == a["train_sha256"]
    c = data_identity(**{**_args(a), "class_names": ["a", "b", "z"]})
    assert c["sha256"] != a["sha256"]


def _args(identity: dict) -> dict:
    return {
        "name": identity["name"],
        "root": identity["root"],
        "format": identity["format"],
        "class_names": identity["class_names"],
        "train_targets": np.repeat(np.arange(3), identity["train_counts"]),
        "test_targets": np.repeat(np.arange(3), identity["test_counts"]),
        "train_digest": identity["train_sha256"],
        "test_digest": identity["test_sha256"],
    }


def test_build_dataset_records_identity_after_subsetting():
    def build(**kw):
        kw = {"train_per_class": 5, "test_per_class": 4, **kw}
        cfg = DataConfig(name="synthetic", image_size=8, synthetic_classes=3, **kw)
        return build_dataset(cfg, mean=(0.5,) * 3, std=(0.5,) * 3, seed=1)

    a = build()
    ident = a.identity
    assert ident["name"] == "synthetic" and ident["class_names"] == a.class_names
    assert ident["train_counts"] == np.bincount(a.train_targets).tolist() == [5, 5, 5]
    assert ident["test_counts"] == [4, 4, 4]
    assert build().identity == ident  # the same config and seed: the same data
    assert build(augment=False).identity == ident  # transforms are not data
    smaller = build(test_per_class=3).identity
    assert smaller["test_counts"] == [3, 3, 3] and smaller["sha256"] != ident["sha256"]
