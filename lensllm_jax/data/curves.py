"""Fine-tuning curve tables: the loss of each candidate model after fine-tuning on
nested subsets of D samples.

`CurveTable` is the one in-memory form every selection method reads;
`read_curve_table` builds it from the fine-tuning scaling (FTS) CSV format of Lin et al.
(ICML 2024)::

    config name,0,200,400,...,1638400,size,family
    gpt2,4.85,4.38,4.28,...,1.79,124439808,GPT2

one row per model: the model's name, its test loss after fine-tuning on D samples for
each size column D (``0`` is the zero-shot loss), its parameter count and its family.
Reading is strict about values (every loss finite and > 0) and lenient about layout
(UTF-8 BOM, CRLF, extra columns, any column order, blank lines).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from lensllm_jax.data._files import read_input, write_atomic
from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "CurveTable",
    "NTKSpectra",
    "budget_label",
    "check_budget",
    "check_protocol",
    "curve_table_to_csv",
    "read_curve_table",
    "read_curve_tables",
    "write_curve_table",
]

MODEL_COLUMN = "config name"
PARAMS_COLUMN = "size"
FAMILY_COLUMN = "family"
MIN_POINTS = 3  # a 3-parameter law needs at least 3 points under the budget

# A header cell that is a plain non-negative-looking number names a size column.
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
SE_PREFIX = "se_"  # se_<size>: the standard error of that size's loss (optional)


@dataclass(frozen=True)
class NTKSpectra:
    """Each candidate's NTK on a probe set, as F(Θ, t) needs it: Θ = U diag(λ) Uᵀ, c = Uᵀ r.

    Attributes:
      eigenvalues: (M, N) λ_k >= 0; rows of candidates with fewer probes are padded with 0
        (with c_k = 0 a padded entry adds nothing to F).
      projected_residual: (M, N) c_k = u_kᵀ r, r = f0(X) − y.
      eta: (M,) the learning rate η of F(Θ, t) = Σ_k e^{−2ηλ_k t} c_k².
      available: (M,) bool, False for a candidate without a spectrum.
      extras: optional per-candidate numbers, name -> (M,) float64 (NaN = unknown), e.g. the
        SGD-equivalent rate ``sgd_eta`` and the fine-tuning schedule (``batch_size``,
        ``epochs``, ``min_steps``, ``max_steps``, ``time_slope``, ``time_offset``) that the
        steps-based NTK arms (`selection.ntk_arms`) need; {} when none.
    """

    eigenvalues: np.ndarray
    projected_residual: np.ndarray
    eta: np.ndarray
    available: np.ndarray
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class CurveTable:
    """Test losses of M candidate models fine-tuned on S subset sizes.

    Attributes:
      name: dataset name (for a CSV, its file stem).
      models: (M,) model names, in file order.
      sizes: (S,) strictly increasing positive subset sizes D (float64).
      losses: (M, S) test loss after fine-tuning on `sizes[j]` samples (float64, > 0).
      zero_shot: (M,) test loss before fine-tuning (D = 0).
      n_params: (M,) parameter counts.
      families: (M,) model family labels.
      source: where the table came from (a path, for error messages); "" if built in memory.
      loss_se: (M, S) standard errors of `losses` (from a finite test set; NaN = unknown),
        or None. In a CSV, optional columns ``se_<size>`` (e.g. ``se_200``).
      ntk: the candidates' NTK spectra (`NTKSpectra`, for LensLLM-NTK), or None. Not part
        of the CSV: `data.spectra` reads and writes them beside it.
    """

    name: str
    models: tuple[str, ...]
    sizes: np.ndarray
    losses: np.ndarray
    zero_shot: np.ndarray
    n_params: np.ndarray
    families: tuple[str, ...]
    source: str = ""
    loss_se: np.ndarray | None = None
    ntk: NTKSpectra | None = None

    @property
    def num_models(self) -> int:
        return len(self.models)

    def up_to(self, size: float) -> CurveTable:
        """The table cut to the subset sizes D <= `size` (what you would have fine-tuned by
        then): the same models, zero-shot losses and spectra. Raises `LensLLMInputError`
        when no size is left."""
        keep = self.sizes <= size
        if not keep.any():
            raise LensLLMInputError(f"no subset size <= {size:g}", file=self.source or self.name)
        se = None if self.loss_se is None else self.loss_se[:, keep]
        return dataclasses.replace(
            self, sizes=self.sizes[keep], losses=self.losses[:, keep], loss_se=se
        )

    def column(self, size: float) -> np.ndarray:
        """(M,) losses at subset size `size` (0 gives the zero-shot losses)."""
        if size == 0:
            return self.zero_shot
        hit = np.flatnonzero(self.sizes == size)
        if hit.size == 0:
            raise LensLLMInputError(
                f"no size column {_size_text(size)!r}",
                file=self.source or self.name,
                hint=f"columns hold {', '.join(_size_text(s) for s in self.sizes)}",
            )
        return self.losses[:, hit[0]]


def _size_text(size: float) -> str:
    return str(int(size)) if float(size).is_integer() else repr(float(size))


def budget_label(ratio: int) -> str:
    """The budget of ratio 8 is written "1/8" (the largest usable size is target/8)."""
    return f"1/{ratio}"


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _open_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header cells and (row number, cells) of the non-blank data rows of a CSV."""
    raw = read_input(
        path,
        kind="CSV file",
        missing_hint="check the path given to --data",
        folder_hint="pass the CSV files inside it",
    )
    if not raw.strip():
        raise LensLLMInputError(
            "empty file, not a curve table",
            file=path,
            hint=f"expected a CSV with columns {MODEL_COLUMN!r}, 0, 200, ..., "
            f"{PARAMS_COLUMN!r}, {FAMILY_COLUMN!r}",
        )
    try:
        text = raw.decode("utf-8-sig")  # drops a UTF-8 BOM if there is one
    except UnicodeDecodeError as err:
        raise LensLLMInputError(
            f"not a UTF-8 text file (byte {err.start}), not a curve table",
            file=path,
            hint="pass the benchmark's CSV files",
        ) from None
    if "\x00" in text:
        raise LensLLMInputError(
            "holds NUL bytes, not a curve table", file=path, hint="pass the benchmark's CSV files"
        )
    # newline="" semantics: the csv module itself handles CRLF, LF and quoted newlines.
    reader = csv.reader(text.splitlines(keepends=True))
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue  # blank line or a row of empty cells
            if header is None:
                header = cells
            else:
                rows.append((reader.line_num, cells))
    except csv.Error as err:
        raise LensLLMInputError(f"malformed CSV ({err})", file=path, row=reader.line_num) from None
    assert header is not None  # the file is not blank
    return header, rows


