"""``sdlora data get``: download a paper dataset from its public archive and lay it out as the presets expect.

Every step leaves either nothing or something that says what it is:

* downloads go to ``ROOT/.downloads/<file>.part``, resumed with an HTTP ``Range`` request after an interruption,
  and are renamed to ``<file>`` only after the checksum matched;
* checksums: the published one where it exists (:attr:`Source.md5`, or :attr:`Source.git_blob` for a file of a git
  repository, with :attr:`Source.md5_source`); otherwise the sha256 of the first download is recorded in
  ``ROOT/.downloads/checksums.json`` once the dataset was laid out, and later downloads (or ``--from`` files) must
  match it. :func:`get_dataset` reports which check was made;
* archives are extracted into a staging directory ``ROOT/.staging-<folder>`` after every member was checked (no
  absolute names, no ``..``, no links leading out of the tree, no device files or FIFOs);
* the layout step builds the final folder inside the staging directory, writes the completion marker
  ``.sdlora-complete.json`` into it, and renames it to ``ROOT/<folder>`` last. A folder without the marker was not
  made by a finished ``data get`` and is never taken for one.

Where each dataset comes from, its licence and its split rule are in :data:`DATASET_SPECS` and docs/datasets.md.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..fileio import atomic_write_json, read_json

__all__ = [
    "COMPLETE_MARKER",
    "DATASET_SPECS",
    "ArchiveError",
    "DatasetSpec",
    "DownloadError",
    "GetReport",
    "Source",
    "download",
    "get_dataset",
    "is_complete",
    "safe_extract",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".sdlora-complete.json"
DOWNLOADS = ".downloads"
CHECKSUMS = "checksums.json"
_CHUNK = 1 << 20
#: Consecutive attempts without a single new byte before a download gives up.
MAX_STALLED_ATTEMPTS = 4


class ArchiveError(ValueError):
    """A file that is not what it should be: wrong checksum, truncated or unreadable archive, unsafe member,
    unexpected contents. Bad input (exit code 2)."""


class DownloadError(RuntimeError):
    """The download itself failed: no network, an HTTP error, a full disk."""


@dataclass(frozen=True)
class Source:
    """One file of a dataset: where its authors publish it and how it is checked.

    Attributes:
        url: the canonical public URL.
        filename: the name it is saved under in ``ROOT/.downloads``.
        md5: the published md5, or None (then the sha256 of the first download is recorded and checked later).
        md5_source: where ``md5`` is published.
        size: approximate size in bytes, for the disk estimate only (never used to accept a file).
        archive: extract it (tar or zip) or copy it as a file.
        git_blob: for a file of a git repository, its published git object id (the sha1 of ``b"blob <size>\\0"`` and
            the content), checked instead of an md5; the source is in ``md5_source``.
    """

    url: str
    filename: str
    md5: str | None = None
    md5_source: str | None = None
    size: int = 0
    archive: bool = True
    git_blob: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset ``sdlora data get`` knows: its files, where it goes, how its split is made.

    Attributes:
        folder: the directory under ``--root`` (the presets' ``data.root`` is ``data/<folder>``).
        layout: builds the final folder from the extraction directory and the downloaded files.
        extracted_size: approximate bytes on disk after extraction (the archives are kept as well).
        split: the split rule and its source, one sentence (also written into the completion marker).
        licence: the licence or terms of use the authors state.
    """

    name: str
    folder: str
    sources: tuple[Source, ...]
    layout: Callable[[Path, Path, dict[str, Path]], None]
    extracted_size: int
    split: str
    licence: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def download_size(self) -> int:
        return sum(s.size for s in self.sources)


@dataclass
class GetReport:
    """What :func:`get_dataset` did: where the data is and how each file was checked."""

    name: str
    path: Path
    already_complete: bool
    checks: list[str]

    def lines(self) -> list[str]:
        head = f"{self.name}: {'already complete' if self.already_complete else 'ready'} in {self.path}"
        return [head] + [f"  {c}" for c in self.checks]


