"""Crash-safe file writes and checked reads.

A run directory is read back by ``--resume`` and by ``sdlora report``; a process killed half-way through a write must
never leave a truncated ``results.json`` or config behind. Every writer here therefore writes a temporary file in the
*same* directory (so the final ``os.replace`` is an atomic rename on one filesystem), fsyncs it, and only then
replaces the target. Readers raise errors that name the offending file.

Also sdlora's user cache directory (:func:`default_cache_dir`: downloads, converted weights). Only the standard
library is used, so any module may import this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "default_cache_dir",
    "read_json",
    "sha256_file",
    "to_jsonable",
]

_PathLike = str | os.PathLike


def _fsync_dir(directory: str) -> None:
    # The rename itself lives in the directory entry; without syncing the directory a power loss can undo it.
    # Not every platform lets you open a directory (Windows), so this is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: _PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a hidden temporary file next to ``path``, which is flushed, fsynced and then renamed over
    ``path`` with :func:`os.replace`. Readers therefore see either the old content or the new one, never a mix.
    On any exception the temporary file is removed and an existing ``path`` is left untouched. The parent
    directory must exist. An existing file keeps its permission bits.

    Args:
        path: Destination file.
        data: Content to write.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave temp files behind either.
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path: _PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`).

    Args:
        path: Destination file.
        text: Content; newlines are written as given (no platform translation).
        encoding: Text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN; ``json.dump`` would otherwise write the invalid token
    ``NaN``), tuples become lists, and numpy scalars/arrays are converted through ``tolist()`` without importing numpy.

    Args:
        obj: Nested dicts, lists, tuples, scalars, numpy values.

    Returns:
        An equivalent object made of dict, list, str, int, float, bool and None.

    Raises:
        TypeError: For values that have no JSON form.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def atomic_write_json(path: _PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write_bytes`).

    NaN and infinities are written as ``null`` (see :func:`to_jsonable`); the file ends with a newline.

    Args:
        path: Destination file.
        obj: JSON-serializable data.
        indent: Indentation width.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def read_json(path: _PathLike) -> Any:
    """Read a JSON file.

    Args:
        path: File to read.

    Returns:
        The decoded content.

    Raises:
        FileNotFoundError: If ``path`` does not exist (the message names it).
        ValueError: If the file is not valid UTF-8 JSON; the message names the file, line and column.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def sha256_file(path: _PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks so large weight files do not fill memory.

    Args:
        path: File to hash.
        chunk_size: Bytes read per iteration.

    Returns:
        64 lowercase hex characters.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Return sdlora's user cache directory (not created).

    ``$SDLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/sdlora``, else ``~/.cache/sdlora``.
    """
    env = os.environ.get("SDLORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "sdlora"
    return Path.home() / ".cache" / "sdlora"
