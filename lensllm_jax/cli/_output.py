"""Where a command's finished output goes: standard output, or the file of ``--out``,
checked before any work (`check_out`) and written whole (`emit`)."""

from __future__ import annotations

import sys
from pathlib import Path

from lensllm_jax.data._files import check_output_file, write_atomic

__all__ = ["check_out", "emit"]


def check_out(out: str | None) -> Path | None:
    """Fail before any work if --out cannot be written, or is not a regular file (a
    symbolic link, FIFO, device or folder is never replaced)."""
    return None if out is None else check_output_file(out)


def emit(text: str, out: Path | None) -> int:
    """Write the finished output to stdout, or atomically to --out; exit status 0."""
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
    return 0