def read_curve_table(path: str | PathLike[str]) -> CurveTable:
    """Read one FTS curve table (CSV); the dataset's name is the file's stem.

    Required columns: ``config name``, ``0`` (zero-shot loss), at least one positive size
    column, ``size`` (parameters). ``family`` is optional; any other column is ignored.
    Size columns may come in any order; they are sorted by size.

    Raises:
      LensLLMInputError: one line naming file, row and column, for an empty file, a file
        that is not a curve table, a missing or duplicated column, a ragged row, a
        duplicated model, or a loss / parameter count that is not a finite number > 0.

    Cost: O(M·S) parsing, no numerical work.
    """
    path = Path(path)
    name = str(path)  # as the user gave it, so two flan.csv in different folders differ
    header, rows = _open_rows(path)

    lowered = [h.lower() for h in header]
    if MODEL_COLUMN not in lowered:
        raise LensLLMInputError(
            f"no {MODEL_COLUMN!r} column, not a curve table (header: {','.join(header)[:80]})",
            file=name,
            row=1,
            hint=f"expected columns {MODEL_COLUMN!r}, 0, 200, ..., {PARAMS_COLUMN!r}, "
            f"{FAMILY_COLUMN!r}",
        )

    named: dict[str, int] = {}
    size_cols: dict[float, int] = {}
    se_cols: dict[float, int] = {}
    for j, h in enumerate(header):
        if h.lower().startswith(SE_PREFIX) and _NUMBER.match(h[len(SE_PREFIX) :]):
            se_size = float(h[len(SE_PREFIX) :])
            if se_size in se_cols:
                raise LensLLMInputError(
                    "duplicated standard-error column", file=name, row=1, column=h
                )
            se_cols[se_size] = j
        elif _NUMBER.match(h):
            size = float(h)
            if not np.isfinite(size) or size < 0:
                raise LensLLMInputError(
                    "a subset size must be a number >= 0", file=name, row=1, column=h
                )
            if size in size_cols:
                first = header[size_cols[size]]
                raise LensLLMInputError(
                    f"duplicated size column (same size as column {first!r})",
                    file=name,
                    row=1,
                    column=h,
                    hint="keep one column per subset size",
                )
            size_cols[size] = j
        else:
            key = h.lower()
            if key in (MODEL_COLUMN, PARAMS_COLUMN, FAMILY_COLUMN) and key in named:
                raise LensLLMInputError(
                    "duplicated column", file=name, row=1, column=h, hint="keep one of them"
                )
            named.setdefault(key, j)

    if 0.0 not in size_cols:
        raise LensLLMInputError(
            "missing size column '0' (the zero-shot loss)",
            file=name,
            row=1,
            hint="add the loss of each model before fine-tuning as column '0'",
        )
    sizes = sorted(s for s in size_cols if s > 0)
    if not sizes:
        raise LensLLMInputError(
            "no positive size columns (200, 400, ...), not a curve table",
            file=name,
            row=1,
            hint="add one column per fine-tuning subset size",
        )
    if PARAMS_COLUMN not in named:
        raise LensLLMInputError(
            f"missing column {PARAMS_COLUMN!r} (parameter count of each model)",
            file=name,
            row=1,
            hint="add it; ModelSize and the cost metric need it",
        )
    if not rows:
        raise LensLLMInputError(
            "header only, no model rows", file=name, row=2, hint="add one row per model"
        )

    for se_size, j in se_cols.items():
        if se_size not in sizes:
            raise LensLLMInputError(
                "standard-error column without its size column",
                file=name,
                row=1,
                column=header[j],
                hint="name it se_<size> for one of the size columns, or remove it",
            )
    loss_se = np.full((len(rows), len(sizes)), np.nan) if se_cols else None
    loss_cols = [size_cols[0.0]] + [size_cols[s] for s in sizes]
    models: list[str] = []
    families: list[str] = []
    seen: dict[str, int] = {}
    losses = np.empty((len(rows), len(loss_cols)), dtype=np.float64)
    n_params = np.empty(len(rows), dtype=np.float64)
    for i, (r, cells) in enumerate(rows):
        if len(cells) != len(header):
            raise LensLLMInputError(
                f"{len(cells)} cells where the header has {len(header)}",
                file=name,
                row=r,
                hint="every row needs one cell per column",
            )
        model = cells[named[MODEL_COLUMN]]
        if not model:
            raise LensLLMInputError(
                "empty model name", file=name, row=r, column=header[named[MODEL_COLUMN]]
            )
        if model in seen:
            raise LensLLMInputError(
                f"model {model!r} already on row {seen[model]}",
                file=name,
                row=r,
                column=header[named[MODEL_COLUMN]],
                hint="keep one row per model",
            )
        seen[model] = r
        models.append(model)
        families.append(cells[named[FAMILY_COLUMN]] if FAMILY_COLUMN in named else "")
        for k, j in enumerate(loss_cols):
            losses[i, k] = _positive(cells[j], name, r, header[j], "loss", model)
        for se_size, j in se_cols.items():
            assert loss_se is not None  # allocated whenever there are se_ columns
            loss_se[i, sizes.index(se_size)] = _standard_error(cells[j], name, r, header[j], model)
        n_params[i] = _positive(
            cells[named[PARAMS_COLUMN]],
            name,
            r,
            header[named[PARAMS_COLUMN]],
            "parameter count",
            model,
        )

    return CurveTable(
        name=path.stem,
        models=tuple(models),
        sizes=np.asarray(sizes, dtype=np.float64),
        losses=losses[:, 1:].copy(),
        zero_shot=losses[:, 0].copy(),
        n_params=n_params,
        families=tuple(families),
        source=str(path),
        loss_se=loss_se,
    )