# --------------------------------------------------------------------------------------------------------------------
# download with resume
# --------------------------------------------------------------------------------------------------------------------


def _open(url: str, offset: int, timeout: float) -> Any:
    req = urllib.request.Request(url, headers={"User-Agent": "sdlora-data-get"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs from DATASET_SPECS or the user


def _network_error(url: str, e: BaseException) -> DownloadError:
    if isinstance(e, urllib.error.HTTPError):
        return DownloadError(f"{url}: HTTP {e.code} {e.reason}; the file may have moved (see docs/datasets.md)")
    reason = getattr(e, "reason", e)
    return DownloadError(
        f"cannot download {url} ({type(reason).__name__}: {reason}); no network? Download the file on another "
        "machine and pass it with --from FILE"
    )


def _disk_error(path: Path, e: OSError, need: int | None) -> DownloadError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    want = f"; about {need / 1e9:.1f} GB are needed" if need else ""
    return DownloadError(f"disk full while writing {path} ({free / 1e9:.2f} GB free{want}); free space or use --root")


def _stream(resp: Any, part: Path, offset: int, total: int | None, progress: bool) -> int:
    """Append the response body to ``part`` (from ``offset``); returns the bytes written."""
    from tqdm import tqdm

    written = 0
    with (
        open(part, "ab" if offset else "wb") as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name[: -len(".part")],
            disable=not progress,
        ) as bar,
    ):
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return written


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fetch_part(url: str, part: Path, *, progress: bool, timeout: float, need: int | None) -> None:
    """Download ``url`` into ``part``, resuming what is there; retries a broken connection with a Range request."""
    stalled = 0
    cut: BaseException
    while True:
        offset = _size(part)
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # the .part already holds the whole file
                return
            raise _network_error(url, e) from e
        except (urllib.error.URLError, OSError) as e:
            raise _network_error(url, e) from e
        with resp:
            status = getattr(resp, "status", 200)
            if offset and status != 206:
                log.warning("%s: the server ignored the Range request; downloading from the start", url)
                offset = 0
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            try:
                written = _stream(resp, part, offset, total, progress)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _disk_error(part, e, need) from e
                if not isinstance(e, (ConnectionError, socket.timeout, TimeoutError)):
                    raise
                written, cut = _size(part) - offset, e
            except http.client.IncompleteRead as e:
                written, cut = _size(part) - offset, e
            else:
                size = _size(part)
                if total is None or size >= total:
                    return
                cut = http.client.IncompleteRead(b"", total - size)
        stalled = 0 if written > 0 else stalled + 1
        if stalled >= MAX_STALLED_ATTEMPTS:
            raise DownloadError(
                f"{url}: the connection broke {stalled} times without new data ({cut!r}); run the command again to "
                f"resume from {_size(part)} bytes"
            )
        log.warning("%s: connection broken after %d bytes (%r); resuming", url, _size(part), cut)
        time.sleep(min(2.0**stalled - 1, 8.0))


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 - git's object id, not a security hash
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _recorded(downloads: Path) -> dict[str, Any]:
    path = downloads / CHECKSUMS
    return dict(read_json(path)) if path.is_file() else {}


def verify(path: Path, source: Source, downloads: Path) -> tuple[str, str | None]:
    """Check ``path`` against the published md5 or the sha256 recorded at the first complete ``data get``.

    Returns:
        ``(check, new_sha256)``: the line saying which check was made, and the sha256 to record when the file has
        neither a published nor a recorded checksum yet (None otherwise). The caller records it with
        :func:`record_checksums` only once the dataset was laid out, so a damaged first download is never taken
        as the reference.

    Raises:
        ArchiveError: the checksum differs.
    """
    if source.git_blob:
        got = _git_blob_id(path)
        if got != source.git_blob:
            raise ArchiveError(
                f"{path}: git blob id {got} differs from the published {source.git_blob} ({source.md5_source}); "
                "the file is damaged or not the published one"
            )
        return f"{source.filename}: git blob id {got} matches the published one ({source.md5_source})", None
    if source.md5:
        got = _digest(path, "md5")
        if got != source.md5:
            raise ArchiveError(
                f"{path}: md5 {got} differs from the published {source.md5} ({source.md5_source}); the file is "
                "damaged or not the canonical archive"
            )
        return f"{source.filename}: md5 {got} matches the published checksum ({source.md5_source})", None
    got = _digest(path, "sha256")
    known = _recorded(downloads).get(source.filename)
    if known is None:
        return (
            f"{source.filename}: no published checksum; sha256 {got} recorded at this first download in "
            f"{downloads / CHECKSUMS} and checked from now on"
        ), got
    if known.get("sha256") != got:
        raise ArchiveError(
            f"{path}: sha256 {got} differs from the one recorded at the first download ({known.get('sha256')}, "
            f"{downloads / CHECKSUMS}); the file changed on the server or is damaged. If the new file is right, "
            f"delete its entry from {downloads / CHECKSUMS}"
        )
    return (
        f"{source.filename}: sha256 {got} matches the one recorded at the first download ({downloads / CHECKSUMS})",
        None,
    )


def record_checksums(downloads: Path, new: dict[str, tuple[str, Source, int]]) -> None:
    """Add ``{filename: (sha256, source, size)}`` to ``downloads/checksums.json``."""
    if not new:
        return
    downloads.mkdir(parents=True, exist_ok=True)
    table = _recorded(downloads)
    for filename, (sha, source, size) in new.items():
        table[filename] = {"sha256": sha, "size": size, "url": source.url}
    atomic_write_json(downloads / CHECKSUMS, table)


def download(
    source: Source, downloads: Path, *, progress: bool = True, timeout: float = 60.0
) -> tuple[Path, str, str | None]:
    """Download ``source`` into ``downloads`` (resumable) and verify it (see :func:`verify`).

    Returns:
        ``(path, check, new_sha256)``: the verified file, how it was checked, the sha256 to record (or None).

    Raises:
        DownloadError: no network, an HTTP error, a full disk, a connection that keeps breaking.
        ArchiveError: the checksum differs (the damaged download is deleted, so the next try starts afresh).
    """
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / source.filename
    if not dest.is_file():
        part = downloads / (source.filename + ".part")
        _fetch_part(source.url, part, progress=progress, timeout=timeout, need=source.size or None)
        try:
            check, new = verify(part, source, downloads)
        except ArchiveError:
            part.unlink()
            raise
        os.replace(part, dest)
        return dest, check, new
    return (dest, *verify(dest, source, downloads))


# --------------------------------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------------------------------


def _check_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute name; refusing to extract")
    if ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} leaves the extraction directory ('..'); refusing to extract")
    return p


