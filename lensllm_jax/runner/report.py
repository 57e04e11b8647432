"""What `lensllm run` reports: ``report.json`` (settings, per-candidate curve and
diagnostics, the ranking), the Hessian's two-phase table, and where a target's ranking goes
in the run folder (`output_names`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax.runner.result import CandidateResult
from lensllm_jax.runner.store import LOSS_UNIT, json_default

__all__ = [
    "ATS_FITTED",
    "OutputNames",
    "ats_phase",
    "hessian_by_size",
    "output_names",
    "report_json",
]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


ATS_FITTED = 3  # AtS takes its 3 largest sizes as the power phase (k), untested


def ats_phase(r: CandidateResult) -> tuple[int | None, bool]:
    """Where AtS's rule (`baselines.ats_first_point`) puts the first power-phase size of
    `r`'s curve: (its index, or None with fewer than 3 usable sizes; whether any size was
    tested). AtS fits a line to the 3 largest sizes and tests smaller ones against it, so
    with 3 sizes it tests none and "power" is an assumption, not a finding."""
    from lensllm_jax.selection.baselines import ats_first_point

    ok = np.isfinite(r.losses) & (r.losses > 0)
    if ok.sum() < ATS_FITTED:
        return None, False
    where = np.flatnonzero(ok)
    first = ats_first_point(np.log(r.sizes[ok]), np.log(r.losses[ok]), ATS_FITTED)
    return int(where[first]), bool(ok.sum() > ATS_FITTED)


def hessian_by_size(r: CandidateResult) -> list[dict[str, Any]] | None:
    """Per fine-tuned size: the Hessian trace ± s.e. and vᵀHv (None when not measured), and
    AtS's phase (`ats_phase`): power_phase (None when AtS cannot place the boundary) and
    phase_tested (False for AtS's 3 largest sizes, power by assumption). The two phases
    of the Hessian PAC-Bayes account, side by side. A negative vᵀHv means the Hessian at
    θ_D is indefinite and curves down along v = θ_D − θ_0."""
    if not np.isfinite(r.ft_hessian_trace).any():
        return None
    first, _ = ats_phase(r)
    ok = np.isfinite(r.losses) & (r.losses > 0)
    assumed = set(np.flatnonzero(ok)[-ATS_FITTED:].tolist())
    return [
        {
            "size": int(d),
            "trace": _finite_or_none(t),
            "stderr": _finite_or_none(e),
            "distance": _finite_or_none(v),
            "power_phase": None if first is None else j >= first,
            "phase_tested": first is not None and j not in assumed,
        }
        for j, (d, t, e, v) in enumerate(
            zip(
                r.sizes, r.ft_hessian_trace, r.ft_hessian_stderr, r.ft_hessian_distance, strict=True
            )
        )
    ]


def report_json(
    settings: Mapping[str, Any],
    data_path: Path,
    target: float,
    results: Sequence[CandidateResult],
    rows: Sequence[Any],
    resumed: Sequence[str],
) -> str:
    """report.json: settings, target, per-candidate curve, diagnostics and content digest,
    the ranking. The same results give the same bytes (whether measured or read back:
    `resumed` is accepted for the API but not written), so a plain rerun leaves it as is."""
    cands = []
    for r in results:
        cands.append(
            {
                "name": r.name,
                "path": r.path,
                "family": r.family,
                "n_params": r.n_params,
                "zero_shot": _finite_or_none(r.zero_shot),
                "sizes": [int(s) for s in r.sizes],
                "losses": [_finite_or_none(v) for v in r.losses],
                "loss_se": [_finite_or_none(v) for v in r.loss_se],
                "num_steps": [int(s) for s in r.num_steps],
                "status": list(r.status),
                "ntk": None
                if not r.has_ntk
                else {
                    "probe_examples": int(r.eigenvalues.size),
                    "eta": r.eta,
                    "max_eigenvalue": float(r.eigenvalues.max()),
                    "trace": float(r.eigenvalues.sum()),
                    "residual_norm2": float(r.residual @ r.residual),
                    "asymmetry": _finite_or_none(r.kernel_diagnostics[0]),
                    "min_eigenvalue": _finite_or_none(r.kernel_diagnostics[1]),
                    "clipped": _finite_or_none(r.kernel_diagnostics[2]),
                },
                "hessian_trace": None
                if not math.isfinite(r.hessian_trace)
                else {"mean": r.hessian_trace, "stderr": _finite_or_none(r.hessian_stderr)},
                "hessian_by_size": hessian_by_size(r),
                "digest": r.digest or None,
            }
        )
    ranking = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r._asdict().items()}
        for r in rows
    ]
    body = {
        "settings": settings,
        "data_file": str(data_path.resolve()),
        "loss_unit": LOSS_UNIT,
        "target": target,
        "candidates": cands,
        "ranking": ranking,
    }
    return json.dumps(body, indent=1, default=json_default) + "\n"


class OutputNames(NamedTuple):
    """Where one target's ranking goes in the run folder (`output_names`)."""

    ranking: str  # ranking.csv, or ranking_target-<N>.csv
    report: str  # report.json, or report_target-<N>.json
    plots: str  # plots, or plots_target-<N>
    previous_target: float | None  # the target of report.json when it is another one


def _target_text(target: float) -> str:
    return str(int(target)) if float(target).is_integer() else f"{target:g}"


def output_names(out: Path, target: float) -> OutputNames:
    """The files of the ranking for `target`: ranking.csv, report.json and plots/ when the
    folder holds no ranking yet or one for the same target; else (report.json is for
    another target) ranking_target-<N>.csv, report_target-<N>.json, plots_target-<N>/, so
    a rerun with another --target never overwrites an earlier ranking."""
    previous = None
    try:
        previous = float(json.loads((out / "report.json").read_text(encoding="utf-8"))["target"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no (readable) earlier ranking: the plain names are free
    if previous is None or previous == float(target):
        return OutputNames("ranking.csv", "report.json", "plots", None)
    tag = f"target-{_target_text(target)}"
    return OutputNames(f"ranking_{tag}.csv", f"report_{tag}.json", f"plots_{tag}", previous)
