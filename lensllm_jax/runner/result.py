"""What `lensllm run` measures and returns, as types whose fields drive saving and loading.

`CandidateResult` is one candidate's measurements. Its annotations say how each field is
stored in the candidate's ``.npz`` (str, int, float, a tuple of str, or an array), so a new
measurement is one new field with a default: `store` saves and loads it, and a result
written before it existed reads back with the default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax.data.curves import CurveTable

__all__ = ["Candidate", "CandidateResult", "NTKStep", "RunResult"]


def _empty() -> np.ndarray:
    return np.zeros((0,), np.float64)


def _nan3() -> np.ndarray:
    return np.full(3, np.nan)


class Candidate(NamedTuple):
    """A checked candidate model, ready to load.

    name: unique display name (folder or file name; parent folders added when two clash).
    path: as the user gave it. location: the resolved file or folder that is loaded.
    model_type: from its config. vocab_size: rows of its embedding.
    tokenizer: its own tokenizer (transformers), loaded during the check.
    digest: SHA-256 of the files it is read from (names, sizes and contents: config,
      weights, tokenizer), so a resume recomputes a candidate whose files changed.
    """

    name: str
    path: str
    location: str
    model_type: str
    vocab_size: int
    tokenizer: Any
    digest: str = ""


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """Everything measured for one candidate (float64 numpy; saved as one .npz).

    sizes/losses/num_steps/status: the fine-tuning curve (test loss in nats per byte after
    fine-tuning on each nested subset; NaN and status "diverged" where it diverged).
    zero_shot: the test loss before fine-tuning. n_params: parameter count.
    loss_se (S,): standard error of each test loss over the test examples (curves.csv's
    se_<size> columns; it widens LensLLM's P(best) when the test set is small).
    theta (N, N), residual (N,), eigenvalues (N,), projected_residual (N,): the NTK step
    (empty arrays with --no-ntk). kernel_diagnostics: asymmetry, min eigenvalue, clipped
    mass (NaN without NTK). eta: the learning rate.
    hessian_trace/hessian_stderr: the Hutchinson trace of the probe loss's Hessian at the
    pretrained params, NaN when not measured. ft_hessian_trace/ft_hessian_stderr/
    ft_hessian_distance (S,): at the params fine-tuned on each size, the trace and the
    Hessian-weighted distance vᵀHv, v = θ_D − θ_0 (the quantities of the Hessian PAC-Bayes
    account of the two phases); NaN when not measured. seconds: wall time.
    digest: `Candidate.digest` of the files measured ("" in results saved before digests).
    """

    name: str
    path: str
    family: str
    n_params: int
    sizes: np.ndarray
    losses: np.ndarray
    zero_shot: float
    num_steps: np.ndarray
    status: tuple[str, ...]
    loss_se: np.ndarray
    eta: float
    seconds: float
    theta: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    residual: np.ndarray = dataclasses.field(default_factory=_empty)
    eigenvalues: np.ndarray = dataclasses.field(default_factory=_empty)
    projected_residual: np.ndarray = dataclasses.field(default_factory=_empty)
    kernel_diagnostics: np.ndarray = dataclasses.field(default_factory=_nan3)
    hessian_trace: float = math.nan
    hessian_stderr: float = math.nan
    ft_hessian_trace: np.ndarray = dataclasses.field(default_factory=_empty)
    ft_hessian_stderr: np.ndarray = dataclasses.field(default_factory=_empty)
    ft_hessian_distance: np.ndarray = dataclasses.field(default_factory=_empty)
    digest: str = ""

    @property
    def complete(self) -> bool:
        """Every curve point is a finite loss > 0 (none diverged)."""
        return all(s == "ok" for s in self.status) and bool(
            np.all(np.isfinite(self.losses) & (self.losses > 0)) and self.zero_shot > 0
        )

    @property
    def has_ntk(self) -> bool:
        return self.eigenvalues.size > 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy value for `np.savez` (by its annotation)."""
        out = {}
        for name, kind in _field_kinds().items():
            value = getattr(self, name)
            if kind is tuple:
                out[name] = np.asarray(value, dtype=str)
            elif kind in _SCALARS:
                out[name] = np.asarray(_SCALARS[kind](value))
            else:
                out[name] = np.asarray(value)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> CandidateResult:
        """Inverse of `to_arrays`; a field missing from `arrays` takes its default (a result
        saved before the field existed). Raises KeyError when a field without a default is
        missing."""
        fields = {}
        for name, kind in _field_kinds().items():
            if name not in arrays:
                continue
            value = arrays[name]
            if kind is tuple:
                fields[name] = tuple(str(v) for v in np.asarray(value))
            elif kind in _SCALARS:
                fields[name] = kind(np.asarray(value).item())
            else:
                fields[name] = np.asarray(value)
        return cls(**fields)


_SCALARS: dict[type, Any] = {str: np.str_, int: np.int64, float: np.float64}


@functools.cache
def _field_kinds() -> dict[str, type]:
    """Field name -> str | int | float | tuple | np.ndarray, from the annotations."""
    hints = typing.get_type_hints(CandidateResult)
    kinds = {}
    for f in dataclasses.fields(CandidateResult):
        hint = hints[f.name]
        kinds[f.name] = typing.get_origin(hint) or hint
    return kinds


class NTKStep(NamedTuple):
    """The NTK step of one candidate: Θ (N, N), r (N,), its features and diagnostics."""

    theta: np.ndarray
    residual: np.ndarray
    features: Any  # core.ntk.NTKFeatures
    diagnostics: Any  # core.ntk.KernelDiagnostics


class RunResult(NamedTuple):
    """What `run` returns.

    table: the curve table of the candidates whose curves are complete (as in curves.csv),
      with their NTK spectra (`CurveTable.ntk`) when measured.
    features: name -> core.ntk.NTKFeatures (float64), for candidates with NTK features.
    rows: the ranking (`selection.RankRow`s), every method, rank 1 first.
    diagnostics: name -> `CandidateResult` (curve, kernel diagnostics, Hessian trace).
    target: the data size the ranking is for. out_dir: the output folder.
    resumed: names of the candidates read back from an earlier run, not recomputed.
    files: the ranking, report and plot files this call wrote (named by the target when
      the folder already held another target's ranking: `report.output_names`).
    """

    table: CurveTable
    features: dict[str, Any]
    rows: list
    diagnostics: dict[str, CandidateResult]
    target: float
    out_dir: Path
    resumed: tuple[str, ...]
    files: tuple[Path, ...] = ()