def _standard_error(text: str, file: str, row: int, column: str, model: str) -> float:
    """A standard error: a finite number >= 0, or empty / "nan" for unknown."""
    if text == "" or text.lower() == "nan":
        return float("nan")
    value = _parse_number(text)
    if value is None or not np.isfinite(value) or value < 0:
        raise LensLLMInputError(
            f"standard error {text!r} of model {model!r} is not a number >= 0",
            file=file,
            row=row,
            column=column,
            hint="write the loss's standard error, or leave the cell empty",
        )
    return value


def _positive(text: str, file: str, row: int, column: str, what: str, model: str) -> float:
    value = _parse_number(text)
    if value is None:
        problem = "is empty" if text == "" else "is not a number"
    elif np.isnan(value):
        problem = "is NaN"
    elif np.isinf(value):
        problem = "is infinite"
    elif value <= 0:
        problem = "is not > 0"
    else:
        return value
    shown = f" {text[:20]!r}" if text else ""
    raise LensLLMInputError(
        f"{what}{shown} of model {model!r} {problem}",
        file=file,
        row=row,
        column=column,
        hint=f"every {what} must be a finite number > 0",
    )


def read_curve_tables(paths: Sequence[str | PathLike[str]]) -> list[CurveTable]:
    """Read several tables; two files with the same stem (dataset name) are an error."""
    tables: list[CurveTable] = []
    by_name: dict[str, str] = {}
    for p in paths:
        t = read_curve_table(p)
        if t.name in by_name:
            raise LensLLMInputError(
                f"dataset name {t.name!r} (the file stem) already used by {by_name[t.name]}",
                file=p,
                hint="rename one of the files",
            )
        by_name[t.name] = str(p)
        tables.append(t)
    return tables


