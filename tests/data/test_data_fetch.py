"""``sdlora data get`` against a loopback HTTP server: resume, checksums, safe extraction, layouts the readers read.

Every archive is made here, laid out like the real one (same top folder and file names, a few tiny images).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sdlora.data import fetch
from sdlora.data.fetch import COMPLETE_MARKER, ArchiveError, DownloadError, get_dataset, safe_extract

# --------------------------------------------------------------------------------------------------------------------
# loopback server
# --------------------------------------------------------------------------------------------------------------------


class _Server:
    """Serves ``files`` on 127.0.0.1 with Range support; ``cut`` maps a path to how many bytes the next response
    sends before it drops the connection (each entry is used once)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if server.ignore_range:
                    rng = None
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                n = server.cut.pop(self.path, None)
                if n is not None:
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------------------------
# archives laid out like the real ones
# --------------------------------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - the published checksums are md5


def _blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


def _serve_spec(
    monkeypatch: pytest.MonkeyPatch, server: _Server, name: str, payloads: dict[str, bytes], publish_md5: bool = True
) -> None:
    """Point dataset ``name``'s sources at the server (same file names), with the md5 of the served bytes."""
    spec = fetch.DATASET_SPECS[name]
    sources = []
    for s in spec.sources:
        path = "/" + s.filename
        server.files[path] = payloads[s.filename]
        md5 = _md5(payloads[s.filename]) if (publish_md5 and s.md5) else None
        blob = _blob(payloads[s.filename]) if (publish_md5 and s.git_blob) else None
        where = "test" if (md5 or blob) else None
        sources.append(dataclasses.replace(s, url=server.url(path), md5=md5, git_blob=blob, md5_source=where))
    monkeypatch.setitem(fetch.DATASET_SPECS, name, dataclasses.replace(spec, sources=tuple(sources)))


def _cifar_archive() -> bytes:
    return _tar({f"cifar-100-python/{f}": f"{f} payload".encode() * 50 for f in ("train", "test", "meta")})


# --------------------------------------------------------------------------------------------------------------------
# download: resume, checksums, errors
# --------------------------------------------------------------------------------------------------------------------


