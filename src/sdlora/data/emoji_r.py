"""Emoji-R: emoji grouped by their CLDR sub-category, each drawn in six openly licensed styles (renditions).

An offline scenario in the regime of ImageNet-R (many object classes, each seen in strongly different drawing
styles), built from plain npm registry tarballs with no node or npm needed:

* labels from ``emoji-datasource`` (MIT; ``emoji.json``: ``category``, ``subcategory`` = CLDR sub-group);
* SVGs from the ``@iconify-json`` packages of six styles: Fluent colour, Fluent flat, Fluent high-contrast (MIT,
  Microsoft), OpenMoji (CC BY-SA 4.0), Noto (Apache-2.0, Google), Twemoji (CC BY 4.0, Twitter);
* rasterised with ``resvg-py`` (PyPI, a self-contained wheel), composited on white.

:func:`build_emoji_r` downloads the pinned tarballs (cached, sha256-verified), keeps the emoji present in all six
styles (Flags and Component dropped), keeps the sub-categories with at least ``min_per_class`` such emoji and writes
``<root>/images/<class>/<code points>_<style>.png``, ``manifest.csv``, ``emoji_r.json`` (what was built from what)
and the licences and attribution. The registered loader ``emoji_r`` reads that directory and splits it with the
run's seed: held-out emoji identities per class (``format: identities``, default) or held-out styles
(``format: styles``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .base import DataConfig, RawDataset, SplitData, register_dataset, stratified_test_mask

__all__ = [
    "EMOJI_R_PACKAGES",
    "EMOJI_R_STYLES",
    "NpmTarball",
    "build_emoji_r",
    "default_emoji_r_root",
    "fetch_tarball",
    "read_manifest",
]

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "https://registry.npmjs.org"
MANIFEST = "manifest.csv"
BUILD_RECORD = "emoji_r.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class NpmTarball:
    """One pinned npm package: its name, exact version and the sha256 of its registry tarball."""

    name: str
    version: str
    sha256: str
    license: str

    @property
    def url_path(self) -> str:
        """The registry path of the tarball (npm's layout: ``<name>/-/<basename>-<version>.tgz``)."""
        return f"{quote(self.name, safe='@/')}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def cache_name(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '+')}-{self.version}.tgz"


# Pinned 2026-12-06 from https://registry.npmjs.org (the sha256 of the .tgz as downloaded; the registry's own
# sha512 integrity values matched). A newer version changes the set of emoji, so the versions are fixed.
EMOJI_R_PACKAGES: dict[str, NpmTarball] = {
    "labels": NpmTarball(
        "emoji-datasource", "16.0.0", "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9", "MIT"
    ),
    "fluent_color": NpmTarball(
        "@iconify-json/fluent-emoji",
        "1.2.7",
        "8044210dbf11e016d4de85f15d01a243423bd832457e7e2491df1b751c0e272b",
        "MIT",
    ),
    "fluent_flat": NpmTarball(
        "@iconify-json/fluent-emoji-flat",
        "1.2.6",
        "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175",
        "MIT",
    ),
    "fluent_high_contrast": NpmTarball(
        "@iconify-json/fluent-emoji-high-contrast",
        "1.2.6",
        "0b92d48c90d2200bd499e3cdd09a127ca6a8c8ddefd34c35eb5a1e4994012ae0",
        "MIT",
    ),
    "openmoji": NpmTarball(
        "@iconify-json/openmoji",
        "1.2.29",
        "03181e2c156cab35cf4a62f1f7886bd971d59212e75ac3f189d5a4cae3930fc5",
        "CC-BY-SA-4.0",
    ),
    "noto": NpmTarball(
        "@iconify-json/noto", "1.2.9", "3e918d88fc945c0bb3d468dbace6f88caef67f01c9f0e7bcae0915a042e8f1ad", "Apache-2.0"
    ),
    "twemoji": NpmTarball(
        "@iconify-json/twemoji",
        "1.2.5",
        "19046dff7d8707ce96212ec86468b36ac5f8e60409629dd13f809265c6d0ebb7",
        "CC-BY-4.0",
    ),
}

#: The six styles, in this order everywhere. The Fluent colour set ships no ``chars.json``; its icon names equal the
#: flat set's, so its code points are looked up there.
EMOJI_R_STYLES = ("fluent_color", "fluent_flat", "fluent_high_contrast", "openmoji", "noto", "twemoji")
_CHARS_FROM = {"fluent_color": "fluent_flat"}
DROPPED_CATEGORIES = ("Flags", "Component")


def default_emoji_r_root() -> Path:
    """``<sdlora cache>/data/emoji_r`` (see :func:`sdlora.fileio.default_cache_dir`)."""
    from ..fileio import default_cache_dir

    return default_cache_dir() / "data" / "emoji_r"


# --------------------------------------------------------------------------------------------------------------------
# Download, cache, verify
# --------------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_tarball(pkg: NpmTarball, cache_dir: str | os.PathLike, registry: str = DEFAULT_REGISTRY) -> Path:
    """The path of ``pkg``'s tarball in ``cache_dir``, downloaded from ``registry`` when not cached.

    A cached file is used only if its sha256 matches the pin (otherwise it is fetched again); a download is written
    to a temporary file and moved into the cache only after its sha256 matched, so the cache never holds a partial
    or wrong tarball.

    Raises:
        ValueError: The downloaded tarball's sha256 differs from the pin (the message names the package, the URL and
            both digests).
        OSError: The registry cannot be reached (the message names the URL).
    """
    cache = Path(cache_dir).expanduser()
    target = cache / pkg.cache_name
    if target.is_file():
        if _sha256(target) == pkg.sha256:
            return target
        log.warning("emoji_r: cached %s does not match its sha256 pin; downloading it again", target)
    url = f"{registry.rstrip('/')}/{pkg.url_path}"
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".tgz")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 (an https/http registry URL)
                    shutil.copyfileobj(resp, out)
            except (urllib.error.URLError, TimeoutError) as e:
                raise OSError(f"emoji_r: cannot download {pkg.name}@{pkg.version} from {url}: {e}") from e
        got = _sha256(tmp)
        if got != pkg.sha256:
            raise ValueError(
                f"emoji_r: {pkg.name}@{pkg.version} downloaded from {url} has sha256 {got}, expected {pkg.sha256}; "
                "refusing it (a changed or corrupted tarball, or a wrong registry)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _read_members(path: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The files ``package/<name>`` of an npm tarball that exist, by name (read without extracting anything)."""
    wanted = {f"package/{n}": n for n in names}
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name in wanted:
                f = tar.extractfile(member)
                assert f is not None
                found[wanted[member.name]] = f.read()
    return found


# --------------------------------------------------------------------------------------------------------------------
# Icon sets and the choice of emoji
# --------------------------------------------------------------------------------------------------------------------


class IconSet:
    """An Iconify JSON icon set (``icons.json``) with its code point map (``chars.json``)."""

    def __init__(self, icons: Mapping[str, Any], chars: Mapping[str, str]):
        self.icons: Mapping[str, Any] = icons.get("icons", {})
        self.aliases: Mapping[str, Any] = icons.get("aliases", {})
        self.width = float(icons.get("width", 16))
        self.height = float(icons.get("height", 16))
        self.chars = chars

    def name_for(self, code_points: Sequence[str]) -> str | None:
        """The icon drawn for the first of ``code_points`` (lower-case hex, ``-``-joined) this set has."""
        for cp in code_points:
            name = self.chars.get(cp)
            if name is not None and (name in self.icons or name in self.aliases):
                return name
        return None

    def svg(self, name: str) -> str:
        """A standalone SVG document of icon ``name`` (aliases resolved, their flips and rotations applied)."""
        flips = [False, False]
        rotate = 0
        seen = set()
        while name in self.aliases and name not in self.icons:
            if name in seen:
                raise ValueError(f"alias loop at icon {name!r}")
            seen.add(name)
            alias = self.aliases[name]
            flips[0] ^= bool(alias.get("hFlip", False))
            flips[1] ^= bool(alias.get("vFlip", False))
            rotate += int(alias.get("rotate", 0))
            name = alias["parent"]
        icon = self.icons[name]
        left, top = float(icon.get("left", 0)), float(icon.get("top", 0))
        w, h = float(icon.get("width", self.width)), float(icon.get("height", self.height))
        body = icon["body"]
        cx, cy = left + w / 2, top + h / 2
        transforms = []
        if rotate % 4:
            transforms.append(f"rotate({90 * (rotate % 4)} {cx:g} {cy:g})")
        if flips[0] or flips[1]:
            sx, sy = (-1 if flips[0] else 1), (-1 if flips[1] else 1)
            transforms.append(f"translate({cx:g} {cy:g}) scale({sx} {sy}) translate({-cx:g} {-cy:g})")
        if transforms:
            body = f'<g transform="{" ".join(transforms)}">{body}</g>'
        # color: the high-contrast set draws with currentColor; black line art on the white background.
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left:g} {top:g} {w:g} {h:g}" color="#000000">{body}</svg>'
        )


