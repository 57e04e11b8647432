"""Each candidate's NTK spectrum as a file beside its curve table (what LensLLM-NTK reads).

``lensllm run`` writes ``ntk_features.csv``; ``lensllm select CURVES.csv --ntk FILE`` reads
it. Long format, one row per eigenpair::

    config name,eta,k,eigenvalue,projected_residual
    gpt2,0.0001,0,3.1e-05,0.0021
    gpt2,0.0001,1,0.00042,-0.013
    ...

(λ_k ascending, c_k = u_kᵀ r with r = f0(X) − y; η the learning rate of F(Θ, t) =
Σ_k e^{−2ηλ_k t} c_k².) Numbers are written with ``repr``, so reading gives back exactly
the float64 values the run ranked with.

Optional columns after those (`EXTRA_COLUMNS`, any subset, one value per candidate repeated
on each of its rows) carry what the steps-based NTK arms need (`selection.ntk_arms`):
``sgd_eta`` (the SGD-equivalent learning rate of the recipe's AdamW) and the fine-tuning
schedule (``batch_size``, ``epochs``, ``min_steps``, ``max_steps``, ``time_slope``,
``time_offset``: τ(D) = slope·N(D) + offset, N(D) the optimiser steps at D). A file
without them reads as before; `read_spectra`'s result carries them as ``.extras``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from lensllm_jax.data._files import write_atomic
from lensllm_jax.data.curves import MODEL_COLUMN, CurveTable, NTKSpectra, _open_rows
from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "EXTRA_COLUMNS",
    "SPECTRA_COLUMNS",
    "SpectraFile",
    "read_spectra",
    "spectra_to_csv",
    "stack_spectra",
    "with_spectra",
    "write_spectra",
]

SPECTRA_COLUMNS = (MODEL_COLUMN, "eta", "k", "eigenvalue", "projected_residual")
EXTRA_COLUMNS = (
    "sgd_eta",
    "batch_size",
    "epochs",
    "min_steps",
    "max_steps",
    "time_slope",
    "time_offset",
)

# name -> (eigenvalues (N,), projected residual (N,), eta)
Spectrum = tuple[np.ndarray, np.ndarray, float]
# name -> {extra column -> value}
Extras = Mapping[str, Mapping[str, float]]


class SpectraFile(dict[str, Spectrum]):
    """name -> (eigenvalues, projections, eta), as `read_spectra` returns it, with the
    optional per-candidate columns in ``.extras`` (name -> {column -> value}; {} if none)."""

    extras: dict[str, dict[str, float]]

    def __init__(self, spectra: Mapping[str, Spectrum], extras: Extras | None = None):
        super().__init__(spectra)
        self.extras = {k: dict(v) for k, v in (extras or {}).items()}


def _extras_of(spectra: Mapping[str, Spectrum], extras: Extras | None) -> Extras:
    """`extras`, else the `SpectraFile`'s own, else none."""
    if extras is not None:
        return extras
    return getattr(spectra, "extras", None) or {}


def stack_spectra(
    models: Sequence[str], spectra: Mapping[str, Spectrum], extras: Extras | None = None
) -> NTKSpectra:
    """`NTKSpectra` for `models` in order; a model missing from `spectra` is unavailable.
    Rows are zero-padded to the longest spectrum (a padded pair adds nothing to F).
    `extras` (default: ``spectra.extras`` when `spectra` is a `SpectraFile`) fills
    `NTKSpectra.extras`, NaN for a candidate without the value."""
    extras = _extras_of(spectra, extras)
    n = max((len(spectra[m][0]) for m in models if m in spectra), default=0)
    eig = np.zeros((len(models), n))
    proj = np.zeros((len(models), n))
    eta = np.full(len(models), np.nan)
    have = np.zeros(len(models), bool)
    for i, m in enumerate(models):
        if m in spectra:
            lam, c, e = spectra[m]
            eig[i, : len(lam)], proj[i, : len(c)], eta[i], have[i] = lam, c, e, True
    columns = [c for c in EXTRA_COLUMNS if any(c in extras.get(m, {}) for m in models)]
    extra = {
        c: np.array([float(extras.get(m, {}).get(c, np.nan)) for m in models]) for c in columns
    }
    return NTKSpectra(eig, proj, eta, have, extra)


def with_spectra(
    table: CurveTable, spectra: Mapping[str, Spectrum], extras: Extras | None = None
) -> CurveTable:
    """`table` with `CurveTable.ntk` set from name -> (eigenvalues, projections, eta) and
    the optional per-candidate extras (see `stack_spectra`)."""
    return dataclasses.replace(table, ntk=stack_spectra(table.models, spectra, extras))


def _check_extras(extras: Extras) -> list[str]:
    unknown = sorted({c for v in extras.values() for c in v} - set(EXTRA_COLUMNS))
    if unknown:
        raise LensLLMInputError(
            f"unknown NTK spectra column {unknown[0]!r}",
            hint=f"extra columns are {', '.join(EXTRA_COLUMNS)}",
        )
    return [c for c in EXTRA_COLUMNS if any(c in v for v in extras.values())]


