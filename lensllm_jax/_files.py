"""Whole-file-or-nothing writes, shared by every writer of the package."""

from __future__ import annotations

import os
import tempfile
from os import PathLike
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | PathLike[str], data: bytes | str) -> Path:
    """Write `data` (text is UTF-8, newlines as given) to `path` so that a reader never sees
    a partial file: a temp file beside it, flushed and fsynced, then renamed over it. On any
    error (or interrupt) the temp file is removed and `path` is untouched. Returns the path."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