def check_budget(
    table: CurveTable, budget_size: float, *, min_points: int = MIN_POINTS, label: str = ""
) -> None:
    """Raise unless every model has >= `min_points` fine-tuned sizes D with 0 < D <= budget.

    Call this before any fitting: a law with 3 parameters cannot be fitted to fewer points.
    `label` names the budget in the message (e.g. "1/512"). Cost: O(S).
    """
    usable = table.sizes[table.sizes <= budget_size]
    if usable.size >= min_points:
        return
    shown = ", ".join(_size_text(s) for s in usable) or "none"
    budget = (
        f"budget {label} (D <= {_size_text(budget_size)})"
        if label
        else (f"budget D <= {_size_text(budget_size)}")
    )
    raise LensLLMInputError(
        f"{budget} leaves {usable.size} usable sizes ({shown}), need at least {min_points}",
        file=table.source or table.name,
        column=_size_text(table.sizes[0]),
        hint="add smaller subset-size columns or use larger budgets (smaller ratios)",
    )


def check_protocol(
    table: CurveTable, target: float, ratios: Sequence[int], *, min_points: int = MIN_POINTS
) -> None:
    """Check a table fits Lin et al.'s protocol before any work is done.

    The target size must be a column (its losses are the truth the ranking is judged on);
    when the sizes double (200, 400, ...) no size between the smallest and the target may be
    missing; each budget target/ratio must leave `min_points` sizes (see `check_budget`).
    Cost: O(S · len(ratios)).
    """
    file = table.source or table.name
    if not np.any(table.sizes == target):
        raise LensLLMInputError(
            f"missing size column {_size_text(target)!r} (the target size, whose losses are "
            "the truth the selection is judged on)",
            file=file,
            row=1,
            hint="add it, or pass tables that hold the full-size fine-tuning loss",
        )
    # Doubling grid s0·2^k: a hole is a deleted column, not a design choice of the benchmark.
    below = table.sizes[table.sizes <= target]
    k = np.log2(below / below[0])
    if below.size >= 2 and np.allclose(k, np.round(k)):
        present = set(np.round(k).astype(int).tolist())
        for step in range(int(np.round(k[-1])) + 1):
            if step not in present:
                missing = below[0] * 2.0**step
                raise LensLLMInputError(
                    f"missing size column {_size_text(missing)!r} (sizes double from "
                    f"{_size_text(below[0])} to {_size_text(target)})",
                    file=file,
                    row=1,
                    hint="restore the column",
                )
    for ratio in ratios:
        check_budget(table, target / ratio, min_points=min_points, label=budget_label(ratio))


