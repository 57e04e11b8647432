"""One ranking path for every method: scores -> places (failed last) -> P(best).

Input: a curve table in the benchmark's layout (``config name``, the zero-shot column ``0``,
one column per fine-tuning subset size D, ``size`` = parameters, ``family``), holding the
test loss of each candidate fine-tuned on each of a few small nested subsets. Every chosen
selection method sees all of those sizes (the budget is the largest) and scores each
candidate for the full data size `target`; for the law-based methods and AtS the score is
the predicted test loss L(target). Candidates are ranked by score, lower first; a failed
fit ranks last with status "failed", and so do candidates whose curves could not be
measured at all (`failed=`). For a calibrated method (`Method.calibrated`: LensLLM) each
row also carries P(best), the probability that the candidate is truly the best at the
target under the error model of `confidence.assess` (the task's extrapolation error per
doubling from the benchmark prior and backtests on the table's own curves, each
candidate's own fit variance, and the largest size's standard error when the table has
``se_<size>`` columns). A table in which no candidate's loss falls with D is marked "not
falling" and carries no P(best).

Cost: that of the methods (one batched fit for the law-based ones, O(M·S²) for AtS).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lensllm_jax.data.curves import CurveTable, check_budget
from lensllm_jax.errors import CurveFitWarning, LensLLMInputError
from lensllm_jax.selection.base import Selection
from lensllm_jax.selection.registry import DEFAULT_METHODS, Method, resolve_methods

__all__ = [
    "COLUMNS",
    "RankRow",
    "credible_set_text",
    "rank",
    "rank_selection",
    "rows_to_csv",
    "rows_to_json",
]

COLUMNS = ("method", "rank", "model", "score", "status", "p_best")


class RankRow(NamedTuple):
    """One candidate under one method: its place (1 = fine-tune this one) and score."""

    method: str
    rank: int
    model: str
    score: float  # predicted loss at the target for the fitting methods; NaN when failed
    status: str
    # P(this candidate is truly the best at the target) for the methods with a calibrated
    # error model (`Method.calibrated`), NaN for the others and for failed fits.
    p_best: float = math.nan
    # What made the score (`Selection.details`: a law's B, beta, E, ...; LensLLM's fused
    # level and slope), None (null in JSON) where not finite; None for methods without.
    details: dict[str, float | None] | None = None


def rank(
    table: CurveTable,
    target: float,
    methods: Sequence[str] | None = None,
    *,
    failed: Sequence[str] = (),
) -> list[RankRow]:
    """Rank `table`'s candidates by each method's score for data size `target`.

    Every method sees every size of the table (the budget is the largest). `failed` names
    candidates outside the table whose curves could not be measured (a fine-tune that
    diverged): they rank last under every method, status "failed".

    Raises `LensLLMInputError` (one line) for a target not beyond the largest fine-tuned
    size, fewer than 3 sizes, an unknown method, or an NTK method on a table without NTK
    spectra; nothing else raises for a bad curve.
    """
    chosen = resolve_methods(list(DEFAULT_METHODS) if methods is None else methods)
    largest = float(table.sizes[-1])
    if not (math.isfinite(target) and target > largest):
        raise LensLLMInputError(
            f"target {target:g} must be larger than the largest fine-tuned size {largest:g}",
            file=table.source or table.name,
            hint="give --target the number of samples you will fine-tune on",
        )
    check_budget(table, largest)
    rows: list[RankRow] = []
    for name, method in chosen.items():
        mine = rank_selection(table, method, method(table, largest, float(target)), target)
        rows.extend(mine)
        rows.extend(
            RankRow(name, len(mine) + k, model, math.nan, "failed")
            for k, model in enumerate(failed, start=1)
        )
    return rows


def rank_selection(
    table: CurveTable, method: Method, sel: Selection, target: float
) -> list[RankRow]:
    """Rows for one method's `Selection` (lower first, NaN = failed, last); P(best) when the
    method is calibrated (`confidence.assess`: the task's scale from the benchmark prior and
    the table's own backtests, each candidate's own fit variance, the table's standard
    errors of its largest size when it has them). When no candidate's loss falls with D
    (`confidence.curve_falls`), every usable row has status "not falling", no P(best), and a
    `CurveFitWarning` says so. Cost O(M log M), plus `assess` for a calibrated method."""
    from lensllm_jax.selection.confidence import assess, curve_falls

    scores = np.asarray(sel.scores, np.float64)
    largest = float(table.sizes[-1])
    status = list(sel.status)
    if not curve_falls(table, largest).any():
        status = ["not falling" if s == "ok" else s for s in status]
        warnings.warn(
            f"{method.name}: no candidate's loss falls with the data size (every curve "
            "rising or flat), so no scaling law applies; the order is not a prediction and "
            "carries no P(best)",
            CurveFitWarning,
            stacklevel=3,
        )
    p_best = np.full(scores.shape, np.nan)
    details = sel.details
    if method.calibrated:
        conf = assess(table, float(target), scores)
        p_best = conf.p_best
        # what P(best) used: σ_m at the target and the task's error per doubling c
        spread = {"sigma": conf.sigmas, "per_doubling": np.full(scores.shape, conf.per_doubling)}
        details = {**(details or {}), **spread}
    order = sorted(range(table.num_models), key=lambda i: (math.isnan(scores[i]), scores[i]))
    return [
        RankRow(
            method.name,
            place,
            table.models[i],
            float(scores[i]),
            status[i],
            float(p_best[i]),
            _row_details(details, i),
        )
        for place, i in enumerate(order, start=1)
    ]


def _row_details(details: dict[str, np.ndarray] | None, i: int) -> dict[str, float | None] | None:
    if details is None:
        return None
    out: dict[str, float | None] = {}
    for k, v in details.items():
        x = float(np.asarray(v)[i])
        out[k] = x if math.isfinite(x) else None
    return out


def rows_to_csv(rows: Sequence[RankRow]) -> str:
    """CSV with the columns method,rank,model,score,status."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        score = "nan" if math.isnan(r.score) else f"{r.score:.6g}"
        p_best = "" if math.isnan(r.p_best) else f"{r.p_best:.4f}"
        writer.writerow([r.method, r.rank, r.model, score, r.status, p_best])
    return buf.getvalue()


def credible_set_text(rows: Sequence[RankRow], level: float = 0.9) -> str:
    """'A, B and C hold the best with probability >= 0.9' for one method's rows (with
    P(best)); '' when the rows carry none."""
    from lensllm_jax.selection.confidence import credible_set

    p = np.array([r.p_best for r in rows], np.float64)
    if not np.isfinite(p).any():
        return ""
    chosen = [r.model for r, keep in zip(rows, credible_set(p, level), strict=True) if keep]
    if len(chosen) == 1:
        return f"{chosen[0]} is the best with probability >= {level:g}"
    names = f"{', '.join(chosen[:-1])} and {chosen[-1]}"
    return f"{names} hold the best with probability >= {level:g}"


def rows_to_json(rows: Sequence[RankRow]) -> str:
    """A JSON array of objects with the CSV's keys; NaN is written null."""
    items = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r._asdict().items()}
        for r in rows
    ]
    return json.dumps(items, indent=1) + "\n"