def test_cifar100_is_downloaded_verified_and_laid_out(server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    report = get_dataset("cifar100", tmp_path, progress=False)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    assert (folder / "train").read_bytes() == b"train payload" * 50
    assert (tmp_path / "cifar100" / COMPLETE_MARKER).is_file()
    assert any("matches the published checksum" in c for c in report.checks)
    assert not list(tmp_path.glob(".staging-*"))
    # a second call finds the marker and downloads nothing
    n = len(server.requests)
    assert get_dataset("cifar100", tmp_path, progress=False).already_complete
    assert len(server.requests) == n


def test_a_connection_cut_midway_is_resumed_with_a_range_request(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    server.cut["/cifar-100-python.tar.gz"] = len(archive) // 2
    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)
    get_dataset("cifar100", tmp_path, progress=False)
    ranges = [r for p, r in server.requests if p == "/cifar-100-python.tar.gz"]
    assert ranges == [None, f"bytes={len(archive) // 2}-"]
    assert (tmp_path / ".downloads" / "cifar-100-python.tar.gz").read_bytes() == archive


def test_a_part_file_left_by_a_killed_process_is_resumed(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "cifar-100-python.tar.gz.part").write_bytes(archive[:100])
    get_dataset("cifar100", tmp_path, progress=False)
    assert server.requests == [("/cifar-100-python.tar.gz", "bytes=100-")]
    assert (tmp_path / "cifar100" / COMPLETE_MARKER).is_file()


def test_a_server_that_ignores_range_gets_the_whole_file_again(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    server.ignore_range = True
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "cifar-100-python.tar.gz.part").write_bytes(b"stale bytes" * 10)
    get_dataset("cifar100", tmp_path, progress=False)
    assert (tmp_path / ".downloads" / "cifar-100-python.tar.gz").read_bytes() == archive


def test_a_connection_that_keeps_breaking_gives_up_with_a_resume_hint(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)
    original = fetch._stream

    def stalled(resp: Any, part: Path, offset: int, total: int | None, progress: bool) -> int:
        raise ConnectionResetError("reset by peer")

    monkeypatch.setattr(fetch, "_stream", stalled)
    with pytest.raises(DownloadError, match="run the command again to resume"):
        get_dataset("cifar100", tmp_path, progress=False)
    assert len(server.requests) == fetch.MAX_STALLED_ATTEMPTS
    monkeypatch.setattr(fetch, "_stream", original)
    assert not (tmp_path / "cifar100").exists()


def test_a_wrong_checksum_is_refused_and_the_download_deleted(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    spec = fetch.DATASET_SPECS["cifar100"]
    bad = dataclasses.replace(spec.sources[0], md5="0" * 32)
    monkeypatch.setitem(fetch.DATASET_SPECS, "cifar100", dataclasses.replace(spec, sources=(bad,)))
    with pytest.raises(ArchiveError, match="differs from the published"):
        get_dataset("cifar100", tmp_path, progress=False)
    assert not list((tmp_path / ".downloads").iterdir())
    assert not (tmp_path / "cifar100").exists()


def test_without_published_checksum_the_first_download_is_recorded_and_checked_later(server, monkeypatch, tmp_path):
    archive = _cifar_archive()
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive}, publish_md5=False)
    report = get_dataset("cifar100", tmp_path, progress=False)
    assert any("recorded at this first download" in c for c in report.checks)
    recorded = yaml.safe_load((tmp_path / ".downloads" / "checksums.json").read_text())
    assert recorded["cifar-100-python.tar.gz"]["sha256"] == hashlib.sha256(archive).hexdigest()
    # after the folder is removed, another archive under the same name no longer passes in this root
    import shutil

    shutil.rmtree(tmp_path / "cifar100")
    other = tmp_path / "other" / "cifar-100-python.tar.gz"
    other.parent.mkdir()
    other.write_bytes(_tar({f"cifar-100-python/{f}": b"x" for f in ("train", "test", "meta")}))
    with pytest.raises(ArchiveError, match="recorded at the first download"):
        get_dataset("cifar100", tmp_path, from_files=[other], progress=False)
    # the same archive again passes, by the recorded checksum
    report = get_dataset("cifar100", tmp_path, progress=False)
    assert any("matches the one recorded" in c for c in report.checks)


def test_a_truncated_archive_is_refused_and_nothing_looks_complete(server, monkeypatch, tmp_path):
    archive = _cifar_archive()[:-40]  # served in full, but the archive itself is cut short
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive}, publish_md5=False)
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        get_dataset("cifar100", tmp_path, progress=False)
    assert not (tmp_path / "cifar100").exists()
    assert not list(tmp_path.glob(".staging-*"))
    # neither the bad file nor its checksum is kept as the reference
    assert not (tmp_path / ".downloads" / "cifar-100-python.tar.gz").exists()
    assert not (tmp_path / ".downloads" / "checksums.json").exists()


def test_an_archive_without_the_expected_folder_is_refused(server, monkeypatch, tmp_path):
    archive = _tar({"something-else/train": b"x"})
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": archive})
    with pytest.raises(ArchiveError, match="cifar-100-python"):
        get_dataset("cifar100", tmp_path, progress=False)
    assert not (tmp_path / "cifar100").exists()


def test_no_network_says_so_and_names_from(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = fetch.DATASET_SPECS["cifar100"]
    src = dataclasses.replace(spec.sources[0], url=f"http://127.0.0.1:{port}/cifar-100-python.tar.gz")
    monkeypatch.setitem(fetch.DATASET_SPECS, "cifar100", dataclasses.replace(spec, sources=(src,)))
    with pytest.raises(DownloadError, match="no network.*--from"):
        get_dataset("cifar100", tmp_path, progress=False, timeout=5)


def test_a_full_disk_is_reported_as_such(server, monkeypatch, tmp_path):
    _serve_spec(monkeypatch, server, "cifar100", {"cifar-100-python.tar.gz": _cifar_archive()})

    def full(resp: Any, part: Path, offset: int, total: int | None, progress: bool) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "_stream", full)
    with pytest.raises(DownloadError, match="disk full"):
        get_dataset("cifar100", tmp_path, progress=False)


