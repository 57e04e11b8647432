"""File access shared by the package: whole-file-or-nothing writes, bounded reads of a
user's files whose failures are one-line `LensLLMInputError`s, bounded JSON, and the cache
folder.

Every reader here refuses what is not a regular file (a folder, a FIFO, a device, a
socket) before reading a byte: a FIFO is opened without blocking and /dev/zero is never
streamed. What a reader may allocate is bounded by the file's real size and a limit per
kind of file; JSON is bounded in nesting depth and in the digits of an integer, and a
string holding a lone surrogate (invalid Unicode) is refused.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "CACHE_ENV",
    "cache_root",
    "check_output_target",
    "describe_os_error",
    "file_kind",
    "load_json",
    "open_regular",
    "read_input",
    "read_regular",
    "write_atomic",
]

CACHE_ENV = "LENSLLM_CACHE"
GiB = 1 << 30
JSON_MAX_DEPTH = 64  # configs, manifests, headers and task lines are far shallower
JSON_MAX_DIGITS = 64  # an integer with more digits is no count, size or offset


def file_kind(mode: int) -> str:
    """A file's kind in words, from its `st_mode`."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def open_regular(
    path: str | PathLike[str],
    *,
    limit: int | None = None,
    what: str = "file",
    error: type[LensLLMInputError] = LensLLMInputError,
    missing_hint: str | None = None,
    folder_hint: str | None = None,
) -> tuple[int, int]:
    """(file descriptor, size) of a regular file opened for reading, or one `error` line
    naming the path: missing, unreadable, not a regular file (a FIFO is opened without
    blocking, so this never hangs), or larger than `limit` bytes. The caller closes the fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error("file not found", file=path, hint=missing_hint) from None
    except OSError as err:
        raise error(f"cannot read ({err.strerror})", file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise error(f"is a folder, not a {what}", file=path, hint=folder_hint)
            kind = file_kind(st.st_mode)
            raise error(f"is {kind}, not a regular {what}", file=path, hint=f"give a {what}")
        if limit is not None and st.st_size > limit:
            raise error(
                f"is {_size(st.st_size)}, more than the {_size(limit)} lensllm reads from a {what}",
                file=path,
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(
    path: str | PathLike[str],
    *,
    limit: int,
    what: str = "file",
    error: type[LensLLMInputError] = LensLLMInputError,
    missing_hint: str | None = None,
    folder_hint: str | None = None,
    offset: int = 0,
    length: int | None = None,
) -> bytes:
    """The bytes of a regular file (`open_regular`), or `length` bytes from `offset`; never
    more than its size at opening (a file that grows while read is cut there)."""
    fd, size = open_regular(
        path,
        limit=limit,
        what=what,
        error=error,
        missing_hint=missing_hint,
        folder_hint=folder_hint,
    )
    try:
        want = max(size - offset, 0) if length is None else min(length, max(size - offset, 0))
        chunks, got = [], 0
        while got < want:
            block = os.pread(fd, min(want - got, 1 << 24), offset + got)
            if not block:
                break
            chunks.append(block)
            got += len(block)
        return b"".join(chunks)
    except OSError as err:
        raise error(f"cannot read ({err.strerror})", file=path) from None
    finally:
        os.close(fd)


def read_input(
    path: str | PathLike[str],
    *,
    kind: str,
    missing_hint: str,
    folder_hint: str,
    limit: int = 2 * GiB,
) -> bytes:
    """The bytes of a user's input file; a missing file, a folder (not a `kind`), a FIFO or
    device, a file over `limit` bytes or an unreadable file is one `LensLLMInputError` line
    naming the path, with the hints given."""
    return read_regular(
        path, limit=limit, what=kind, missing_hint=missing_hint, folder_hint=folder_hint
    )


class _TooManyDigits(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text) > JSON_MAX_DIGITS + 1:
        raise _TooManyDigits(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(ascii(k))
        out[k] = v
    return out


def load_json(
    text: str | bytes,
    *,
    where: str | PathLike[str],
    error: type[LensLLMInputError] = LensLLMInputError,
    max_depth: int = JSON_MAX_DEPTH,
    what: str = "JSON",
    unique_keys: bool = False,
) -> Any:
    """`json.loads`, bounded: nesting deeper than `max_depth`, an integer of more than
    `JSON_MAX_DIGITS` digits, a lone surrogate in a string or a key, text that is not
    UTF-8, or bad syntax is one `error` line naming `where` (with `unique_keys`, also a key
    given twice in one object). Cost: O(len(text))."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        hook = _unique_pairs if unique_keys else None
        value = json.loads(text, parse_int=_bounded_int, object_pairs_hook=hook)
    except UnicodeDecodeError as err:
        raise error(f"{what} is not UTF-8 (byte {err.start})", file=where) from None
    except RecursionError:
        raise error(
            f"{what} nested too deeply (more than {max_depth} levels)", file=where
        ) from None
    except _DuplicateKey as err:
        raise error(f"{what} gives the key {err} twice", file=where) from None
    except _TooManyDigits as err:
        raise error(f"{what} holds {err}; not a number lensllm reads", file=where) from None
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if err.lineno == 1 else f"line {err.lineno}, column {err.colno}"
        raise error(f"bad {what} ({err.msg} at {at})", file=where) from None
    _check_tree(value, where, error, max_depth, what)
    return value