def spectra_to_csv(spectra: Mapping[str, Spectrum], extras: Extras | None = None) -> str:
    """The long-format CSV text of name -> (eigenvalues, projections, eta), plus the
    `EXTRA_COLUMNS` any candidate has in `extras` (default ``spectra.extras``; empty for a
    candidate without the value). Cost O(Σ N)."""
    extras = _extras_of(spectra, extras)
    columns = _check_extras(extras)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*SPECTRA_COLUMNS, *columns])
    for name, (lam, c, eta) in spectra.items():
        mine = extras.get(name, {})
        tail = [repr(float(mine[col])) if col in mine else "" for col in columns]
        for k, (lam_k, c_k) in enumerate(zip(lam, c, strict=True)):
            row = [name, repr(float(eta)), k, repr(float(lam_k)), repr(float(c_k))]
            writer.writerow(row + tail)
    return buf.getvalue()


def write_spectra(
    path: str | PathLike[str], spectra: Mapping[str, Spectrum], extras: Extras | None = None
) -> Path:
    """Write `spectra_to_csv` atomically (whole or absent). Returns the path."""
    return write_atomic(path, spectra_to_csv(spectra, extras))


def _number(text: str, name: str, row: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LensLLMInputError(
            f"{text!r} is not a finite number", file=name, row=row, column=column
        )
    return value


def read_spectra(path: str | PathLike[str]) -> SpectraFile:
    """Read an NTK spectra CSV: name -> (eigenvalues (N,), projections (N,), eta), with the
    optional `EXTRA_COLUMNS` in ``.extras`` (a `SpectraFile`, a dict).

    Raises `LensLLMInputError` (one line naming file, row and column) for a missing
    column, a non-number, a negative eigenvalue or η <= 0, a repeated or missing index k,
    or η (or an extra column) differing between one candidate's rows. Cost O(rows).
    """
    name = str(path)
    header, rows = _open_rows(Path(path))
    lowered = [h.lower() for h in header]
    missing = [c for c in SPECTRA_COLUMNS if c not in lowered]
    if missing:
        raise LensLLMInputError(
            f"missing column {missing[0]!r}, not an NTK spectra file",
            file=name,
            row=1,
            hint=f"expected columns {', '.join(SPECTRA_COLUMNS)} (lensllm run writes "
            "ntk_features.csv)",
        )
    col = {c: lowered.index(c) for c in SPECTRA_COLUMNS}
    extra_col = {c: lowered.index(c) for c in EXTRA_COLUMNS if c in lowered}
    found: dict[str, dict[int, tuple[float, float]]] = {}
    etas: dict[str, float] = {}
    extras: dict[str, dict[str, float]] = {}
    for r, cells in rows:
        if len(cells) != len(header):
            raise LensLLMInputError(
                f"{len(cells)} cells where the header has {len(header)}", file=name, row=r
            )
        model = cells[col[MODEL_COLUMN]]
        eta = _number(cells[col["eta"]], name, r, "eta")
        k = _number(cells[col["k"]], name, r, "k")
        lam = _number(cells[col["eigenvalue"]], name, r, "eigenvalue")
        c = _number(cells[col["projected_residual"]], name, r, "projected_residual")
        if eta <= 0:
            raise LensLLMInputError("eta must be > 0", file=name, row=r, column="eta")
        if lam < 0:
            raise LensLLMInputError(
                "an NTK eigenvalue must be >= 0", file=name, row=r, column="eigenvalue"
            )
        if not (k.is_integer() and k >= 0):
            raise LensLLMInputError("k must be a whole number >= 0", file=name, row=r, column="k")
        if etas.setdefault(model, eta) != eta:
            raise LensLLMInputError(
                f"eta of {model!r} differs from its earlier rows", file=name, row=r, column="eta"
            )
        mine = extras.setdefault(model, {})
        for c_name, j in extra_col.items():
            if cells[j].strip() == "":
                continue  # unknown for this candidate
            value = _number(cells[j], name, r, c_name)
            if mine.setdefault(c_name, value) != value:
                raise LensLLMInputError(
                    f"{c_name} of {model!r} differs from its earlier rows",
                    file=name,
                    row=r,
                    column=c_name,
                )
        pairs = found.setdefault(model, {})
        if int(k) in pairs:
            raise LensLLMInputError(
                f"index k = {int(k)} of {model!r} given twice", file=name, row=r, column="k"
            )
        pairs[int(k)] = (lam, c)
    out = SpectraFile({}, {m: v for m, v in extras.items() if v})
    for model, pairs in found.items():
        if sorted(pairs) != list(range(len(pairs))):
            raise LensLLMInputError(
                f"{model!r} has indices {sorted(pairs)[:5]}..., not 0..{len(pairs) - 1}",
                file=name,
                column="k",
            )
        lam = np.array([pairs[k][0] for k in range(len(pairs))])
        c = np.array([pairs[k][1] for k in range(len(pairs))])
        out[model] = (lam, c, etas[model])
    if not out:
        raise LensLLMInputError("header only, no spectra", file=name, row=2)
    return out