@dataclass(frozen=True)
class EmojiEntry:
    """One kept emoji: its class (CLDR sub-category), code points, short name and icon name per style."""

    subcategory: str
    unified: str
    short_name: str
    icons: tuple[tuple[str, str], ...]


def _code_points(row: Mapping[str, Any]) -> list[str]:
    """The keys under which icon sets may list an emoji: fully qualified, non-qualified, without FE0F."""
    out: list[str] = []
    for key in ("unified", "non_qualified"):
        value = row.get(key)
        if value:
            cp = str(value).lower()
            for candidate in (cp, cp.replace("-fe0f", "")):
                if candidate not in out:
                    out.append(candidate)
    return out


def select_emoji(
    rows: Sequence[Mapping[str, Any]], sets: Mapping[str, IconSet], min_per_class: int
) -> list[EmojiEntry]:
    """The emoji drawn in every style of ``sets``, outside :data:`DROPPED_CATEGORIES`, in sub-categories with at
    least ``min_per_class`` of them; ordered by class name, then by ``sort_order``."""
    by_class: dict[str, list[tuple[int, EmojiEntry]]] = {}
    for row in rows:
        if row.get("category") in DROPPED_CATEGORIES:
            continue
        cps = _code_points(row)
        names = {style: sets[_CHARS_FROM.get(style, style)].name_for(cps) for style in sets}
        icons = []
        for style, name in names.items():
            # The Fluent colour set is looked up by the flat set's name: it must have that icon itself.
            if name is None or not (name in sets[style].icons or name in sets[style].aliases):
                break
            icons.append((style, name))
        else:
            entry = EmojiEntry(
                str(row["subcategory"]), str(row["unified"]).lower(), str(row["short_name"]), tuple(icons)
            )
            by_class.setdefault(entry.subcategory, []).append((int(row.get("sort_order", 0)), entry))
    kept: list[EmojiEntry] = []
    for cls in sorted(by_class):
        if len(by_class[cls]) >= min_per_class:
            kept.extend(e for _, e in sorted(by_class[cls], key=lambda t: t[0]))
    return kept


