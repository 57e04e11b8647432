"""The project's exception and warning types.

Every error a user can cause (a bad file, a bad option, missing data) is a
`LensLLMInputError`: a `ValueError` whose message is one line saying what is wrong,
where (file, row, column) and what to do. The CLI turns it into exit code 2.
A curve the law cannot fit is not an error: it is a status plus a `CurveFitWarning`.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["CurveFitWarning", "DataUnavailableError", "LensLLMInputError"]


class LensLLMInputError(ValueError):
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


class DataUnavailableError(LensLLMInputError):
    """The benchmark could not be found, downloaded, or failed its checksum."""


class DownloadError(DataUnavailableError):
    """The benchmark could not be fetched (offline, unreachable host)."""


class CurveFitWarning(UserWarning):
    """Some curves could not be fitted; they carry status "failed" and rank last."""
