"""Emoji-R: the builder against a fake npm registry on loopback, the pinned checksums, the cache and the splits."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.cli import main
from sdlora.data import DataConfig, build_dataset, load_raw_dataset
from sdlora.data.emoji_r import EMOJI_R_STYLES, IconSet, NpmTarball, build_emoji_r, fetch_tarball

# Two classes kept (4 and 3 emoji in all styles), one too small (2), one emoji missing in a style, one flag.
_EMOJI = [
    *[("Animals & Nature", "animal-mammal", f"1f40{i}", f"mammal{i}") for i in range(4)],
    *[("Food & Drink", "food-fruit", f"1f34{i}", f"fruit{i}") for i in range(3)],
    *[("Objects", "tool", f"1f52{i}", f"tool{i}") for i in range(2)],
    ("Food & Drink", "food-fruit", "1f35f", "no_twemoji"),
    ("Flags", "country-flag", "1f1e6-1f1e8", "flag"),
]
_COLOURS = ["#ff0000", "#00aa00", "#0000ff", "#aa00aa", "#00aaaa", "#aaaa00"]


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _packages() -> dict[str, tuple[str, bytes]]:
    """npm name -> (key, tarball bytes) for the label package and the six styles."""
    rows = [
        {"category": cat, "subcategory": sub, "unified": cp.upper(), "short_name": name, "sort_order": i}
        for i, (cat, sub, cp, name) in enumerate(_EMOJI)
    ]
    out = {"emoji-datasource": ("labels", _tgz({"emoji.json": json.dumps(rows).encode(), "LICENSE": b"MIT fake"}))}
    for k, style in enumerate(EMOJI_R_STYLES):
        names = {cp: name for _, _, cp, name in _EMOJI if not (style == "twemoji" and name == "no_twemoji")}
        icons = {
            name: {"body": f'<rect x="{k}" y="4" width="6" height="8" fill="{_COLOURS[k]}"/>'}
            for name in names.values()
        }
        files = {
            "icons.json": json.dumps({"prefix": style, "icons": icons, "width": 16, "height": 16}).encode(),
            "info.json": json.dumps({"name": style, "license": {"title": "MIT"}, "author": {"name": "t"}}).encode(),
        }
        if style != "fluent_color":  # like the real Fluent colour set: no chars.json, names from the flat set
            files["chars.json"] = json.dumps(names).encode()
        out[f"@iconify-json/{style}"] = (style, _tgz(files))
    return out


class _Registry:
    def __init__(self) -> None:
        self.packages = _packages()
        self.pins = {
            key: NpmTarball(name, "1.0.0", hashlib.sha256(data).hexdigest(), "MIT")
            for name, (key, data) in self.packages.items()
        }
        self.files = {"/" + self.pins[key].url_path: data for _, (key, data) in self.packages.items()}
        self.requests: list[str] = []


@pytest.fixture
def registry() -> Iterator[tuple[_Registry, str]]:
    reg = _Registry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            reg.requests.append(self.path)
            data = reg.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield reg, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _build(reg: _Registry, url: str, tmp_path: Path, root: str = "emoji_r", **kw: object) -> dict:
    return build_emoji_r(
        tmp_path / root, size=16, min_per_class=3, cache_dir=tmp_path / "cache", registry=url, packages=reg.pins, **kw
    )


def test_build_writes_layout_manifest_and_licences(registry, tmp_path):
    reg, url = registry
    rec = _build(reg, url, tmp_path)
    root = tmp_path / "emoji_r"
    # mammal: 4 emoji, fruit: 3 (the one without a Twemoji drawing is dropped); tool (2) and the flag are dropped.
    assert rec["classes"] == ["animal-mammal", "food-fruit"]
    assert rec["emoji_per_class"] == {"animal-mammal": 4, "food-fruit": 3}
    assert rec["num_images"] == 7 * len(EMOJI_R_STYLES)
    with open(root / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == rec["num_images"]
    assert {r["style"] for r in rows} == set(EMOJI_R_STYLES)
    assert not any(r["name"] in ("no_twemoji", "flag") or r["class"] == "tool" for r in rows)
    sample = Image.open(root / rows[0]["path"])
    assert sample.size == (16, 16) and sample.mode == "RGB"
    px = np.asarray(sample)
    assert (px[0, -1] == 255).all()  # background: white
    assert not (px == 255).all()  # the rectangle is drawn
    assert (root / "images" / "animal-mammal").is_dir()
    attribution = (root / "ATTRIBUTION.md").read_text()
    for pin in reg.pins.values():
        assert pin.sha256 in attribution
    assert (root / "LICENSES" / "emoji-datasource.LICENSE").read_bytes() == b"MIT fake"
    assert json.loads((root / "emoji_r.json").read_text())["num_images"] == rec["num_images"]


def test_styles_are_drawn_differently(registry, tmp_path):
    reg, url = registry
    _build(reg, url, tmp_path)
    root = tmp_path / "emoji_r"
    arrays = {s: np.asarray(Image.open(root / f"images/animal-mammal/1f400_{s}.png")) for s in EMOJI_R_STYLES}
    # Each fake style paints its own colour at its own offset: six different images of one emoji.
    assert len({a.tobytes() for a in arrays.values()}) == len(EMOJI_R_STYLES)


def test_cache_is_reused_and_rebuild_is_skipped(registry, tmp_path):
    reg, url = registry
    first = _build(reg, url, tmp_path)
    assert len(reg.requests) == 7
    assert _build(reg, url, tmp_path) == first  # same settings: the directory is reused, nothing fetched
    assert len(reg.requests) == 7
    _build(reg, url, tmp_path, root="other")  # a new directory from the cached tarballs
    assert len(reg.requests) == 7
    with pytest.raises(FileExistsError, match="other settings"):
        build_emoji_r(tmp_path / "emoji_r", size=24, min_per_class=3, cache_dir=tmp_path / "cache", packages=reg.pins)


def test_checksum_mismatch_is_refused(registry, tmp_path):
    reg, url = registry
    bad = replace(reg.pins["noto"], sha256="0" * 64)
    with pytest.raises(ValueError, match=r"sha256 .* expected 0{64}; refusing"):
        fetch_tarball(bad, tmp_path / "cache", url)
    assert not any((tmp_path / "cache").iterdir())  # nothing partial or wrong left in the cache
    pins = {**reg.pins, "noto": bad}
    with pytest.raises(ValueError, match="@iconify-json/noto"):
        build_emoji_r(
            tmp_path / "d", size=16, min_per_class=3, cache_dir=tmp_path / "cache", registry=url, packages=pins
        )
    assert not (tmp_path / "d").exists()


def test_corrupt_cached_tarball_is_fetched_again(registry, tmp_path):
    reg, url = registry
    pin = reg.pins["twemoji"]
    path = fetch_tarball(pin, tmp_path / "cache", url)
    path.write_bytes(b"truncated")
    assert fetch_tarball(pin, tmp_path / "cache", url) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pin.sha256
    assert len(reg.requests) == 2


def test_unreachable_registry_names_the_url(tmp_path):
    pin = NpmTarball("@iconify-json/noto", "1.0.0", "0" * 64, "MIT")
    with pytest.raises(OSError, match=r"http://127\.0\.0\.1:9/@iconify-json/noto/-/noto-1\.0\.0\.tgz"):
        fetch_tarball(pin, tmp_path, "http://127.0.0.1:9")


def _split(root: Path, seed: int, fmt: str | None = None, test_fraction: float = 0.34):
    cfg = DataConfig(name="emoji_r", root=str(root), format=fmt, test_fraction=test_fraction)
    return load_raw_dataset(cfg, seed)


def _ids(paths: list[str]) -> set[str]:
    return {Path(p).name.split("_", 1)[0] for p in paths}


def test_identity_split_holds_out_whole_emoji_per_class(registry, tmp_path):
    reg, url = registry
    _build(reg, url, tmp_path)
    root = tmp_path / "emoji_r"
    raw = _split(root, 1993)
    train_ids, test_ids = _ids(raw.train.paths), _ids(raw.test.paths)
    assert not train_ids & test_ids
    assert len(raw.train) + len(raw.test) == 7 * 6
    # Every class on both sides, with all six styles of each held-out emoji in the test split.
    assert set(raw.train.targets) == set(raw.test.targets) == {0, 1}
    assert len(raw.test) == 6 * len(test_ids)
    again = _split(root, 1993)
    assert again.test.paths == raw.test.paths
    others = {tuple(_split(root, s).test.paths) for s in range(8)}
    assert len(others) > 1  # the seed draws the held-out emoji
    assert raw.split_record is not None and sorted(raw.split_record["test_emoji"]) == sorted(test_ids)


def test_style_split_holds_out_whole_styles(registry, tmp_path):
    reg, url = registry
    _build(reg, url, tmp_path)
    raw = _split(tmp_path / "emoji_r", 7, fmt="styles")

    def styles(paths: list[str]) -> set[str]:
        return {Path(p).stem.split("_", 1)[1] for p in paths}

    assert len(styles(raw.test.paths)) == 2  # round(0.34 * 6)
    assert not styles(raw.train.paths) & styles(raw.test.paths)
    assert raw.split_record is not None and sorted(styles(raw.test.paths)) == raw.split_record["test_styles"]
    chosen = {tuple(_split(tmp_path / "emoji_r", s, fmt="styles").split_record["test_styles"]) for s in range(8)}
    assert len(chosen) > 1


def test_build_dataset_and_missing_root_message(registry, tmp_path):
    reg, url = registry
    _build(reg, url, tmp_path)
    cfg = DataConfig(name="emoji_r", root=str(tmp_path / "emoji_r"), image_size=14, augment=False)
    bundle = build_dataset(cfg, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0)
    assert bundle.num_classes == 2 and bundle.class_names == ["animal-mammal", "food-fruit"]
    x, y = bundle.train[0]
    assert tuple(x.shape) == (3, 14, 14) and y in (0, 1)
    with pytest.raises(FileNotFoundError, match="sdlora build-data emoji_r --root"):
        load_raw_dataset(DataConfig(name="emoji_r", root=str(tmp_path / "nowhere")), 0)
    with pytest.raises(ValueError, match="format"):
        DataConfig(name="emoji_r", format="presplit")


def test_alias_flips_are_applied():
    icons = {"icons": {"a": {"body": "<path/>"}}, "aliases": {"b": {"parent": "a", "hFlip": True}}, "width": 32}
    s = IconSet(icons, {"1f600": "b"})
    assert s.name_for(["1f600"]) == "b"
    assert "scale(-1 1)" in s.svg("b") and "scale(" not in s.svg("a")


def test_cli_build_data(registry, tmp_path, monkeypatch, capsys):
    reg, url = registry
    import sdlora.data.emoji_r as emoji_r

    monkeypatch.setattr(emoji_r, "EMOJI_R_PACKAGES", reg.pins)
    argv = ["build-data", "emoji_r", "--root", str(tmp_path / "e"), "--size", "16", "--min-per-class", "3"]
    assert main([*argv, "--cache", str(tmp_path / "c"), "--registry", url]) == 0
    assert "2 classes, 7 emoji, 42 images" in capsys.readouterr().out
    assert main([*argv, "--size", "24"]) == 2  # built with other settings: refused, named
    assert "other settings" in capsys.readouterr().err
