"""benchmarks/build_fortunes.py on a tiny fake fortunes directory: items, cleaning, categories kept, CSV readable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sdlora.data import DataConfig, load_raw_dataset

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "build_fortunes.py"
_spec = importlib.util.spec_from_file_location("build_fortunes", _PATH)
assert _spec is not None and _spec.loader is not None
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)


def _fake(tmp_path: Path) -> Path:
    src = tmp_path / "fortunes"
    src.mkdir()
    # 4 items, one of them on two lines and one in bold (overstrike); a trailing separator.
    (src / "people").write_text('A\nquote, "said" she.\n%\nB\x08Bold one\n%\nthird\n%\nshared item\n%\n')
    (src / "science").write_text("e = mc^2\n%\nentropy, always\n%\nrepeat\n%\nrepeat\n%\nshared item\n%   \nlast\n")
    (src / "tiny").write_text("only\n%\ntwo\n")
    (src / "people.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (src / "people.u8").symlink_to(src / "people")
    (src / "off").mkdir()
    (src / "latin").write_bytes("caf\xe9\n%\nna\xefve\n%\nr\xe9sum\xe9\n".encode("latin-1"))
    return src


def test_read_fortune_file_splits_on_percent_lines_and_cleans(tmp_path):
    src = _fake(tmp_path)
    assert bf.read_fortune_file(src / "people") == ['A quote, "said" she.', "Bold one", "third", "shared item"]
    assert bf.read_fortune_file(src / "latin") == ["caf\xe9", "na\xefve", "r\xe9sum\xe9"]


def test_collect_keeps_big_categories_and_drops_items_with_two_labels(tmp_path):
    cats = bf.collect(_fake(tmp_path), min_items=3)
    assert sorted(cats) == ["latin", "people", "science"]  # tiny (2 items), .dat, .u8 and off/ are not categories
    assert "shared item" not in cats["people"] and "shared item" not in cats["science"]
    assert cats["science"] == ["e = mc^2", "entropy, always", "repeat", "last"]
    assert sorted(bf.collect(tmp_path / "fortunes", min_items=4)) == ["science"]


def test_csv_is_read_by_text_csv(tmp_path):
    out = tmp_path / "out" / "fortunes.csv"
    assert bf.main(["--src", str(_fake(tmp_path)), "--out", str(out), "--min-items", "3"]) == 0
    raw = load_raw_dataset(DataConfig(name="text_csv", root=str(out), test_fraction=0.25), seed=0)
    assert raw.class_names == ["latin", "people", "science"]
    texts = raw.train.texts + raw.test.texts
    assert sorted(texts) == sorted(["caf\xe9", "na\xefve", "r\xe9sum\xe9", 'A quote, "said" she.', "Bold one", "third",
                                    "e = mc^2", "entropy, always", "repeat", "last"])  # fmt: skip


def test_missing_directory_names_the_packages(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes fortunes-min"):
        bf.collect(tmp_path / "nope", 100)
    assert bf.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "fortunes-min" in capsys.readouterr().err