def _check_link(archive: Path, name: PurePosixPath, target: str, hard: bool) -> None:
    t = PurePosixPath(target)
    if t.is_absolute():
        raise ArchiveError(f"{archive}: link {str(name)!r} -> {target!r} points outside the tree; refusing to extract")
    # A symlink resolves from its own directory, a hard link from the archive's root.
    parts: list[str] = [] if hard else list(name.parent.parts)
    for part in t.parts:
        if part == "..":
            if not parts:
                raise ArchiveError(
                    f"{archive}: link {str(name)!r} -> {target!r} points outside the tree; refusing to extract"
                )
            parts.pop()
        elif part != ".":
            parts.append(part)


def _extract_tar(archive: Path, dest: Path) -> int:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()  # reads the whole index: a truncated archive fails here
            for m in members:
                name = _check_name(archive, m.name)
                if m.issym() or m.islnk():
                    _check_link(archive, name, m.linkname, hard=m.islnk())
                elif not (m.isfile() or m.isdir()):
                    raise ArchiveError(f"{archive}: member {m.name!r} is a device file or FIFO; refusing to extract")
            for m in members:
                tf.extract(m, dest, set_attrs=False, filter="data")
    except (tarfile.ReadError, EOFError, OSError, zlib_error()) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while extracting {archive} into {dest}") from e
        raise ArchiveError(f"{archive}: truncated or corrupt tar archive ({type(e).__name__}: {e})") from e
    except tarfile.FilterError as e:  # belt and braces: the checks above should have refused it first
        raise ArchiveError(f"{archive}: unsafe member ({e}); refusing to extract") from e
    return len(members)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _extract_zip(archive: Path, dest: Path) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                name = _check_name(archive, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    _check_link(archive, name, zf.read(info).decode("utf-8", "replace"), hard=False)
                    raise ArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract")
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type recorded
                    raise ArchiveError(f"{archive}: member {info.filename!r} is a device file or FIFO")
            for info in infos:
                zf.extract(info, dest)
    except (zipfile.BadZipFile, EOFError, zlib_error()) as e:
        raise ArchiveError(f"{archive}: truncated or corrupt zip archive ({type(e).__name__}: {e})") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while extracting {archive} into {dest}") from e
        raise ArchiveError(f"{archive}: cannot extract ({e})") from e
    return len(infos)


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a tar (any compression) or zip ``archive`` into ``dest`` after checking every member.

    Returns:
        The number of members.

    Raises:
        ArchiveError: not an archive, truncated or corrupt, or a member that is absolute, contains ``..``, is a link
            leading out of ``dest`` (zip: any symbolic link), or a device file/FIFO. Nothing is extracted then.
        DownloadError: the disk filled up.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest)
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError:
        is_tar = False
    if not is_tar:
        with open(archive, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zX":
            return _extract_tar(archive, dest)  # a compressed tar cut short: let tarfile name the problem
        if head == b"PK\x03\x04":  # a zip's index is at its end, so a cut-short zip starts right but has none
            raise ArchiveError(f"{archive}: truncated or corrupt zip archive (no central directory at its end)")
        raise ArchiveError(f"{archive}: not a tar or zip archive")
    return _extract_tar(archive, dest)


# --------------------------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------------------------


def _find_dir(base: Path, names: Iterable[str], must_hold: str | None = None) -> Path:
    """The shallowest directory under ``base`` named one of ``names`` (holding ``must_hold`` if given)."""
    wanted = set(names)
    for depth in range(4):
        for d in sorted(base.glob("/".join(["*"] * (depth + 1)))):
            if d.is_dir() and d.name in wanted and (must_hold is None or (d / must_hold).exists()):
                return d
    raise ArchiveError(
        f"the archive does not contain {' or '.join(sorted(wanted))}/"
        + (f" with {must_hold}" if must_hold else "")
        + " (wrong archive?)"
    )


def _find_presplit(base: Path) -> Path | None:
    for depth in range(3):
        for d in sorted(base.glob("/".join(["*"] * depth)) if depth else [base]):
            if (d / "train").is_dir() and (d / "test").is_dir():
                return d
    return None


def _layout_cifar100(raw: Path, final: Path, files: dict[str, Path]) -> None:
    folder = _find_dir(raw, ["cifar-100-python"], must_hold="meta")
    for f in ("train", "test", "meta"):
        if not (folder / f).is_file():
            raise ArchiveError(f"cifar-100-python/{f} is missing from the archive (wrong or partial archive?)")
    final.mkdir(parents=True)
    os.replace(folder, final / "cifar-100-python")


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _move_presplit(pre: Path, final: Path) -> None:
    final.mkdir(parents=True)
    for split in ("train", "test"):
        os.replace(pre / split, final / split)


def _yaml_split(path: Path) -> list[str]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=loader)  # noqa: S506 - a SafeLoader variant
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ArchiveError(f"{path}: expected a YAML mapping with a 'data' list of image paths (CODA-Prompt split)")
    return [str(p) for p in doc["data"]]


