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
    "SPECTRA_COLUMNS",
    "read_spectra",
    "spectra_to_csv",
    "stack_spectra",
    "with_spectra",
    "write_spectra",
]

SPECTRA_COLUMNS = (MODEL_COLUMN, "eta", "k", "eigenvalue", "projected_residual")

# name -> (eigenvalues (N,), projected residual (N,), eta)
Spectrum = tuple[np.ndarray, np.ndarray, float]


def stack_spectra(models: Sequence[str], spectra: Mapping[str, Spectrum]) -> NTKSpectra:
    """`NTKSpectra` for `models` in order; a model missing from `spectra` is unavailable.
    Rows are zero-padded to the longest spectrum (a padded pair adds nothing to F)."""
    n = max((len(spectra[m][0]) for m in models if m in spectra), default=0)
    eig = np.zeros((len(models), n))
    proj = np.zeros((len(models), n))
    eta = np.full(len(models), np.nan)
    have = np.zeros(len(models), bool)
    for i, m in enumerate(models):
        if m in spectra:
            lam, c, e = spectra[m]
            eig[i, : len(lam)], proj[i, : len(c)], eta[i], have[i] = lam, c, e, True
    return NTKSpectra(eig, proj, eta, have)


def with_spectra(table: CurveTable, spectra: Mapping[str, Spectrum]) -> CurveTable:
    """`table` with `CurveTable.ntk` set from name -> (eigenvalues, projections, eta)."""
    return dataclasses.replace(table, ntk=stack_spectra(table.models, spectra))


def spectra_to_csv(spectra: Mapping[str, Spectrum]) -> str:
    """The long-format CSV text of name -> (eigenvalues, projections, eta). Cost O(Σ N)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SPECTRA_COLUMNS)
    for name, (lam, c, eta) in spectra.items():
        for k, (lam_k, c_k) in enumerate(zip(lam, c, strict=True)):
            writer.writerow([name, repr(float(eta)), k, repr(float(lam_k)), repr(float(c_k))])
    return buf.getvalue()


def write_spectra(path: str | PathLike[str], spectra: Mapping[str, Spectrum]) -> Path:
    """Write `spectra_to_csv` atomically (whole or absent). Returns the path."""
    return write_atomic(path, spectra_to_csv(spectra))


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


def read_spectra(path: str | PathLike[str]) -> dict[str, Spectrum]:
    """Read an NTK spectra CSV: name -> (eigenvalues (N,), projections (N,), eta).

    Raises `LensLLMInputError` (one line naming file, row and column) for a missing
    column, a non-number, a negative eigenvalue or η <= 0, a repeated or missing index k,
    or η differing between one candidate's rows. Cost O(rows).
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
    found: dict[str, dict[int, tuple[float, float]]] = {}
    etas: dict[str, float] = {}
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
        pairs = found.setdefault(model, {})
        if int(k) in pairs:
            raise LensLLMInputError(
                f"index k = {int(k)} of {model!r} given twice", file=name, row=r, column="k"
            )
        pairs[int(k)] = (lam, c)
    out: dict[str, Spectrum] = {}
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
