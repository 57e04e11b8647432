"""Reproduce Lin et al.'s selection tables: every method, every budget, every metric.

Protocol (Lin et al., ICML 2024): the target size is 1,638,400 samples; budget 1/r lets a
method fine-tune on sizes D <= target/r only (plus the zero-shot column and the parameter
count); each method ranks the candidates, and the ranking is judged against the true
losses at the target size by

- PearCorr: Pearson r x 100 between score and true loss (no sign flip),
- RelAcc: (L_worst - L_selected) / (L_worst - L_best) x 100,
- KendallTau: Kendall tau x 100,
- CostPercent: fine-tuning FLOPs spent, as a percentage of fine-tuning every model at the
  target size.

Every check that can fail on the input (unknown method, missing target column, a budget
leaving fewer than 3 points) runs before any method does. A curve that cannot be fitted
is status "failed" in the method's `Selection`, ranks last, and raises a
`CurveFitWarning` naming it; it never stops the run.

Cost: one call of each method per (table, budget), i.e. len(tables) x len(ratios) x
len(methods) calls, plus O(M log M) per metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from lensllm_jax.data.curves import CurveTable, budget_label, check_protocol
from lensllm_jax.errors import CurveFitWarning, LensLLMInputError
from lensllm_jax.selection.registry import resolve_methods

__all__ = [
    "BUDGET_RATIOS",
    "COLUMNS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "TARGET",
    "Row",
    "rows_to_csv",
    "rows_to_json",
    "run",
]

TARGET = 1_638_400  # the benchmark's full fine-tuning size
BUDGET_RATIOS = (8, 16, 32, 64, 128, 256, 512)  # budget = TARGET / ratio

METRICS = ("PearCorr", "RelAcc", "KendallTau", "CostPercent")
HIGHER_IS_BETTER = {"PearCorr": True, "RelAcc": True, "KendallTau": True, "CostPercent": False}
COLUMNS = ("dataset", "budget", "method", "metric", "value_percent")


class Row(NamedTuple):
    """One cell of the reproduced tables; `budget` is written "1/8"."""

    dataset: str
    budget: str
    method: str
    metric: str
    value_percent: float


def run(
    tables: Sequence[CurveTable],
    methods: Sequence[str] | Mapping[str, Callable] | None = None,
    ratios: Sequence[int] | None = None,
    *,
    target: float | None = None,
) -> list[Row]:
    """Run every method on every table and budget; return the metric rows.

    Args:
      tables: curve tables; each needs the target size as a column.
      methods: method names from `selection.METHODS` (default: all that need no NTK
        spectra), or a mapping name -> ``(table, budget_size, target) -> Selection``.
      ratios: budget ratios r (budget size = target / r); default `BUDGET_RATIOS`.
      target: the full data size; default `TARGET` (1,638,400).

    Returns:
      Rows ordered by dataset, budget, method, metric (PearCorr, RelAcc, KendallTau,
      CostPercent).

    Raises:
      LensLLMInputError: before any method runs, for an unknown method, a table without
        the target column or with a hole in its sizes, or a budget leaving < 3 sizes.
    """
    chosen = resolve_methods(methods)
    ratios = tuple(BUDGET_RATIOS if ratios is None else ratios)
    target = float(TARGET if target is None else target)
    if not tables:
        raise LensLLMInputError("no curve tables given", hint="pass at least one CSV")
    for table in tables:
        check_protocol(table, target, ratios)
    from lensllm_jax.benchmark import metrics  # after the checks: bad input never waits

    rows: list[Row] = []
    for table in tables:
        truth = table.column(target)
        for ratio in ratios:
            budget = budget_label(ratio)
            for name, method in chosen.items():
                with warnings.catch_warnings():
                    # One warning per failure, below, with the dataset and budget in it.
                    warnings.simplefilter("ignore", CurveFitWarning)
                    sel = method(table, target / ratio, target)
                _warn_failed(table, budget, name, sel.status)
                scores = np.asarray(sel.scores, dtype=np.float64)
                values = (
                    # Lin et al. correlate each method's own feature (log(size) for
                    # ModelSize), which a Selection carries as `pearson_sign`.
                    metrics.selection_pearson_percent(sel, truth),
                    metrics.relacc_percent(scores, truth),
                    metrics.kendall_tau_percent(scores, truth),
                    metrics.cost_percent(table, sel, target),
                )
                rows.extend(
                    Row(table.name, budget, name, metric, float(v))
                    for metric, v in zip(METRICS, values, strict=True)
                )
    return rows


def _warn_failed(table: CurveTable, budget: str, method: str, status: Sequence[str]) -> None:
    failed = [m for m, s in zip(table.models, status, strict=True) if s != "ok"]
    if failed:
        shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        warnings.warn(
            f"{table.name} {budget} {method}: {len(failed)} of {table.num_models} curves "
            f"could not be fitted ({shown}); they rank last",
            CurveFitWarning,
            stacklevel=3,
        )


def rows_to_csv(rows: Sequence[Row]) -> str:
    """CSV with exactly the columns dataset,budget,method,metric,value_percent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r.dataset, r.budget, r.method, r.metric, _number(r.value_percent)])
    return buf.getvalue()


def _number(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"


def rows_to_json(rows: Sequence[Row]) -> str:
    """A JSON array of objects with the CSV's keys; NaN is written null."""
    items = [
        {**r._asdict(), "value_percent": None if math.isnan(r.value_percent) else r.value_percent}
        for r in rows
    ]
    return json.dumps(items, indent=1) + "\n"
