"""A folder shared by every pytest-xdist worker of one session, for fixtures too costly to
build once per worker (a whole `lensllm run`, a child process that compiles for minutes)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder every pytest-xdist worker of this session shares, held under a lock while
    the body runs, so the expensive run below happens once per session, not per worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / name
    folder.mkdir(exist_ok=True)
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