def _layout_imagenet_r(raw: Path, final: Path, files: dict[str, Path]) -> None:
    pre = _find_presplit(raw)
    if pre is not None:  # an archive that is already split (e.g. the PILOT one, given with --from)
        _move_presplit(pre, final)
        return
    tree = _find_dir(raw, ["imagenet-r"])
    final.mkdir(parents=True)
    for split in ("train", "test"):
        listed = _yaml_split(files[f"imagenet-r_{split}.yaml"])
        for rel in listed:
            parts = PurePosixPath(rel).parts
            if len(parts) < 2 or ".." in parts:
                raise ArchiveError(f"imagenet-r_{split}.yaml: unexpected path {rel!r}")
            src = tree / parts[-2] / parts[-1]
            if not src.is_file():
                raise ArchiveError(
                    f"imagenet-r_{split}.yaml lists {rel} but the archive has no {src.relative_to(raw)}"
                )
            (final / split / parts[-2]).mkdir(parents=True, exist_ok=True)
            os.replace(src, final / split / parts[-2] / parts[-1])
    (final / "splits").mkdir()
    for split in ("train", "test"):
        shutil.copyfile(files[f"imagenet-r_{split}.yaml"], final / "splits" / f"imagenet-r_{split}.yaml")


#: The seed of the per-class ImageNet-A split (the first seed of the paper's runs; see docs/datasets.md).
IMAGENET_A_SPLIT_SEED = 1993
IMAGENET_A_TEST_FRACTION = 0.2