def _check_tree(
    value: Any, where: Any, error: type[LensLLMInputError], max_depth: int, what: str
) -> None:
    """Depth and Unicode checks of a parsed JSON value, iteratively (no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, where, error, what)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise error(f"{what} nested too deeply (more than {max_depth} levels)", file=where)
        if isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, where, error, what)
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in node)


def _check_text(s: str, where: Any, error: type[LensLLMInputError], what: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = s[err.start]
        raise error(
            f"{what} holds a lone surrogate {bad!a} (invalid Unicode) in the text "
            f"{s[max(err.start - 10, 0) : err.start + 10]!a}",
            file=where,
        ) from None


def describe_os_error(err: OSError) -> str:
    """An `OSError` as one line: the file(s) and the system's words (``No space left on
    device``), without Python's ``[Errno 28]``."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    words = err.strerror or str(err) or type(err).__name__
    return f"{where}: {words}" if where else words


def check_output_target(path: str | PathLike[str], *, flag: str = "--out") -> None:
    """Refuse to replace anything but a regular file: a symbolic link, a FIFO, a device, a
    socket or a folder at `path` is one `LensLLMInputError` line (nothing is touched)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise LensLLMInputError(f"cannot inspect it ({err.strerror})", file=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise LensLLMInputError(
            f"is {file_kind(st.st_mode)}; lensllm replaces only regular files",
            file=path,
            hint=f"give {flag} a new {'folder' if flag == '--out-dir' else 'file'} name",
        )


def check_output_file(path: str | PathLike[str], *, flag: str = "--out") -> Path:
    """`path`, checked before any work as a file lensllm may write: not a folder, not
    anything but a regular file where one exists (`check_output_target`), in an existing,
    writable folder. Raises `LensLLMInputError` (one line) otherwise."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise LensLLMInputError("is a folder", file=path, hint=f"give {flag} a file name")
    check_output_target(path, flag=flag)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LensLLMInputError(
            f"folder {str(parent)!r} does not exist", file=path, hint="create it first"
        )
    if not os.access(parent, os.W_OK):
        raise LensLLMInputError(f"folder {str(parent)!r} is not writable", file=path)
    return path


def write_atomic(path: str | PathLike[str], data: bytes | str) -> Path:
    """Write `data` (text is UTF-8, newlines as given) to `path` so that a reader never sees
    a partial file: a temp file beside it, flushed and fsynced, then renamed over it. On any
    error (or interrupt) the temp file is removed and `path` is untouched. Returns the path.

    Raises `LensLLMInputError` when `path` exists and is not a regular file (a symbolic
    link, FIFO, device or folder is never replaced); an `OSError` (a full disk) propagates."""
    path = Path(path)
    check_output_target(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a failed write() names no file: say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
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
