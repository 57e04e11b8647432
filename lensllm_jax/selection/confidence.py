"""How sure a ranking is: the probability that each candidate is truly the best.

A prediction of the full-size loss is an extrapolation over k = log₂(target / D_top)
doublings beyond the largest fine-tuned size D_top. What decides a ranking is the error of
one candidate's prediction relative to the others' (an error shared by every candidate
moves no rank), so the model is

    log L_true,m = log L̂_m − b + ε_m,   ε_m ~ N(0, σ_m²) independent,
    σ_m² = (c · k)² + v_m + s_m²,

with b a bias common to the task (irrelevant here) and three sources of error:

- c · k: the task's extrapolation error, c per doubling (the law and its tangent are only
  approximately right far out). c is the task's own scale, estimated from the user's curves
  and bounded below by the benchmark:

      ĉ   = the c that calibrates P(i beats j) best (pairwise log loss, as on the benchmark)
            on backtests inside the visible curve: pseudo-targets P ∈ {D_top, D_top/2,
            D_top/4}, each predicted by LensLLM from every smaller visible budget
            (`_fusion.fused_backtests`; k' = log₂(P / b) there);
      c²  = max(c₀², (ν₀ c₀² + n ĉ²) / (ν₀ + n)),   n = M − 1,

  the conjugate (scaled-inverse-χ²) update of the benchmark prior c₀ (`ERROR_PER_DOUBLING`,
  worth ν₀ = `PRIOR_DOF` degrees of freedom) by ĉ² with n degrees of freedom (one
  ranking's contrasts: the backtests share their curves, so they count once), floored at
  c₀. The floor: backtests of 1–2 doublings on the early curve cannot see the
  misspecification that dominates long extrapolations (on the benchmark they under-state
  it on one task and over-state it on the other), so they may make the answer less sure
  than the benchmark, never surer. ν₀ is small because c differs between tasks by more
  than a factor 2 on the benchmark: the prior is a floor and a regulariser for few
  candidates, not a point estimate. Without backtests (fewer than 4 visible sizes) c = c₀.
- v_m: the candidate's own statistical uncertainty, the variance of LensLLM's fused
  prediction (law tangent and AtS line fused by their backtest-calibrated Laplace / OLS
  covariances, slope posterior after Fay–Herriot pooling; `_fusion.fused_fit`). A short,
  noisy or ill-fitted curve is less sure than a clean one.
- s_m: the relative standard error of the candidate's largest measured loss (a finite test
  set; `se_<size>` columns of the table), when known.

Correlations. Errors shared by every candidate cancel in a ranking. Candidates measured on
one test set have positively correlated measurement errors, which makes Var(ε_i − ε_j)
smaller than σ_i² + σ_j²: treating them as independent is conservative. Extrapolation
errors of one model family are positively correlated on the benchmark; modelling that
(a one-factor-per-family Gaussian) changed neither the credible sets' coverage nor the
pairwise log loss measurably (`benchmarks/confidence_calibration.py`), so it is not
modelled.

Then

    P(m is best) = ∫ φ_σm(x − μ_m) Π_{j≠m} (1 − Φ_σj(x − μ_j)) dx,   μ = log L̂,
    P(i beats j) = Φ((μ_j − μ_i) / √(σ_i² + σ_j²)),

and the credible set is the fewest candidates, most probable first, whose P(best) sums to
at least `level` (default 0.9). A ranking in which no candidate's loss falls with D
(`curve_falls`) is outside the model: `assess` gives no P(best) for it.

How well this holds (coverage of the credible set, the reliability of P(i beats j), the
top pick's P(best) against its hit rate; per dataset, leave-one-dataset-out and on
perturbed tasks) is measured by `benchmarks/confidence_calibration.py`; the figures are in
README.

Cost: O(G·M) for P(best) on a G-point grid (G = 4001), O(M²) for the pairwise matrix;
`assess` adds the backtests (about S − 3 memoised batched law fits for S visible sizes)
and a bounded 1-D search over c (O(iterations · Σ M²)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_ndtr, ndtr

if TYPE_CHECKING:
    from lensllm_jax.data.curves import CurveTable

__all__ = [
    "ERROR_PER_DOUBLING",
    "PRIOR_DOF",
    "Confidence",
    "assess",
    "confidence",
    "credible_set",
    "curve_falls",
    "doublings",
    "fit_per_doubling",
    "pairwise_log_loss",
    "prob_beats",
    "prob_best",
    "task_per_doubling",
]

# The benchmark prior c₀: relative log-loss error sd per doubling of extrapolation for
# LensLLM (with its per-candidate variances), the larger of the pairwise-optimal values on
# FLAN and Gigaword (`benchmark.calibration.benchmark_per_doubling`; tests re-derive it).
ERROR_PER_DOUBLING = 0.0185
# Degrees of freedom the prior is worth against the user's own backtests.
PRIOR_DOF = 2.0
# A curve falls when its fitted log-log line drops by more than this over the visible sizes.
FALL_TOLERANCE = 1e-3

_GRID = 4001


class Confidence(NamedTuple):
    """How sure one method's ranking is (NaN / False for candidates that failed)."""

    p_best: np.ndarray  # (M,) P(candidate is truly the best at the target)
    in_credible_set: np.ndarray  # (M,) bool: in the smallest set holding the best w.p. >= level
    sigma: float  # c · k, the task's extrapolation error scale at this target
    doublings: float  # k = log₂(target / D_top)
    level: float
    sigmas: np.ndarray  # (M,) per candidate: sqrt((c·k)² + v_m + s_m²)
    per_doubling: float = ERROR_PER_DOUBLING  # c used
    in_data_per_doubling: float = math.nan  # ĉ from the backtests (NaN: none)


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


