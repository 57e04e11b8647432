"""Calibrating how sure LensLLM's rankings may claim to be, on benchmarks with known
outcomes: the error scale c per doubling of extrapolation that `selection.confidence` ships.

`calibration_rankings` runs a method on every (pseudo-)target and budget of a curve table
whose full-size losses are known; `calibrate_per_doubling` picks the c that makes the
pairwise probabilities P(i beats j) best calibrated (mean log loss, `pairwise_log_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_ndtr

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.selection.confidence import doublings

__all__ = [
    "CALIBRATION_MIN_BUDGET",
    "CALIBRATION_RATIOS",
    "CALIBRATION_TARGETS",
    "Ranking",
    "calibrate_per_doubling",
    "calibration_rankings",
    "pairwise_log_loss",
]

# The benchmark cells the constant comes from: pseudo-targets and budget ratios of Lin et
# al.'s protocol, every budget with at least 800 samples (>= 3 fine-tuned sizes plus a
# doubling-back backtest).
CALIBRATION_TARGETS = (1_638_400, 819_200, 409_600, 204_800)
CALIBRATION_RATIOS = (8, 16, 32, 64, 128, 256, 512)
CALIBRATION_MIN_BUDGET = 800.0


def pairwise_log_loss(
    log_preds: Sequence[np.ndarray],
    log_truths: Sequence[np.ndarray],
    ks: Sequence[float],
    per_doubling: float,
) -> float:
    """Mean log loss of P(i beats j) over every pair of every ranking (candidates with a
    non-finite prediction or truth left out). The calibration objective."""
    total, count = 0.0, 0
    for mu, truth, k in zip(log_preds, log_truths, ks, strict=True):
        ok = np.isfinite(mu) & np.isfinite(truth)
        mu, truth = np.asarray(mu)[ok], np.asarray(truth)[ok]
        i, j = np.triu_indices(mu.size, 1)
        z = (mu[j] - mu[i]) / (math.sqrt(2) * per_doubling * k)
        y = truth[i] < truth[j]
        total -= float(np.sum(np.where(y, log_ndtr(z), log_ndtr(-z))))
        count += i.size
    return total / max(count, 1)


def calibrate_per_doubling(
    log_preds: Sequence[np.ndarray], log_truths: Sequence[np.ndarray], ks: Sequence[float]
) -> float:
    """The c minimising `pairwise_log_loss` over rankings with known outcomes (bounded
    1-D search on log c in [1e-4, 1]). Cost O(iterations · Σ M²)."""
    res = minimize_scalar(
        lambda lc: pairwise_log_loss(log_preds, log_truths, ks, math.exp(lc)),
        bounds=(math.log(1e-4), 0.0),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return math.exp(res.x)


class Ranking(NamedTuple):
    """One benchmark ranking with a known outcome: predicted and true log losses."""

    dataset: str
    target: float
    budget: float
    log_pred: np.ndarray  # (M,)
    log_true: np.ndarray  # (M,)

    @property
    def doublings(self) -> float:
        return doublings(self.budget, self.target)


def calibration_rankings(
    table: CurveTable,
    method: str = "LensLLM",
    targets: Sequence[float] = CALIBRATION_TARGETS,
    ratios: Sequence[int] = CALIBRATION_RATIOS,
    min_budget: float = CALIBRATION_MIN_BUDGET,
) -> list[Ranking]:
    """Run `method` on `table` for every (pseudo-)target in `targets` and budget
    target/ratio >= `min_budget` that is one of the table's sizes; the truth is the table's
    loss at the target. Cost: one selection per cell (law fits memoised across cells)."""
    from lensllm_jax.selection.registry import METHODS

    sizes = [float(s) for s in table.sizes]
    out = []
    for target in targets:
        if float(target) not in sizes:
            continue
        truth = np.log(table.losses[:, sizes.index(float(target))])
        for ratio in ratios:
            budget = float(target) / ratio
            if budget < min_budget or budget not in sizes:
                continue
            sel = METHODS[method](table, budget, float(target))
            with np.errstate(divide="ignore", invalid="ignore"):
                pred = np.log(np.asarray(sel.scores, np.float64))
            out.append(Ranking(table.name, float(target), budget, pred, truth))
    return out