def test_from_file_uses_the_local_archive_without_network(monkeypatch, tmp_path):
    archive = _cifar_archive()
    spec = fetch.DATASET_SPECS["cifar100"]
    src = dataclasses.replace(spec.sources[0], url="http://127.0.0.1:9/unreachable", md5=_md5(archive))
    monkeypatch.setitem(fetch.DATASET_SPECS, "cifar100", dataclasses.replace(spec, sources=(src,)))
    local = tmp_path / "my-copy.tgz"
    local.write_bytes(archive)
    report = get_dataset("cifar100", tmp_path / "root", from_files=[local], progress=False)
    assert (tmp_path / "root" / "cifar100" / "cifar-100-python" / "meta").is_file()
    assert any("--from" in c and "published" in c for c in report.checks)


def test_a_folder_not_made_by_data_get_is_not_overwritten(tmp_path):
    (tmp_path / "cifar100").mkdir()
    with pytest.raises(FileExistsError, match="no .sdlora-complete.json"):
        get_dataset("cifar100", tmp_path, progress=False)


def test_git_blob_ids_are_gits(tmp_path):
    # two well-known object ids: the empty blob and "hello\n" (git hash-object)
    f = tmp_path / "f"
    f.write_bytes(b"")
    assert fetch._git_blob_id(f) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    f.write_bytes(b"hello\n")
    assert fetch._git_blob_id(f) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_a_split_file_that_is_not_the_published_one_is_refused(server, monkeypatch, tmp_path):
    payloads = {"imagenet-r.tar": _tar({"imagenet-r/n0/a.jpg": _png(0)}, mode="w"),
                "imagenet-r_train.yaml": b"data: []\n", "imagenet-r_test.yaml": b"data: []\n"}  # fmt: skip
    _serve_spec(monkeypatch, server, "imagenet_r", payloads)
    spec = fetch.DATASET_SPECS["imagenet_r"]
    wrong = dataclasses.replace(spec.sources[1], git_blob="a039907f411700078d505572df4df09ab6e2d669")
    sources = (spec.sources[0], wrong, spec.sources[2])
    monkeypatch.setitem(fetch.DATASET_SPECS, "imagenet_r", dataclasses.replace(spec, sources=sources))
    with pytest.raises(ArchiveError, match="git blob id .* differs from the published a039907f"):
        get_dataset("imagenet_r", tmp_path, progress=False)
    assert not (tmp_path / "imagenet-r").exists()


# --------------------------------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------------------------------


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("members", "extra", "message"),
    [
        ({"data/../../evil.txt": b"x"}, [], r"'\.\.'"),
        ({"/tmp/evil.txt": b"x"}, [], "absolute name"),
        ({"data/a.txt": b"x"}, [_link("data/l", "../../outside")], "points outside the tree"),
        ({"data/a.txt": b"x"}, [_link("data/l", "/etc/passwd")], "points outside the tree"),
        ({"data/a.txt": b"x"}, [_link("data/h", "../x", tarfile.LNKTYPE)], "points outside the tree"),
        ({"data/a.txt": b"x"}, [_link("data/dev", "", tarfile.CHRTYPE)], "device file"),
    ],
)
def test_unsafe_tar_members_are_refused_before_anything_is_written(tmp_path, members, extra, message):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar(members, extra=extra))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, dest)
    assert not any(dest.rglob("*"))
    assert not (tmp_path / "evil.txt").exists()


def test_a_link_inside_the_tree_is_extracted(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar({"data/a.txt": b"x"}, mode="w", extra=[_link("data/sub/l", "../a.txt")]))
    assert safe_extract(archive, tmp_path / "out") == 2
    assert (tmp_path / "out" / "data" / "sub" / "l").read_bytes() == b"x"


def test_unsafe_zip_members_are_refused(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"clipart/../../evil.txt": b"x"}))
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        safe_extract(archive, tmp_path / "out")
    link = zipfile.ZipInfo("clipart/l")
    link.external_attr = 0o120777 << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "../../outside")
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match="points outside the tree"):
        safe_extract(archive, tmp_path / "out2")