def _layout_imagenet_a(raw: Path, final: Path, files: dict[str, Path]) -> None:
    from .base import stratified_test_mask

    pre = _find_presplit(raw)
    if pre is not None:
        _move_presplit(pre, final)
        return
    tree = _find_dir(raw, ["imagenet-a"])
    classes = _class_dirs(tree)
    if not classes:
        raise ArchiveError(f"{tree}: no class folders (wrong archive?)")
    paths: list[Path] = []
    targets: list[int] = []
    for ci, c in enumerate(classes):
        imgs = sorted(p for p in c.iterdir() if p.is_file())
        paths += imgs
        targets += [ci] * len(imgs)
    t = np.asarray(targets, dtype=np.int64)
    is_test = stratified_test_mask(t, IMAGENET_A_TEST_FRACTION, np.random.default_rng([IMAGENET_A_SPLIT_SEED, 3]))
    final.mkdir(parents=True)
    record: dict[str, Any] = {
        "rule": f"per class, round({IMAGENET_A_TEST_FRACTION} * n) test images (at least 1) drawn with "
        f"numpy default_rng([{IMAGENET_A_SPLIT_SEED}, 3]) over the sorted file names of each sorted class folder",
        "train": [],
        "test": [],
    }
    for p, test in zip(paths, is_test):
        split = "test" if test else "train"
        (final / split / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.replace(p, final / split / p.parent.name / p.name)
        record[split].append(f"{p.parent.name}/{p.name}")
    atomic_write_json(final / "split.json", record)


def _layout_cub200(raw: Path, final: Path, files: dict[str, Path]) -> None:
    folder = _find_dir(raw, ["CUB_200_2011"], must_hold="images.txt")
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        if not (folder / f).is_file():
            raise ArchiveError(f"CUB_200_2011/{f} is missing from the archive (wrong or partial archive?)")
    os.replace(folder, final)


DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _layout_domainnet(raw: Path, final: Path, files: dict[str, Path]) -> None:
    final.mkdir(parents=True)
    for d in DOMAINNET_DOMAINS:
        os.replace(_find_dir(raw, [d]), final / d)
    for name, path in files.items():
        if name.endswith((".txt", ".yaml")):
            shutil.copyfile(path, final / name)


_MB = 1_000_000
#: CODA-Prompt's split files at the commit that last changed them (HEAD of main when this was written).
CODA_COMMIT = "6417d4f68754be68b697c7ca2323ee61e791e1a3"
_CODA = f"https://raw.githubusercontent.com/GT-RIPL/CODA-Prompt/{CODA_COMMIT}/dataloaders/splits/"
#: Their git blob ids, as the repository publishes them (``git ls-tree -r CODA_COMMIT dataloaders/splits``).
CODA_BLOBS = {
    "imagenet-r_train.yaml": "a039907f411700078d505572df4df09ab6e2d669",
    "imagenet-r_test.yaml": "23c3881c77e253ff492bf97a2b8ed0b0a966adad",
    "domainnet_train.yaml": "bf86d2fb6a4cafaa8dc413bc25998e9ec9728809",
    "domainnet_test.yaml": "3c5407918567c97203c85b074ccc323ed4643a7e",
}


def _coda(filename: str, size: int) -> Source:
    where = f"git ls-tree of GT-RIPL/CODA-Prompt@{CODA_COMMIT[:8]}:dataloaders/splits/{filename}"
    return Source(
        _CODA + filename, filename, md5_source=where, size=size, archive=False, git_blob=CODA_BLOBS[filename]
    )


_DN = "http://csr.bu.edu/ftp/visda/2019/multi-source/"


def _domainnet_sources() -> tuple[Source, ...]:
    # Image zips and split lists as linked from http://ai.bu.edu/M3SDA/ ("cleaned version"); sizes from that page.
    zips = {"clipart": ("groundtruth/clipart.zip", 1300), "infograph": ("infograph.zip", 4000),
            "painting": ("groundtruth/painting.zip", 3700), "quickdraw": ("quickdraw.zip", 439),
            "real": ("real.zip", 5600), "sketch": ("sketch.zip", 2500)}  # fmt: skip
    out = [Source(_DN + path, f"{d}.zip", size=mb * _MB) for d, (path, mb) in zips.items()]
    for d in DOMAINNET_DOMAINS:
        for split in ("train", "test"):
            out.append(Source(f"{_DN}domainnet/txt/{d}_{split}.txt", f"{d}_{split}.txt", size=2 * _MB, archive=False))
    for split in ("train", "test"):
        out.append(_coda(f"domainnet_{split}.yaml", 4 * _MB))
    return tuple(out)


#: Every dataset ``sdlora data get`` knows. Sources, checksums and split rules are cited in docs/datasets.md.
DATASET_SPECS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec(
        name="cifar100",
        folder="cifar100",
        sources=(
            Source(
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "cifar-100-python.tar.gz",
                md5="eb9058c3a382ffc7106e4002c42a8d85",
                md5_source="torchvision.datasets.CIFAR100.tgz_md5",
                size=169 * _MB,
            ),
        ),
        layout=_layout_cifar100,
        extracted_size=178 * _MB,
        split="the official 50,000 train / 10,000 test files of the archive",
        licence="no licence stated; the authors ask to cite Krizhevsky (2009), 'Learning Multiple Layers of Features "
        "from Tiny Images'",
    ),
    "imagenet_r": DatasetSpec(
        name="imagenet_r",
        folder="imagenet-r",
        sources=(
            Source(
                "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                "imagenet-r.tar",
                md5="a61312130a589d0ca1a8fca1f2bd3337",
                md5_source="torch-uncertainty torch_uncertainty/datasets/imagenet/imagenet_r.py tgz_md5",
                size=2100 * _MB,
            ),
            _coda("imagenet-r_train.yaml", 1_137_662),
            _coda("imagenet-r_test.yaml", 284_216),
        ),
        layout=_layout_imagenet_r,
        extracted_size=2100 * _MB,
        split="CODA-Prompt's imagenet-r_{train,test}.yaml (24,000 / 6,000 images), materialised as train/ and test/ "
        "folders (labels: sorted wnids, as the official code's ImageFolder); a pre-split archive given with --from "
        "(e.g. PILOT's) is used as it is",
        licence="no licence file in the hendrycks/imagenet-r repository snapshot we read; images collected from the "
        "web, see the authors' terms. Split files: CODA-Prompt, MIT",
    ),
    "imagenet_a": DatasetSpec(
        name="imagenet_a",
        folder="imagenet-a",
        sources=(
            Source(
                "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                "imagenet-a.tar",
                md5="c3e55429088dc681f30d81f4726b6595",
                md5_source="torch-uncertainty torch_uncertainty/datasets/imagenet/imagenet_a.py tgz_md5",
                size=690 * _MB,
            ),
        ),
        layout=_layout_imagenet_a,
        extracted_size=690 * _MB,
        split=f"sdlora's seeded per-class split: {IMAGENET_A_TEST_FRACTION:.0%} test per class, seed "
        f"{IMAGENET_A_SPLIT_SEED}, file lists in split.json. NOT the paper's split: the PILOT pre-split archive "
        "the official code uses has no published file list; pass it with --from to use it",
        licence="the hendrycks/natural-adv-examples repository is MIT (its code); images collected from the web, "
        "see the authors' terms",
    ),
    "cub200": DatasetSpec(
        name="cub200",
        folder="CUB_200_2011",
        sources=(
            Source(
                "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                "CUB_200_2011.tgz",
                md5="97eceeb196236b17998738112f37df78",
                md5_source="Avalanche avalanche/benchmarks/datasets/cub200/cub200.py tgz_md5",
                size=1150 * _MB,
            ),
        ),
        layout=_layout_cub200,
        extracted_size=1200 * _MB,
        split="the official train_test_split.txt of the archive (5,994 / 5,794)",
        licence="no licence in the archive's README (it asks to cite the dataset); images from Flickr, see the "
        "CaltechDATA record's terms",
    ),
    "domainnet": DatasetSpec(
        name="domainnet",
        folder="domainnet",
        sources=_domainnet_sources(),
        layout=_layout_domainnet,
        extracted_size=17_600 * _MB,
        split="CODA-Prompt's domainnet_{train,test}.yaml (format coda_yaml, the preset's; InfLoRA's protocol); the "
        "official cleaned <domain>_{train,test}.txt lists are kept next to them (format txt)",
        licence="DomainNet: the terms on http://ai.bu.edu/M3SDA/ (not checked here); split files: CODA-Prompt, MIT",
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# the whole job
# --------------------------------------------------------------------------------------------------------------------


def is_complete(root: str | os.PathLike, name: str) -> bool:
    """Whether ``ROOT/<folder>`` of dataset ``name`` was finished by ``data get`` (its marker is there)."""
    spec = DATASET_SPECS[name]
    return (Path(root) / spec.folder / COMPLETE_MARKER).is_file()


def _match_from(spec: DatasetSpec, from_files: list[Path]) -> dict[str, Path]:
    """Map each ``--from`` file to a source: by file name, else (one archive only) to the dataset's archive."""
    by_name = {s.filename: s for s in spec.sources}
    archives = [s for s in spec.sources if s.archive]
    out: dict[str, Path] = {}
    for f in from_files:
        if not f.is_file():
            raise FileNotFoundError(f"--from {f}: no such file")
        if f.name in by_name:
            out[f.name] = f
        elif len(archives) == 1 and archives[0].filename not in out:
            out[archives[0].filename] = f
        else:
            known = ", ".join(by_name)
            raise ArchiveError(f"--from {f}: not a file of {spec.name} (expected one of: {known})")
    return out


_Pending = dict[str, tuple[str, Source, int]]


def _obtain(
    spec: DatasetSpec, downloads: Path, given: dict[str, Path], unverified: bool, progress: bool, timeout: float
) -> tuple[dict[str, Path], list[str], _Pending]:
    """Every file of ``spec``: downloaded (resumable) or taken from ``--from``, each verified."""
    files: dict[str, Path] = {}
    checks: list[str] = []
    pending: _Pending = {}
    for s in spec.sources:
        if s.filename in given:
            path = given[s.filename]
            try:
                check, new = verify(path, s, downloads)
                checks.append(f"{check} (--from {path})")
            except ArchiveError as e:
                if not unverified:
                    raise ArchiveError(
                        f"{e}. If {path} is a different archive on purpose (e.g. a pre-split copy), pass --unverified"
                    ) from None
                checks.append(f"{s.filename}: NOT verified (--unverified; --from {path}: {e})")
                new = None
            files[s.filename] = path
        else:
            files[s.filename], check, new = download(s, downloads, progress=progress, timeout=timeout)
            checks.append(check)
        if new is not None:
            pending[s.filename] = (new, s, files[s.filename].stat().st_size)
    return files, checks, pending


def _build(spec: DatasetSpec, files: dict[str, Path], staging: Path, marker: dict[str, Any], target: Path) -> None:
    """Extract into ``staging``, lay out, write the marker, and rename the result to ``target`` (the commit)."""
    if staging.exists():
        shutil.rmtree(staging)  # a previous extraction that did not finish
    try:
        raw = staging / "raw"
        for s in spec.sources:
            if s.archive:
                log.info("extracting %s", files[s.filename])
                safe_extract(files[s.filename], raw)
        final = staging / "final"
        spec.layout(raw, final, files)
        atomic_write_json(final / COMPLETE_MARKER, marker)
        os.replace(final, target)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(
                f"disk full while laying out {spec.name} in {staging}; free space and run again"
            ) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def get_dataset(
    name: str,
    root: str | os.PathLike,
    from_files: list[str | os.PathLike] | None = None,
    *,
    unverified: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
) -> GetReport:
    """Download (or take from ``from_files``), verify, extract and lay out dataset ``name`` in ``root``.

    Idempotent: a complete folder (with its marker) is left as it is; an interrupted call resumes its downloads and
    starts the extraction again.

    Raises:
        KeyError: unknown dataset.
        ArchiveError: wrong checksum, a truncated, unsafe or unexpected archive.
        DownloadError: no network, an HTTP error, a full disk.
        FileExistsError: ``ROOT/<folder>`` exists without the completion marker (not made by ``data get``).
    """
    if name not in DATASET_SPECS:
        raise KeyError(f"unknown dataset {name!r} for 'data get'; known: {', '.join(DATASET_SPECS)}")
    spec = DATASET_SPECS[name]
    root_p = Path(root).expanduser()
    target = root_p / spec.folder
    if (target / COMPLETE_MARKER).is_file():
        return GetReport(name, target, True, [f"completion marker {target / COMPLETE_MARKER}"])
    if target.exists():
        raise FileExistsError(
            f"{target} exists but has no {COMPLETE_MARKER}: it was not made by a finished 'sdlora data get'. Move "
            "it away (or point the preset's data.root at it if it is a copy you made)"
        )
    downloads = root_p / DOWNLOADS
    given = _match_from(spec, [Path(f).expanduser() for f in from_files or []])
    files, checks, pending = _obtain(spec, downloads, given, unverified, progress, timeout)
    marker = {
        "dataset": name,
        "split": spec.split,
        "licence": spec.licence,
        "files": [{"file": s.filename, "url": s.url} for s in spec.sources],
        "checks": checks,
    }
    try:
        _build(spec, files, root_p / f".staging-{spec.folder}", marker, target)
    except ArchiveError:
        # A file without a published or recorded checksum that turned out unusable is no reference: delete the
        # downloaded copy (never a --from file), so the next call fetches it again.
        for filename in pending:
            if filename not in given:
                (downloads / filename).unlink(missing_ok=True)
        raise
    record_checksums(downloads, pending)
    return GetReport(name, target, False, checks + [f"split: {spec.split}"])
