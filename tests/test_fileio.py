import hashlib
import json
import os

import numpy as np
import pytest

from sdlora import fileio
from sdlora.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_and_text(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"\x00\x01abc")
    assert p.read_bytes() == b"\x00\x01abc"
    atomic_write_text(str(p), "héllo\nworld\n")  # str path, replaces existing file
    assert p.read_bytes() == "héllo\nworld\n".encode()
    assert _leftovers(tmp_path) == []


def test_existing_mode_is_kept(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert (os.stat(p).st_mode & 0o777) == 0o640


def test_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    p.write_text('{"old": true}')

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(p, {"new": 1})
    assert p.read_text() == '{"old": true}'
    assert _leftovers(tmp_path) == []


def test_unserializable_leaves_old_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{}")
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(p, {"x": object()})
    assert p.read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_write_json_nan_to_null_and_numpy(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"a": float("nan"), "b": [1.5, float("inf")], "c": np.array([[1, 2]]), "d": np.float32(0.5)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.endswith("\n")
    assert text.startswith('{\n  "a": null')  # indent 2
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": [[1, 2]], "d": 0.5}


def test_read_json_errors_name_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 2"):
        read_json(p)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_json(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text('{"x": [1, null]}')
    assert read_json(good) == {"x": [1, None]}


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3000)
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    # small chunk size exercises the multi-chunk loop
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
