"""How sure a ranking is: the probability that each candidate is truly the best.

A prediction of the full-size loss is an extrapolation over k = log₂(target / D_top)
doublings beyond the largest fine-tuned size D_top. What decides a ranking is the error of
one candidate's prediction relative to the others' (an error shared by every candidate
moves no rank), so the model is

    log L_true,m = log L̂_m − b + ε_m,   ε_m ~ N(0, σ²) independent,   σ = c · k,

with b a bias common to the task (irrelevant here) and c the relative log-loss error per
doubling of extrapolation, calibrated on the fine-tuning scaling benchmark of Lin et al.
(`ERROR_PER_DOUBLING`; `benchmark.calibration.calibrate_per_doubling` re-derives it). Then

    P(m is best) = ∫ φ_σ(x − μ_m) Π_{j≠m} (1 − Φ_σ(x − μ_j)) dx,   μ = log L̂,
    P(i beats j) = Φ((μ_j − μ_i) / (√2 σ)),

and the credible set is the fewest candidates, most probable first, whose P(best) sums to
at least `level` (default 0.9).

How well this holds (coverage of the credible set, the reliability of P(i beats j), the
top pick's P(best) against its hit rate, per dataset) is measured by
`benchmarks/confidence_calibration.py`; the figures are in README. c is one number for
every task: read the probabilities as calibrated across tasks like the benchmark's.

Cost: O(G·M) for P(best) on a G-point grid (G = 4001), O(M²) for the pairwise matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import log_ndtr, ndtr

__all__ = [
    "ERROR_PER_DOUBLING",
    "Confidence",
    "confidence",
    "credible_set",
    "doublings",
    "prob_beats",
    "prob_best",
]

# Relative log-loss error sd per doubling of extrapolation for LensLLM, pooled over FLAN and
# Gigaword (`benchmark.calibration.calibrate_per_doubling`; tests/test_confidence.py re-derives it).
ERROR_PER_DOUBLING = 0.0145

_GRID = 4001


class Confidence(NamedTuple):
    """How sure one method's ranking is (NaN / False for candidates that failed)."""

    p_best: np.ndarray  # (M,) P(candidate is truly the best at the target)
    in_credible_set: np.ndarray  # (M,) bool: in the smallest set holding the best w.p. >= level
    sigma: float  # σ = c · k, the relative log-loss error scale of the extrapolation
    doublings: float  # k = log₂(target / D_top)
    level: float
    sigmas: np.ndarray  # (M,) per candidate: sqrt(σ² + measurement_sd²)


def doublings(budget: float, target: float) -> float:
    """k = log₂(target / budget), at least 1 (a prediction is never surer than one doubling)."""
    return max(math.log2(target / budget), 1.0)


def _p_best(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """P(m is best) (M,) for X_j ~ N(μ_j, σ_j²) independent, by quadrature."""
    if mu.size == 1 or np.any(sigma <= 0):
        p = (mu == mu.min()).astype(np.float64)
        return p / p.sum()
    x = np.linspace((mu - 9 * sigma).min(), (mu + 9 * sigma).max(), _GRID)
    z = (x[None, :] - mu[:, None]) / sigma[:, None]
    log_sf = log_ndtr(-z)  # log(1 − Φ(z)), accurate in the tails
    log_pdf = -0.5 * z * z - np.log(sigma * math.sqrt(2 * math.pi))[:, None]
    dens = np.exp(log_pdf + log_sf.sum(axis=0, keepdims=True) - log_sf)  # m is min, at x
    p = np.trapezoid(dens, x, axis=1)
    return p / p.sum()  # the grid's missing mass is < 1e-15


def prob_best(log_pred: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """P(m has the lowest true loss) for independent N(μ_m, σ_m²) (NaN μ: NaN, excluded);
    `sigma` is one scale for all or one per candidate.

    Exact up to quadrature: ∫ φ_σ(x − μ_m) Π_{j≠m} Φ̄_σ(x − μ_j) dx on a 4001-point grid
    spanning every μ ± 9σ (products in log space). Cost O(G·M).
    """
    mu = np.asarray(log_pred, np.float64)
    out = np.full(mu.shape, np.nan)
    ok = np.isfinite(mu)
    if ok.any():
        out[ok] = _p_best(mu[ok], np.broadcast_to(np.asarray(sigma, np.float64), mu.shape)[ok])
    return out


def prob_beats(log_pred: np.ndarray, sigma: float) -> np.ndarray:
    """(M, M) matrix P(i's true loss < j's) = Φ((μ_j − μ_i) / (√2 σ)); diagonal 0.5."""
    mu = np.asarray(log_pred, np.float64)
    with np.errstate(invalid="ignore"):
        return ndtr((mu[None, :] - mu[:, None]) / (math.sqrt(2) * max(sigma, 1e-300)))


def credible_set(p_best: np.ndarray, level: float = 0.9) -> np.ndarray:
    """(M,) bool: the fewest candidates, most probable first, whose P(best) sums to >= level."""
    p = np.asarray(p_best, np.float64)
    keep = np.zeros(p.shape, bool)
    order = [int(i) for i in np.argsort(-np.nan_to_num(p, nan=-1.0)) if np.isfinite(p[i])]
    total = 0.0
    for i in order:
        keep[i] = True
        total += p[i]
        if total >= level - 1e-12:
            break
    return keep


def confidence(
    predicted_loss: np.ndarray,
    budget: float,
    target: float,
    *,
    per_doubling: float = ERROR_PER_DOUBLING,
    level: float = 0.9,
    measurement_sd: np.ndarray | None = None,
) -> Confidence:
    """`Confidence` of a ranking by predicted losses L̂ (lower = better) at `target`,
    extrapolated from fine-tunes on at most `budget` samples.

    measurement_sd: (M,) optional relative standard errors of the candidates' own test
    losses (se / L of the largest fine-tuned size, from a finite test set), added in
    quadrature: σ_m = sqrt((c·k)² + measurement_sd_m²). The benchmark's calibration has no
    such term (its test sets are large); treating the candidates' measurement errors as
    independent is conservative when they share one test set. Cost O(G·M)."""
    k = doublings(budget, target)
    sigma = per_doubling * k
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = np.log(np.asarray(predicted_loss, np.float64))
    mu = np.where(np.isfinite(mu), mu, np.nan)
    extra = np.zeros(mu.shape) if measurement_sd is None else np.asarray(measurement_sd, float)
    sigmas = np.sqrt(sigma**2 + np.where(np.isfinite(extra), extra, 0.0) ** 2)
    p = prob_best(mu, sigmas)
    return Confidence(p, credible_set(p, level), sigma, k, level, sigmas)