def curve_table_to_csv(table: CurveTable) -> str:
    """The FTS CSV text of `table` (``config name,0,<sizes>,size,family``, then
    ``se_<sizes>`` when the table has standard errors; LF line ends).

    Numbers are written with ``repr(float)`` (integers without a fraction), the shortest
    text that parses back to the same float64, so `read_curve_table` returns exactly the
    same models, sizes, losses, zero-shot losses, parameter counts and families.

    Raises:
      ValueError: a loss or parameter count that is not a finite number > 0 (the reader
        would refuse it), or a model name that is empty or has surrounding whitespace
        (the reader strips cells).

    Cost: O(M·S).
    """
    losses = np.asarray(table.losses, np.float64)
    values = np.column_stack([table.zero_shot, losses, table.n_params]).astype(np.float64)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        what = "parameter count" if j == values.shape[1] - 1 else "loss"
        raise ValueError(
            f"{what} {float(values[i, j])!r} of model {table.models[i]!r} is not a finite "
            "number > 0; a curve table cannot hold it"
        )
    for name in table.models:
        if not name or name != name.strip():
            raise ValueError(f"model name {name!r} is empty or has surrounding whitespace")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    sizes = [_number_text(s) for s in table.sizes]
    se = None if table.loss_se is None else np.asarray(table.loss_se, np.float64)
    if se is not None and (se.shape != losses.shape or np.any(se < 0)):
        raise ValueError(f"loss_se must be {losses.shape} standard errors >= 0 (NaN = unknown)")
    se_head = [] if se is None else [SE_PREFIX + t for t in sizes]
    writer.writerow([MODEL_COLUMN, "0", *sizes, PARAMS_COLUMN, FAMILY_COLUMN, *se_head])
    for i, name in enumerate(table.models):
        cells = [_number_text(v) for v in values[i]]
        se_cells = [] if se is None else ["" if np.isnan(v) else _number_text(v) for v in se[i]]
        writer.writerow([name, *cells, table.families[i], *se_cells])
    return buf.getvalue()


def write_curve_table(table: CurveTable, path: str | PathLike[str]) -> Path:
    """Write `table` as an FTS CSV at `path`, atomically (a temp file beside it, then a
    rename): the file is whole or absent, never half-written. Returns the path.
    See `curve_table_to_csv` for the format and its errors. Cost: O(M·S)."""
    return write_atomic(path, curve_table_to_csv(table))


def _number_text(value: float) -> str:
    """Shortest exact text of a float64: '200' for integers below 2**53, else repr."""
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