def test_a_truncated_zip_and_a_non_archive_are_refused(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({f"real/c/{i}.png": _png(i) for i in range(3)})[:-30])
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        safe_extract(archive, tmp_path / "out")
    archive.write_bytes(b"<html>not found</html>")
    with pytest.raises(ArchiveError, match="not a tar or zip"):
        safe_extract(archive, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# layouts, read back by the readers the presets use
# --------------------------------------------------------------------------------------------------------------------


def _load(name: str, root: Path, **data: Any) -> Any:
    from sdlora.data import DataConfig, load_raw_dataset

    return load_raw_dataset(DataConfig(name=name, root=str(root), **data), seed=0)


def test_imagenet_r_is_split_as_the_coda_prompt_files_say(server, monkeypatch, tmp_path):
    wnids = ["n01443537", "n01484850", "n01494475"]
    images = {f"imagenet-r/{w}/art_{i}.jpg": _png(10 * k + i) for k, w in enumerate(wnids) for i in range(4)}
    names = sorted(images)
    test = names[::4]  # not stratified, like the real file
    train = [n for n in names if n not in test]
    # CODA's targets are not sorted-wnid order; the folders layout relabels by sorted wnid anyway
    split = {s: yaml.safe_dump({"data": ["data/" + n for n in ns], "targets": [7] * len(ns)}).encode()
             for s, ns in (("train", train), ("test", test))}  # fmt: skip
    _serve_spec(
        monkeypatch,
        server,
        "imagenet_r",
        {
            "imagenet-r.tar": _tar(images, mode="w"),
            "imagenet-r_train.yaml": split["train"],
            "imagenet-r_test.yaml": split["test"],
        },  # fmt: skip
    )
    report = get_dataset("imagenet_r", tmp_path, progress=False)
    assert any("imagenet-r_train.yaml: git blob id" in c and "matches the published" in c for c in report.checks)
    root = tmp_path / "imagenet-r"
    raw = _load("imagenet_r", root, format="folders")
    assert raw.class_names == wnids
    assert sorted(Path(p).relative_to(root / "train").as_posix() for p in raw.train.paths) == [
        n.removeprefix("imagenet-r/") for n in train
    ]
    assert len(raw.test.paths) == len(test)
    assert (root / "splits" / "imagenet-r_test.yaml").read_bytes() == split["test"]


def test_imagenet_r_from_a_presplit_archive_is_kept_as_it_is(monkeypatch, tmp_path):
    images = {f"imagenet-r/{s}/n0{c}/{i}.jpg": _png(i + c) for s in ("train", "test") for c in range(2)
              for i in range(2)}  # fmt: skip
    local = tmp_path / "imagenet-r.zip"
    local.write_bytes(_zip(images))
    with pytest.raises(ArchiveError, match="--unverified"):
        get_dataset("imagenet_r", tmp_path / "r", from_files=[local], progress=False)
    spec = fetch.DATASET_SPECS["imagenet_r"]
    yamls = tmp_path / "y"
    yamls.mkdir()
    for s in spec.sources[1:]:  # the split files are not needed, but are part of the dataset's files
        (yamls / s.filename).write_text("data: []\ntargets: []\n")
    report = get_dataset(
        "imagenet_r", tmp_path / "r", from_files=[local, *yamls.iterdir()], unverified=True, progress=False
    )
    assert any("NOT verified" in c for c in report.checks)
    raw = _load("imagenet_r", tmp_path / "r" / "imagenet-r", format="folders")
    assert len(raw.train.paths) == 4 and len(raw.test.paths) == 4


def test_imagenet_a_gets_the_documented_seeded_split(server, monkeypatch, tmp_path):
    images = {f"imagenet-a/n0{c}/{i}.jpg": _png(c * 10 + i) for c in range(3) for i in range(5 + c)}
    images["imagenet-a/README.txt"] = b"readme"
    _serve_spec(monkeypatch, server, "imagenet_a", {"imagenet-a.tar": _tar(images, mode="w")})
    get_dataset("imagenet_a", tmp_path, progress=False)
    root = tmp_path / "imagenet-a"
    raw = _load("imagenet_a", root)
    assert len(raw.train.paths) + len(raw.test.paths) == 18
    # round(0.2 * n) test images per class: 1, 1, 1
    assert np.bincount(raw.test.targets).tolist() == [1, 1, 1]
    record = yaml.safe_load((root / "split.json").read_text())
    assert sorted(record["test"]) == sorted(Path(p).relative_to(root / "test").as_posix() for p in raw.test.paths)
    # the same archive gives the same split
    server.requests.clear()
    get_dataset("imagenet_a", tmp_path / "again", progress=False)
    again = yaml.safe_load((tmp_path / "again" / "imagenet-a" / "split.json").read_text())
    assert again == record


def test_cub200_is_read_by_the_cub_reader(server, monkeypatch, tmp_path):
    files: dict[str, bytes] = {"attributes.txt": b"1 has_bill_shape::curved\n"}
    lines: dict[str, list[str]] = {"images": [], "labels": [], "split": []}
    for i in range(1, 7):
        c = (i - 1) // 3 + 1
        rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
        files[f"CUB_200_2011/images/{rel}"] = _png(i)
        lines["images"].append(f"{i} {rel}")
        lines["labels"].append(f"{i} {c}")
        lines["split"].append(f"{i} {int(i % 3 != 0)}")
    files["CUB_200_2011/images.txt"] = "\n".join(lines["images"]).encode()
    files["CUB_200_2011/image_class_labels.txt"] = "\n".join(lines["labels"]).encode()
    files["CUB_200_2011/train_test_split.txt"] = "\n".join(lines["split"]).encode()
    files["CUB_200_2011/classes.txt"] = b"1 001.Bird_1\n2 002.Bird_2\n"
    _serve_spec(monkeypatch, server, "cub200", {"CUB_200_2011.tgz": _tar(files)})
    get_dataset("cub200", tmp_path, progress=False)
    raw = _load("cub200", tmp_path / "CUB_200_2011")
    assert raw.class_names == ["Bird_1", "Bird_2"]
    assert len(raw.train.paths) == 4 and len(raw.test.paths) == 2


def test_domainnet_zips_and_split_files_are_read_by_the_coda_yaml_reader(server, monkeypatch, tmp_path):
    payloads: dict[str, bytes] = {}
    rels: list[str] = []
    for d in fetch.DOMAINNET_DOMAINS:
        members = {f"{d}/cls_{c}/{d}_{c}_{i}.jpg": _png(c * 3 + i) for c in range(2) for i in range(2)}
        payloads[f"{d}.zip"] = _zip(members)
        rels += list(members)
        for split in ("train", "test"):
            payloads[f"{d}_{split}.txt"] = f"{d}/cls_0/{d}_0_0.jpg 0\n".encode()
    train, test = rels[::2], rels[1::2]
    for split, ns in (("train", train), ("test", test)):
        doc = {"data": [f"data/DomainNet/{n}" for n in ns], "targets": [int(n.split("/")[1][-1]) for n in ns]}
        payloads[f"domainnet_{split}.yaml"] = yaml.safe_dump(doc).encode()
    _serve_spec(monkeypatch, server, "domainnet", payloads)
    get_dataset("domainnet", tmp_path, progress=False)
    raw = _load("domainnet", tmp_path / "domainnet", format="coda_yaml")
    assert len(raw.train.paths) == len(train) and len(raw.test.paths) == len(test)
    assert (tmp_path / "domainnet" / "sketch_test.txt").is_file()


# --------------------------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------------------------


def test_cli_data_get_reports_the_checks_and_exit_codes(monkeypatch, tmp_path, capsys):
    from sdlora.cli import main

    archive = _cifar_archive()
    spec = fetch.DATASET_SPECS["cifar100"]
    src = dataclasses.replace(spec.sources[0], url="http://127.0.0.1:9/x", md5=_md5(archive), md5_source="test")
    monkeypatch.setitem(fetch.DATASET_SPECS, "cifar100", dataclasses.replace(spec, sources=(src,)))
    local = tmp_path / "cifar-100-python.tar.gz"
    local.write_bytes(archive)
    root = tmp_path / "root"
    assert main(["data", "get", "cifar100", "--root", str(root), "--from", str(local), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"cifar100: ready in {root / 'cifar100'}" in out and "matches the published checksum (test)" in out
    # a wrong archive is bad input (2); an unreachable server is a failure (1); both say why in one line
    local.write_bytes(b"not the archive")
    assert main(["data", "get", "cifar100", "--root", str(tmp_path / "r2"), "--from", str(local)]) == 2
    assert "differs from the published" in capsys.readouterr().err
    assert main(["data", "get", "cifar100", "--root", str(tmp_path / "r3"), "--no-progress"]) == 1
    assert "no network?" in capsys.readouterr().err
