"""The project's exception and warning types: one hierarchy, one module.

    LensLLMError                      anything this package raises on purpose
    ├── LensLLMInputError (ValueError) bad input: a file, an option, missing data
    │   ├── DataUnavailableError       the benchmark could not be found or verified
    │   │   └── DownloadError          ... because the download failed
    │   └── ModelLoadError             a checkpoint cannot become a params pytree
    │       └── ModelConfigError       ... because its config describes no model we run
    ├── NTKError (ValueError)          an unusable kernel, or bad arguments to an NTK function
    └── HessianError (ValueError)      likewise for the Hessian estimators

Every message is one line saying what is wrong, where (file, row, column; the candidate's
name) and what to do. The CLI turns any `LensLLMError` into ``lensllm: error: <message>``
and exit code 2. A curve the law cannot fit is not an error: it is a status plus a
`CurveFitWarning`.
"""

from __future__ import annotations

from os import PathLike

__all__ = [
    "CurveFitWarning",
    "DataUnavailableError",
    "DownloadError",
    "HessianError",
    "InputError",
    "LensLLMError",
    "LensLLMInputError",
    "ModelConfigError",
    "ModelLoadError",
    "NTKError",
]


class LensLLMError(Exception):
    """Base of every error this package raises on purpose; its message is one line."""


class LensLLMInputError(LensLLMError, ValueError):
    """Bad input, reported as one line: ``file: row R, column 'C': what; what to do``.

    Attributes:
      file: the file's name (or path) when the error is about a file, else None.
      row: 1-based row as a spreadsheet shows it (the header is row 1), or None.
      column: the column's header text, or None.
      what: the bare description, without location.
      hint: what to do about it, or None.
    """

    def __init__(
        self,
        what: str,
        *,
        file: str | PathLike[str] | None = None,
        row: int | None = None,
        column: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.column = column
        self.what = what
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        head = ", ".join(where)
        if self.file is not None:
            head = f"{self.file}: {head}" if head else self.file
        msg = f"{head}: {self.what}" if head else self.what
        if self.hint:
            msg = f"{msg}; {self.hint}"
        # One line, whatever the pieces held (a model name with a newline, say).
        return " ".join(msg.split())


InputError = LensLLMInputError  # the short name of the layout sketch


class DataUnavailableError(LensLLMInputError):
    """The benchmark could not be found, downloaded, or failed its checksum."""


class DownloadError(DataUnavailableError):
    """The benchmark could not be fetched (offline, unreachable host)."""


class ModelLoadError(LensLLMInputError):
    """A checkpoint could not be turned into a complete, well-shaped params pytree."""


class ModelConfigError(ModelLoadError):
    """config.json / GGUF metadata describes a model this zoo cannot run."""


class NTKError(LensLLMError, ValueError):
    """An NTK function got bad input or produced an unusable kernel (NaN/inf, not PSD)."""


class HessianError(LensLLMError, ValueError):
    """A Hessian function got bad input or the loss's curvature is not finite."""


class CurveFitWarning(UserWarning):
    """Some curves could not be fitted; they carry status "failed" and rank last."""