def class_folder(subcategory: str) -> str:
    """File-system name of a class: ``sky & weather`` -> ``sky-weather``."""
    return re.sub(r"[^a-z0-9]+", "-", subcategory.lower()).strip("-")


# --------------------------------------------------------------------------------------------------------------------
# Rendering and the dataset directory
# --------------------------------------------------------------------------------------------------------------------


def render_png(svg: str, size: int) -> bytes:
    """``svg`` rasterised to a ``size`` x ``size`` RGB PNG on white (resvg; no system fonts: emoji SVGs hold paths)."""
    try:
        import resvg_py
    except ImportError as e:
        raise ImportError(
            "emoji_r needs resvg-py to rasterise the SVGs: pip install resvg-py (or pip install 'sdlora[renditions]')"
        ) from e
    from PIL import Image

    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff", skip_system_fonts=True)
    with Image.open(io.BytesIO(bytes(png))) as im:
        rgba = im.convert("RGBA")
    # background= already paints white under the drawing; compositing again makes the alpha channel irrelevant.
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    out = io.BytesIO()
    flat.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _load_sources(
    packages: Mapping[str, NpmTarball], cache_dir: Path, registry: str
) -> tuple[list[dict[str, Any]], dict[str, IconSet], dict[str, dict[str, bytes]]]:
    """Fetch every package and read what the build needs: the emoji rows, the icon sets, each package's files."""
    missing = [k for k in ("labels", *EMOJI_R_STYLES) if k not in packages]
    if missing:
        raise ValueError(f"emoji_r: packages lacks entries for {missing}")
    files: dict[str, dict[str, bytes]] = {}
    for key, pkg in packages.items():
        path = fetch_tarball(pkg, cache_dir, registry)
        wanted = (
            ["package.json", "LICENSE", "emoji.json"]
            if key == "labels"
            else ["package.json", "LICENSE", "icons.json", "chars.json", "info.json"]
        )
        files[key] = _read_members(path, wanted)
        need = ["emoji.json"] if key == "labels" else ["icons.json", "info.json"]
        absent = [n for n in need if n not in files[key]]
        if absent:
            raise ValueError(f"emoji_r: {pkg.name}@{pkg.version} ({path}) has no package/{', package/'.join(absent)}")
    rows = json.loads(files["labels"]["emoji.json"])
    sets = {
        style: IconSet(json.loads(files[style]["icons.json"]), json.loads(files[style].get("chars.json", b"{}")))
        for style in EMOJI_R_STYLES
    }
    return rows, sets, files


