"""Build the fortunes scenario: quotes labelled by their Debian ``fortunes`` category, as a text CSV.

Debian's ``fortunes`` and ``fortunes-min`` packages install one file per category in ``/usr/share/games/fortunes``
(``people``, ``definitions``, ``cookie``, ``computers`` ...); items in a file are separated by lines holding only
``%``. This script writes ``text,label`` rows readable by the ``text_csv`` dataset (``data.name: text_csv``, the
split is drawn there with the run's seed) for the categories with at least ``--min-items`` items.

Cleaning, and why: overstrike sequences (``c\\bc``, bold in a terminal) are reduced to the printed character;
whitespace runs (line breaks included) become one space, since the tokenizer ignores layout; an item found in more
than one category is dropped everywhere (it would be a sample with two labels), and a repeat inside one category is
kept once.

Usage::

    apt-get install fortunes fortunes-min
    python benchmarks/build_fortunes.py --out data/fortunes.csv
    sdlora run demo-fortunes --set data.root=data/fortunes.csv   (the preset reads the default output path)
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import Counter
from pathlib import Path

DEFAULT_SRC = "/usr/share/games/fortunes"
DEFAULT_OUT = "data/fortunes.csv"
_SEPARATOR = re.compile(r"^%[ \t]*\r?$", re.M)
_OVERSTRIKE = re.compile(r".\x08")


def read_fortune_file(path: str | os.PathLike) -> list[str]:
    """The cleaned, non-empty items of one fortune file (UTF-8; Latin-1 files are read as Latin-1)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    items = []
    for chunk in _SEPARATOR.split(text):
        item = " ".join(_OVERSTRIKE.sub("", chunk).split())
        if item:
            items.append(item)
    return items


def collect(src: str | os.PathLike, min_items: int) -> dict[str, list[str]]:
    """Category -> unique items, for the categories of ``src`` with at least ``min_items`` items after cleaning.

    Files ending ``.dat`` (strfile indexes) or ``.u8`` (links to the UTF-8 text) and sub-directories are not
    categories. Raises ``FileNotFoundError`` naming ``src`` and the packages when it holds no fortune file.
    """
    src = Path(src)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")) if src.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no fortune files in {src}; install them with: apt-get install fortunes fortunes-min (Debian/Ubuntu)"
        )
    per_file = {p.name: list(dict.fromkeys(read_fortune_file(p))) for p in files}
    seen_in = Counter(item for items in per_file.values() for item in items)
    out = {}
    for name, items in per_file.items():
        kept = [item for item in items if seen_in[item] == 1]
        if len(kept) >= min_items:
            out[name] = kept
    return out


def write_csv(categories: dict[str, list[str]], out: str | os.PathLike) -> int:
    """Write ``text,label`` rows (categories in name order) and return the row count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label in sorted(categories):
            for item in categories[label]:
                w.writerow([item, label])
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=DEFAULT_SRC, help=f"fortune files directory (default {DEFAULT_SRC})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"CSV to write (default {DEFAULT_OUT})")
    p.add_argument("--min-items", type=int, default=100, help="keep categories with this many items (default 100)")
    args = p.parse_args(argv)
    try:
        categories = collect(args.src, args.min_items)
    except FileNotFoundError as e:
        print(f"build_fortunes: error: {e}", file=sys.stderr)
        return 2
    if len(categories) < 2:
        msg = f"fewer than 2 categories with {args.min_items} items in {args.src}"
        print(f"build_fortunes: error: {msg}", file=sys.stderr)
        return 2
    n = write_csv(categories, args.out)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sorted(categories.items(), key=lambda kv: -len(kv[1])))
    print(f"{args.out}: {n} items in {len(categories)} categories ({sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
