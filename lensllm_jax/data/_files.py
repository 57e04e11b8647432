"""File access shared by the package: whole-file-or-nothing writes, reads of a user's
input file whose failures are one-line `LensLLMInputError`s, and the cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

from lensllm_jax.errors import LensLLMInputError

__all__ = ["CACHE_ENV", "cache_root", "read_input", "write_atomic"]

CACHE_ENV = "LENSLLM_CACHE"


def read_input(
    path: str | PathLike[str], *, kind: str, missing_hint: str, folder_hint: str
) -> bytes:
    """The bytes of a user's input file; a missing file, a folder (not a `kind`) or an
    unreadable file is one `LensLLMInputError` line naming the path, with the hints given."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise LensLLMInputError("file not found", file=path, hint=missing_hint) from None
    except IsADirectoryError:
        raise LensLLMInputError(f"is a folder, not a {kind}", file=path, hint=folder_hint) from None
    except OSError as err:
        raise LensLLMInputError(f"cannot read ({err.strerror})", file=path) from None


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


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$LENSLLM_CACHE``, else ``$XDG_CACHE_HOME/lensllm_jax``, else ``~/.cache/lensllm_jax``."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lensllm_jax"