def _write_licences(out: Path, packages: Mapping[str, NpmTarball], files: Mapping[str, Mapping[str, bytes]]) -> None:
    lic = out / "LICENSES"
    lic.mkdir()
    lines = [
        "# Emoji-R: sources, licences and attribution",
        "",
        "Every image in images/ is a rasterisation (resvg, on white) of an SVG from the package named below,",
        "unchanged otherwise; the class labels come from emoji-datasource. Each style keeps its own licence:",
        "OpenMoji's images are shared under CC BY-SA 4.0 and Twemoji's under CC BY 4.0 (attribution below),",
        "Noto's under Apache-2.0, the Fluent sets' and emoji-datasource's under MIT. Each package's metadata",
        "(and LICENSE file, where the package has one) is in LICENSES/.",
        "",
        "| part | npm package | version | sha256 of the tarball | licence | author |",
        "|---|---|---|---|---|---|",
    ]
    for key, pkg in packages.items():
        info = json.loads(files[key].get("info.json", b"{}"))
        author = info.get("author", {})
        lic_info = info.get("license", {})
        who = f"{author.get('name', '')} {author.get('url', '')}".strip() or "see LICENSES/"
        licence = f"{lic_info.get('title', pkg.license)} {lic_info.get('url', '')}".strip()
        lines.append(f"| {key} | {pkg.name} | {pkg.version} | {pkg.sha256} | {licence} | {who} |")
        stem = pkg.name.lstrip("@").replace("/", "+")
        for fname in ("LICENSE", "info.json", "package.json"):
            if fname in files[key]:
                (lic / f"{stem}.{fname}").write_bytes(files[key][fname])
    (out / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")


def _settings(packages: Mapping[str, NpmTarball], size: int, min_per_class: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "size": size,
        "min_per_class": min_per_class,
        "packages": {k: {"name": p.name, "version": p.version, "sha256": p.sha256} for k, p in packages.items()},
    }


def build_emoji_r(
    root: str | os.PathLike,
    *,
    size: int = 112,
    min_per_class: int = 20,
    cache_dir: str | os.PathLike | None = None,
    registry: str | None = None,
    packages: Mapping[str, NpmTarball] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build the Emoji-R directory at ``root`` (or reuse it when it was built with the same settings).

    Args:
        root: The dataset directory to write (``data.root`` of a run).
        size: Side of the rendered images in pixels.
        min_per_class: Keep sub-categories with at least this many emoji drawn in all six styles.
        cache_dir: Where the tarballs are cached (default ``<sdlora cache>/npm``).
        registry: npm registry base URL (default ``$SDLORA_NPM_REGISTRY`` or https://registry.npmjs.org).
        packages: The pinned packages (default :data:`EMOJI_R_PACKAGES`); keys ``labels`` and the styles.
        overwrite: Replace a directory at ``root`` that was built with other settings or is not an Emoji-R build.
        progress: Called as ``progress(done, total)`` while rendering.

    Returns:
        The build record (also written to ``<root>/emoji_r.json``): settings, classes, counts, build seconds.

    Raises:
        FileExistsError: ``root`` holds something else and ``overwrite`` is false.
        ValueError: A tarball's sha256 differs from its pin, or a package lacks a needed file.
        OSError: The registry cannot be reached and a tarball is not cached.
    """
    if size < 8:
        raise ValueError(f"size: must be at least 8 pixels, got {size}")
    if min_per_class < 2:
        raise ValueError(f"min_per_class: must be at least 2 (one emoji each side of the split), got {min_per_class}")
    from ..fileio import default_cache_dir

    root = Path(root).expanduser()
    packages = dict(packages if packages is not None else EMOJI_R_PACKAGES)
    settings = _settings(packages, size, min_per_class)
    record_path = root / BUILD_RECORD
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("settings") == settings:
            log.info("emoji_r: %s already built with these settings; reusing it", root)
            return dict(old)
    if root.exists() and any(root.iterdir()) and not overwrite:
        what = "built with other settings" if record_path.is_file() else "not an Emoji-R build"
        raise FileExistsError(f"emoji_r: {root} exists and is {what}; choose another root or pass overwrite")
    t0 = time.perf_counter()
    registry = registry or os.environ.get("SDLORA_NPM_REGISTRY") or DEFAULT_REGISTRY
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "npm"
    rows, sets, files = _load_sources(packages, cache, registry)
    entries = select_emoji(rows, sets, min_per_class)
    if not entries:
        raise ValueError(f"emoji_r: no sub-category has {min_per_class} emoji drawn in all six styles")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-building-"))
    try:
        manifest = _render_all(tmp, entries, sets, size, progress)
        _write_licences(tmp, packages, files)
        classes = sorted({e.subcategory for e in entries})
        record = {
            "settings": settings,
            "classes": classes,
            "emoji_per_class": {c: sum(e.subcategory == c for e in entries) for c in classes},
            "num_classes": len(classes),
            "num_emoji": len(entries),
            "num_images": len(manifest),
            "styles": list(EMOJI_R_STYLES),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def _render_all(
    out: Path,
    entries: Sequence[EmojiEntry],
    sets: Mapping[str, IconSet],
    size: int,
    progress: Callable[[int, int], None] | None,
) -> list[dict[str, str]]:
    manifest = []
    total = len(entries) * len(EMOJI_R_STYLES)
    for i, e in enumerate(entries):
        folder = out / "images" / class_folder(e.subcategory)
        folder.mkdir(parents=True, exist_ok=True)
        for style, icon in e.icons:
            rel = f"images/{class_folder(e.subcategory)}/{e.unified}_{style}.png"
            (out / rel).write_bytes(render_png(sets[style].svg(icon), size))
            manifest.append({"path": rel, "class": e.subcategory, "emoji": e.unified, "name": e.short_name,
                             "style": style, "icon": icon})  # fmt: skip
        if progress is not None:
            progress((i + 1) * len(EMOJI_R_STYLES), total)
    with open(out / MANIFEST, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "class", "emoji", "name", "style", "icon"])
        w.writeheader()
        w.writerows(manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# The registered loader
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The class names (sorted) and the rows of ``<root>/manifest.csv`` (``path`` made absolute).

    Raises:
        FileNotFoundError: No manifest (the message says how to build the dataset) or a listed image is missing.
        ValueError: The manifest lacks a column.
    """
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"emoji_r: {path} not found; build the dataset first: sdlora build-data emoji_r --root {root} "
            "(downloads about 50 MB from the npm registry once; see docs/datasets.md)"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        lacking = {"path", "class", "emoji", "style"} - set(reader.fieldnames or ())
        if lacking:
            raise ValueError(f"emoji_r: {path} lacks the column(s) {sorted(lacking)}; rebuild the dataset")
        rows = [dict(r) for r in reader]
    for r in rows:
        r["path"] = str(root / r["path"])
    absent = [r["path"] for r in rows if not os.path.isfile(r["path"])]
    if absent:
        raise FileNotFoundError(
            f"emoji_r: {len(absent)} image(s) listed in {path} are missing, e.g. {absent[0]}; rebuild with "
            f"sdlora build-data emoji_r --root {root} --overwrite"
        )
    return sorted({r["class"] for r in rows}), rows


def split_emoji_r(
    rows: Sequence[Mapping[str, str]], classes: Sequence[str], fmt: str, test_fraction: float, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean test mask over ``rows`` and a description of the held-out part.

    ``identities``: per class, ``test_fraction`` of its emoji (at least one, all styles of each) are test emoji.
    ``styles``: ``round(test_fraction * styles)`` styles (at least one, at most all but one) are test styles.
    Both drawn with ``seed``.
    """
    rng = np.random.default_rng([seed, 3])
    if fmt == "identities":
        index = {c: i for i, c in enumerate(classes)}
        ids = sorted({(r["class"], r["emoji"]) for r in rows})
        id_test = stratified_test_mask(np.asarray([index[c] for c, _ in ids], dtype=np.int64), test_fraction, rng)
        held = {ids[i] for i in np.flatnonzero(id_test)}
        mask = np.asarray([(r["class"], r["emoji"]) in held for r in rows], dtype=bool)
        return mask, {"held_out": "emoji identities", "test_emoji": sorted(e for _, e in held)}
    if fmt == "styles":
        present = sorted({r["style"] for r in rows}, key=lambda s: (s not in EMOJI_R_STYLES, s))
        if len(present) < 2:
            raise ValueError(f"emoji_r: format styles needs at least two styles, the manifest has {present}")
        n = min(len(present) - 1, max(1, int(round(test_fraction * len(present)))))
        test_styles = sorted(present[i] for i in rng.permutation(len(present))[:n])
        mask = np.asarray([r["style"] in test_styles for r in rows], dtype=bool)
        return mask, {"held_out": "styles", "test_styles": test_styles}
    raise ValueError(f"emoji_r: unknown format {fmt!r} (identities or styles)")


@register_dataset("emoji_r", formats=("identities", "styles"), default_format="identities")
def _emoji_r(cfg: DataConfig, seed: int) -> RawDataset:
    root = Path(cfg.root).expanduser() if cfg.root is not None else default_emoji_r_root()
    classes, rows = read_manifest(root)
    fmt = cfg.resolved_format or "identities"
    is_test, held = split_emoji_r(rows, classes, fmt, cfg.test_fraction, seed)
    index = {c: i for i, c in enumerate(classes)}
    targets = np.asarray([index[r["class"]] for r in rows], dtype=np.int64)
    paths = [r["path"] for r in rows]
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    rel = [os.path.relpath(p, root) for p in paths]
    record = {
        "dataset": cfg.name,
        "root": str(root),
        "seed": seed,
        "format": fmt,
        "test_fraction": cfg.test_fraction,
        "classes": classes,
        **held,
        "train": [[rel[i], int(targets[i])] for i in tr],
        "test": [[rel[i], int(targets[i])] for i in te],
    }
    what = held["held_out"]
    return RawDataset(
        SplitData(targets[tr], paths=[paths[i] for i in tr]),
        SplitData(targets[te], paths=[paths[i] for i in te]),
        classes,
        info={
            "root": str(root),
            "format": fmt,
            "split": f"held-out {what}, test_fraction={cfg.test_fraction}, seed={seed}",
        },  # fmt: skip
        split_record=record,
    )