def prob_beats(log_pred: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """(M, M) matrix P(i's true loss < j's) = Φ((μ_j − μ_i) / √(σ_i² + σ_j²)); diagonal 0.5.
    `sigma` is one scale for all or one per candidate."""
    mu = np.asarray(log_pred, np.float64)
    s2 = np.broadcast_to(np.asarray(sigma, np.float64) ** 2, mu.shape)
    scale = np.sqrt(np.maximum(s2[:, None] + s2[None, :], 1e-300))
    with np.errstate(invalid="ignore"):
        return ndtr((mu[None, :] - mu[:, None]) / scale)


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


def pairwise_log_loss(
    log_preds: Sequence[np.ndarray],
    log_truths: Sequence[np.ndarray],
    ks: Sequence[float],
    per_doubling: float,
    log_vars: Sequence[np.ndarray] | None = None,
) -> float:
    """Mean log loss of P(i beats j) = Φ((μ_j − μ_i) / √(2(c·k)² + v_i + v_j)) over every
    pair of every ranking (candidates with a non-finite prediction, truth or variance left
    out; v = 0 when `log_vars` is None). The calibration objective. Cost O(Σ M²)."""
    total, count = 0.0, 0
    for r, (mu, truth, k) in enumerate(zip(log_preds, log_truths, ks, strict=True)):
        mu, truth = np.asarray(mu, np.float64), np.asarray(truth, np.float64)
        v = np.zeros(mu.shape) if log_vars is None else np.asarray(log_vars[r], np.float64)
        ok = np.isfinite(mu) & np.isfinite(truth) & np.isfinite(v)
        mu, truth, v = mu[ok], truth[ok], v[ok]
        i, j = np.triu_indices(mu.size, 1)
        z = (mu[j] - mu[i]) / np.sqrt(2 * (per_doubling * k) ** 2 + v[i] + v[j])
        y = truth[i] < truth[j]
        total -= float(np.sum(np.where(y, log_ndtr(z), log_ndtr(-z))))
        count += i.size
    return total / max(count, 1)


def fit_per_doubling(
    log_preds: Sequence[np.ndarray],
    log_truths: Sequence[np.ndarray],
    ks: Sequence[float],
    log_vars: Sequence[np.ndarray] | None = None,
) -> float:
    """The c minimising `pairwise_log_loss` over rankings with known outcomes (bounded 1-D
    search on log c in [1e-4, 1]). Cost O(iterations · Σ M²)."""
    res = minimize_scalar(
        lambda lc: pairwise_log_loss(log_preds, log_truths, ks, math.exp(lc), log_vars),
        bounds=(math.log(1e-4), 0.0),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return math.exp(float(res.x))


def task_per_doubling(
    prior: float, in_data: float, dof: float, prior_dof: float = PRIOR_DOF
) -> float:
    """c = sqrt(max(c₀², (ν₀ c₀² + n ĉ²) / (ν₀ + n))): the benchmark prior c₀ updated by the
    in-data estimate ĉ with n degrees of freedom, never below c₀ (c₀ when ĉ is NaN)."""
    if not (math.isfinite(in_data) and dof > 0):
        return prior
    post = (prior_dof * prior**2 + dof * in_data**2) / (prior_dof + dof)
    return math.sqrt(max(prior**2, post))


def curve_falls(table: CurveTable, budget: float) -> np.ndarray:
    """(M,) bool: the candidate's loss falls with D over the visible sizes — its least-squares
    line in (log D, log L) drops by more than `FALL_TOLERANCE` from the smallest to the
    largest size. A rising or flat curve is outside every scaling law here. (A drop within
    the test set's noise still counts: the ranking by level stays meaningful, and the
    measurement term s_m already widens P(best).) Cost O(M·S)."""
    from lensllm_jax.selection.base import visible_curves

    sizes, losses = visible_curves(table, budget)
    x = np.log(sizes) - np.log(sizes).mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(losses)
        slope = (y - y.mean(axis=1, keepdims=True)) @ x / float(x @ x)
    drop = -slope * float(x[-1] - x[0])
    return np.isfinite(drop) & (drop > FALL_TOLERANCE)


def confidence(
    predicted_loss: np.ndarray,
    budget: float,
    target: float,
    *,
    per_doubling: float = ERROR_PER_DOUBLING,
    level: float = 0.9,
    measurement_sd: np.ndarray | None = None,
    log_var: np.ndarray | None = None,
) -> Confidence:
    """`Confidence` of a ranking by predicted losses L̂ (lower = better) at `target`,
    extrapolated from fine-tunes on at most `budget` samples, for a given scale c
    (`per_doubling`): σ_m = sqrt((c·k)² + log_var_m + measurement_sd_m²).

    measurement_sd: (M,) optional relative standard errors of the candidates' largest
    measured losses; log_var: (M,) optional variances of the candidates' own predictions
    (NaN or absent: 0). `assess` chooses c and both terms for LensLLM. Cost O(G·M)."""
    k = doublings(budget, target)
    sigma = per_doubling * k
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = np.log(np.asarray(predicted_loss, np.float64))
    mu = np.where(np.isfinite(mu), mu, np.nan)
    extra = np.zeros(mu.shape)
    for term in (measurement_sd, None if log_var is None else np.sqrt(np.asarray(log_var))):
        if term is not None:
            t = np.asarray(term, np.float64)
            extra = extra + np.where(np.isfinite(t), t, 0.0) ** 2
    sigmas = np.sqrt(sigma**2 + extra)
    p = prob_best(mu, sigmas)
    return Confidence(p, credible_set(p, level), sigma, k, level, sigmas, per_doubling)


def in_data_per_doubling(table: CurveTable, budget: float) -> tuple[float, int]:
    """(ĉ, n): the pairwise-optimal c on LensLLM's backtests inside the visible curve
    (`_fusion.fused_backtests`) and its degrees of freedom n = M − 1 (candidates with a
    finite backtest prediction); (NaN, 0) without backtests. Cost: the backtests and a 1-D
    search."""
    from lensllm_jax.selection._fusion import fused_backtests

    tests = fused_backtests(table, budget)
    if not tests:
        return math.nan, 0
    usable = np.zeros(table.num_models, bool)
    for t in tests:
        usable |= np.isfinite(t.log_pred)
    n = int(usable.sum()) - 1
    if n < 1:
        return math.nan, 0
    c = fit_per_doubling(
        [t.log_pred for t in tests],
        [t.log_true for t in tests],
        [doublings(t.budget, t.target) for t in tests],
        [t.log_var for t in tests],
    )
    return c, n


def assess(
    table: CurveTable,
    target: float,
    scores: np.ndarray,
    *,
    budget: float | None = None,
    prior: float = ERROR_PER_DOUBLING,
    level: float = 0.9,
) -> Confidence:
    """LensLLM's `Confidence` on `table` (sizes <= `budget`, default all) for `target`:
    `scores` are its predicted losses; c from the benchmark prior and the user's own
    backtests (`task_per_doubling`), v_m from the fused fit, s_m from the table's
    ``se_<size>`` columns. When no candidate's curve falls (`curve_falls`), P(best) is NaN
    for all and the credible set empty. Cost: see the module docstring."""
    from lensllm_jax.selection._fusion import fused_fit

    budget = float(table.sizes[-1]) if budget is None else float(budget)
    keep = table.sizes <= budget * (1 + 1e-12)
    rel_se = None
    if table.loss_se is not None:
        last = int(np.flatnonzero(keep)[-1])
        rel_se = np.asarray(table.loss_se, np.float64)[:, last] / table.losses[:, last]
    scores = np.asarray(scores, np.float64)
    k = doublings(budget, target)
    if not curve_falls(table, budget).any():
        nan = np.full(scores.shape, np.nan)
        return Confidence(nan, np.zeros(scores.shape, bool), math.nan, k, level, nan, math.nan)
    log_var = fused_fit(table, budget, float(target)).log_var
    c_hat, n = in_data_per_doubling(table, budget)
    c = task_per_doubling(prior, c_hat, n)
    conf = confidence(
        scores,
        budget,
        float(target),
        per_doubling=c,
        level=level,
        measurement_sd=rel_se,
        log_var=log_var,
    )
    return conf._replace(in_data_per_doubling=c_hat)
