"""LensLLM's extrapolation from curves: the LENSLLM law's tangent and AtS's line, fused by
their calibrated variances, the slopes pooled across the task (`fused_fit`: the prediction
with each candidate's own variance; `fused_predict`: the prediction alone), and the
backtests inside the visible curve that `confidence.assess` reads the task's error scale
from (`fused_backtests`).

Every function is a pure function of the visible data; `lensllm.lensllm` documents the
method, and `benchmark.ablations` turns its choices on and off.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.selection.base import visible_curves
from lensllm_jax.selection.baselines import ats_first_point, line_fit

__all__ = [
    "BACKTEST_FRACTIONS",
    "LENSLLM_ZERO_D",
    "Backtest",
    "Fused",
    "fused_backtests",
    "fused_fit",
    "fused_predict",
]

LENSLLM_ZERO_D = 0.0  # the zero-shot point: the law gives L(0) = B/F + E


class _Lines(NamedTuple):
    """Two extrapolation lines in (log D, log L) per model, anchored at x_top = log D_top:
    log L̂(x) = level + slope·(x − x_top), with their (co)variances."""

    law_level: np.ndarray  # the fitted law's log L at D_top, and its log-log slope there
    law_slope: np.ndarray
    law_cov: np.ndarray  # (M, 2, 2) Laplace covariance of (level, slope)
    ats_level: np.ndarray  # AtS's least-squares line at D_top, and its slope
    ats_slope: np.ndarray
    ats_cov: np.ndarray  # (M, 2, 2) OLS covariance of (level at x_top, slope)
    x_top: float
    ok: np.ndarray  # (M,) the law fit is usable
    law_raw: np.ndarray | None = None  # (M, 4) the law's raw (log) parameters, for reports
    law_resid: np.ndarray | None = None  # (M, S_b + 1) log L − law fit, zero-shot point first


def _shrunk_variance(sse: np.ndarray, dof: np.ndarray, nu0: float = 0.5) -> np.ndarray:
    """Residual variance per model, partially pooled across the task's candidates: a scaled
    inverse-χ² prior centred on the pooled variance Σ SSE / Σ dof with `nu0` pseudo degrees
    of freedom (so a curve with 0-2 residual dof still gets a finite variance)."""
    dof = np.maximum(dof, 0.0)
    use = np.isfinite(sse)  # a curve that could not be fitted does not enter the pool
    sse_u, dof_u = sse[use], dof[use]
    pooled = sse_u.sum() / dof_u.sum() if dof_u.sum() > 0 else sse_u.sum() / max(sse_u.size, 1)
    return (nu0 * pooled + sse) / np.maximum(nu0 + dof, 1e-12)


_LINES_CACHE: dict[tuple, _Lines] = {}  # keyed by the visible data: budget b/2 of one call
_LINES_CACHE_SIZE = 64  # is budget b of the next ratio, so each law fit runs once


def _lines(table: CurveTable, budget_size: float, num_starts: int = 16, nu0: float = 0.5) -> _Lines:
    """The law's tangent line (level + slope at the largest visible size, Laplace
    covariance s²·gᵀ(JᵀJ)⁺g) and AtS's line (OLS covariance) for every model.
    Memoised on the visible data (the result is a pure function of it)."""
    sizes, losses = visible_curves(table, budget_size)
    zero_shot = np.asarray(table.zero_shot, np.float64)
    key = (sizes.tobytes(), losses.tobytes(), zero_shot.tobytes(), losses.shape, num_starts, nu0)
    if key not in _LINES_CACHE:
        if len(_LINES_CACHE) >= _LINES_CACHE_SIZE:
            _LINES_CACHE.pop(next(iter(_LINES_CACHE)))  # oldest first
        _LINES_CACHE[key] = _compute_lines(sizes, losses, zero_shot, num_starts, nu0)
    return _LINES_CACHE[key]


def _compute_lines(
    sizes: np.ndarray, losses: np.ndarray, zero_shot: np.ndarray, num_starts: int, nu0: float
) -> _Lines:
    from lensllm_jax.core import fit, laws

    d = np.concatenate([[LENSLLM_ZERO_D], sizes])
    l_all = np.concatenate([zero_shot[:, None], losses], axis=1)
    res = fit.fit_law("lensllm", np.broadcast_to(d, l_all.shape), l_all, num_starts=num_starts)
    ok = np.asarray(res.ok) & np.isfinite(res.raw).all(axis=1)
    raw = np.where(ok[:, None], res.raw, 0.0)
    x_top = float(np.log(sizes[-1]))
    y, jac = laws.value_and_jac("lensllm", raw, d)
    level, slope, g_level, g_slope = laws.tangent("lensllm", raw, sizes[-1])
    g = np.stack([g_level, g_slope], axis=1)  # (M, 2, 4)
    resid = np.log(l_all) - y
    sse = np.where(ok, np.sum(resid**2, axis=1), np.nan)
    s2 = _shrunk_variance(sse, np.full(ok.size, d.size - 4.0), nu0)
    info_inv = np.linalg.pinv(np.einsum("msp,msq->mpq", jac, jac))
    law_cov = s2[:, None, None] * np.einsum("mip,mpq,mjq->mij", g, info_inv, g)
    ls = np.column_stack([level, slope])

    x = np.log(sizes)
    m = losses.shape[0]
    a_level, a_slope, a_sse, a_dof = (np.empty(m) for _ in range(4))
    a_geo = np.empty((m, 2, 2))
    with np.errstate(all="ignore"):
        for i in range(m):
            y_i = np.log(losses[i])
            first = ats_first_point(x, y_i)
            xa, ya = x[first:], y_i[first:]
            slope, icpt = line_fit(xa, ya)
            r = ya - (slope * xa + icpt)
            sxx, dx = float(np.sum((xa - xa.mean()) ** 2)), x_top - xa.mean()
            a_level[i], a_slope[i] = slope * x_top + icpt, slope
            a_sse[i], a_dof[i] = float(r @ r), xa.size - 2.0
            a_geo[i] = [[1 / xa.size + dx**2 / sxx, dx / sxx], [dx / sxx, 1 / sxx]]
    ats_cov = _shrunk_variance(a_sse, a_dof, nu0)[:, None, None] * a_geo
    law_resid = np.where(ok[:, None], resid, np.nan)
    return _Lines(ls[:, 0], ls[:, 1], law_cov, a_level, a_slope, ats_cov, x_top, ok, raw, law_resid)


def _line_variance(cov: np.ndarray, dx: float) -> np.ndarray:
    """Var(level + slope·dx) from a (M, 2, 2) covariance."""
    return cov[:, 0, 0] + 2 * dx * cov[:, 0, 1] + dx * dx * cov[:, 1, 1]


def _common_residual(table: CurveTable, budget_size: float, nu0: float = 0.5) -> np.ndarray:
    """(S_b + 1,) the task-wide residual of the law fits at every visible point (zero-shot
    point first): c(D) = median over the usable candidates of log L_m(D) − log L̂_m(D).

    Every candidate is fine-tuned on the same nested subsets and scored on the same test
    set, so log L_m(D) = c(D) + g_m(D) + ε_m,D with c shared: a draw of a subset or a shape
    the law family misses on this task. c(target) is the same for every candidate, so it
    does not change any ranking; left in, it bends each candidate's fit, and so its tangent
    and the fusion weights, differently. The median (not the mean) keeps one abnormal
    curve from defining c. Zeros when fewer than 3 candidates are usable. Cost: one
    `_lines` (memoised) and O(M·S)."""
    lines = _lines(table, budget_size, nu0=nu0)
    resid = lines.law_resid
    if resid is None or int(lines.ok.sum()) < 3:
        return np.zeros(int(np.sum(table.sizes <= budget_size * (1 + 1e-12))) + 1)
    with np.errstate(all="ignore"):
        c = np.nanmedian(resid[lines.ok], axis=0)
    return np.where(np.isfinite(c), c, 0.0)


def _without_common(
    table: CurveTable, budget_size: float, passes: int = 2, nu0: float = 0.5
) -> tuple[CurveTable, float]:
    """(the table with every visible loss and the zero-shot loss divided by exp c(D),
    c(D_top)): the shared residual removed from what the fits see, by backfitting the
    additive model log L_m(D) = c(D) + law_m(D) + ε: c += `_common_residual` of the table
    with the current c removed, `passes` times (each pass refits the laws). Columns above
    the budget are left as they are (nothing reads them). Cost: `passes` batched law fits
    (`_lines`, memoised) and O(passes·M·S)."""
    keep = table.sizes <= budget_size * (1 + 1e-12)
    total = np.zeros(int(keep.sum()) + 1)
    out = table
    for _ in range(passes):
        total = total + _common_residual(out, budget_size, nu0)
        losses = np.array(table.losses, np.float64)
        losses[:, keep] = losses[:, keep] * np.exp(-total[1:])
        zero_shot = np.asarray(table.zero_shot, np.float64) * np.exp(-total[0])
        out = dataclasses.replace(table, losses=losses, zero_shot=zero_shot)
    return out, float(total[-1])


def _between_methods(diff: np.ndarray, var: np.ndarray) -> float:
    """DerSimonian-Laird τ² of the law-minus-AtS differences d_m with variances v_m
    (calibrated, both methods): Q = Σ w(d − d̄)², w = 1/v, d̄ = Σwd/Σw;
    τ² = max(0, (Q − (n − 1)) / (Σw − Σw²/Σw)). The spread of the disagreement beyond what
    the two stated variances allow: a between-method (bias) variance the per-candidate
    variances miss. 0 with < 3 usable candidates. Cost O(M)."""
    use = np.isfinite(diff) & np.isfinite(var) & (var > 0)
    if int(use.sum()) < 3:
        return 0.0
    d, w = diff[use], 1 / var[use]
    q = float(np.sum(w * (d - np.sum(w * d) / w.sum()) ** 2))
    return max(0.0, (q - (d.size - 1)) / float(w.sum() - np.sum(w**2) / w.sum()))


def _calibration(
    table: CurveTable, budget_size: float, nu0: float = 0.5, centre: bool = True
) -> tuple[float, float]:
    """Bias-aware variance factors (k_law, k_AtS) >= 1 from a one-doubling backtest on the
    visible data: fit both lines on sizes <= D_top/2, predict log L(D_top), and take the
    mean squared standardised error after removing the task-wide mean error (a bias shared
    by every candidate does not change a ranking). (1, 1) when D_top/2 leaves < 3 sizes."""
    sizes, losses = visible_curves(table, budget_size)
    half = float(sizes[-1]) / 2
    if int(np.sum(table.sizes <= half * (1 + 1e-12))) < 3:
        return 1.0, 1.0
    past = _lines(table, half, nu0=nu0)
    dx = float(np.log(sizes[-1])) - past.x_top
    truth = np.log(losses[:, -1])
    out = []
    for level, slope, cov in (
        (past.law_level, past.law_slope, past.law_cov),
        (past.ats_level, past.ats_slope, past.ats_cov),
    ):
        err, var = level + slope * dx - truth, _line_variance(cov, dx)
        use = past.ok & np.isfinite(err) & (var > 0)
        if use.sum() < 2:
            out.append(1.0)
            continue
        w = 1 / var[use]
        centred = err[use] - (np.sum(w * err[use]) / w.sum() if centre else 0.0)
        out.append(max(1.0, float(np.mean(centred**2 * w))))
    return out[0], out[1]


def _fay_herriot(
    est: np.ndarray, var: np.ndarray, covariates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes posterior means and variances of θ_m under est_m ~ N(θ_m, var_m),
    θ_m ~ N(x_mᵀγ, τ²) (Fay-Herriot): γ by weighted least squares, τ² by iterated moments
    (Σ r²/(n − p) − mean var, floored). Posterior variance var·τ²/(var + τ²) (γ treated as
    known). Returns (est, var) unchanged when n <= p + 1. Cost O(n·p²)."""
    n, p = covariates.shape
    if n <= p + 1:
        return est, var
    tau2 = 0.0
    gamma = np.zeros(p)
    for _ in range(20):
        w = np.sqrt(1 / (var + tau2)) if tau2 > 0 else np.ones(n)
        gamma = np.linalg.lstsq(covariates * w[:, None], est * w, rcond=None)[0]
        r = est - covariates @ gamma
        tau2 = max(float(np.sum(r**2) / (n - p) - np.mean(var)), 1e-12)
    prior_mean = covariates @ gamma
    post = (est / var + prior_mean / tau2) / (1 / var + 1 / tau2)
    return post, 1 / (1 / var + 1 / tau2)


class Fused(NamedTuple):
    """LensLLM's prediction for every candidate, with its own uncertainty."""

    pred: np.ndarray  # (M,) predicted L(target)
    ok: np.ndarray  # (M,) usable
    sizes: np.ndarray  # (S_b,) the visible sizes
    log_var: np.ndarray  # (M,) Var of log L̂(target) from the candidate's own fused fit
    slope: np.ndarray  # (M,) the pooled log-log slope θ̂ it extrapolates with
    x_top: float  # log of the largest visible size


def fused_fit(
    table: CurveTable,
    budget_size: float,
    target: float,
    *,
    nu0: float = 0.5,
    centre: bool = True,
    calibrate: bool = True,
    trend: str = "size",
    common_passes: int = 2,
    heterogeneity: bool = True,
    details: dict[str, np.ndarray] | None = None,
) -> Fused:
    """`lensllm.lensllm`'s log-space prediction with its choices exposed for the ablations in
    `benchmarks/lensllm_vs_ats.py`: `nu0` (pooling of residual variances), `centre` and
    `calibrate` (backtest calibration), `trend` ("size": pool slopes toward a trend in
    log(model size); "mean": toward the task mean; "none": no pooling), `common_passes`
    (backfitting passes that remove the residual every candidate shares, `_without_common`;
    0: none) and `heterogeneity` (the between-method variance, `_between_methods`).

    With `common_passes` > 0 both lines are fitted to the curves with the shared residual
    c(D) removed and c(D_top) is added back to every level: the same constant for every
    candidate, so it changes no ranking (and c(target), unknown, would not either).
    With `heterogeneity`, τ²_ℓ and τ²_s, the DerSimonian-Laird variances of the
    law-minus-AtS levels and slopes across the task, are added half to each method's
    calibrated variance before fusing: where the two lines disagree more than their own
    variances allow, neither gets all the weight.

    The variance of log L̂(target) = ℓ + θ̂·Δx (Δx = log target − x_top) is that of the
    fused line: Var ℓ + 2Δx·Cov(ℓ, θ̂) + Δx²·Var θ̂, with the law's and AtS's (calibrated)
    covariances combined by the fusion weights (the two lines treated as independent) and
    Var θ̂ the Fay-Herriot posterior variance. Cost O(M) on top of `_lines` (1 + passes
    batched law fits at the budget and one at budget/2 for the calibration).

    A `details` dict, if given, receives (M,) arrays that redraw the prediction and its
    variance at any D (dx = log D − log d_top): the law's B, beta, E, F (fitted to the
    curves without the shared residual); d_top; the fused
    level (log L at d_top), slope and slope_var; pooled_slope; var_level, cov_level_slope
    and var_pooled_slope, so that log L̂(D) = level + pooled_slope · dx and
    Var log L̂(D) = var_level + 2·dx·cov_level_slope + dx²·var_pooled_slope."""
    sizes, _ = visible_curves(table, budget_size)
    c_top = 0.0
    if common_passes > 0:
        table, c_top = _without_common(table, budget_size, common_passes, nu0)
    lines = _lines(table, budget_size, nu0=nu0)
    k_law, k_ats = _calibration(table, budget_size, nu0, centre) if calibrate else (1.0, 1.0)
    ok = lines.ok
    cov_t, cov_a = lines.law_cov * k_law, lines.ats_cov * k_ats
    if heterogeneity:
        with np.errstate(all="ignore"):
            h = [
                _between_methods(np.where(ok, law - ats, np.nan), cov_t[:, i, i] + cov_a[:, i, i])
                for i, law, ats in (
                    (0, lines.law_level, lines.ats_level),
                    (1, lines.law_slope, lines.ats_slope),
                )
            ]
        extra = np.diag(h) / 2  # the between-method variance, half to each method
        cov_t, cov_a = cov_t + extra, cov_a + extra
    with np.errstate(all="ignore"):
        vs_t, vs_a = cov_t[:, 1, 1], cov_a[:, 1, 1]
        vl_t, vl_a = cov_t[:, 0, 0], cov_a[:, 0, 0]
        ws_t, wl_t = vs_a / (vs_t + vs_a), vl_a / (vl_t + vl_a)  # inverse-variance weights
        slope = ws_t * lines.law_slope + (1 - ws_t) * lines.ats_slope
        level = wl_t * lines.law_level + (1 - wl_t) * lines.ats_level
        v_slope = 1 / (1 / vs_t + 1 / vs_a)
        v_level = 1 / (1 / vl_t + 1 / vl_a)
        c_ls = wl_t * ws_t * cov_t[:, 0, 1] + (1 - wl_t) * (1 - ws_t) * cov_a[:, 0, 1]
    ok = ok & np.isfinite(slope) & np.isfinite(level) & (v_slope > 0)
    pooled, v_pooled = slope.copy(), v_slope.copy()
    if ok.any() and trend != "none":
        cols = [np.ones(ok.sum())]
        if trend == "size":
            cols.append(np.log(np.asarray(table.n_params, np.float64)[ok]))
        pooled[ok], v_pooled[ok] = _fay_herriot(slope[ok], v_slope[ok], np.column_stack(cols))
    dx = float(np.log(target)) - lines.x_top
    level = level + c_top  # the shared residual at D_top back: the same for every candidate
    with np.errstate(all="ignore"):
        pred = np.exp(level + pooled * dx)
        shrink = np.where(v_slope > 0, v_pooled / v_slope, 1.0)  # (1 − B): the slope's share
        log_var = v_level + 2 * dx * shrink * c_ls + dx * dx * v_pooled
    ok = ok & np.isfinite(log_var) & (log_var > 0)
    if details is not None and lines.law_raw is not None:
        law = np.where(ok[:, None], np.exp(lines.law_raw), np.nan)
        details.update(zip(("B", "beta", "E", "F"), law.T, strict=True))
        details.update(
            d_top=np.full(ok.size, float(sizes[-1])),
            level=level,
            slope=slope,
            slope_var=v_slope,
            pooled_slope=pooled,
            var_level=v_level,
            cov_level_slope=shrink * c_ls,
            var_pooled_slope=v_pooled,
        )
    return Fused(pred, ok, sizes, np.where(ok, log_var, np.nan), pooled, lines.x_top)


def fused_predict(
    table: CurveTable, budget_size: float, target: float, **kw
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`fused_fit` as (predicted L(target) (M,), ok (M,), visible sizes)."""
    f = fused_fit(table, budget_size, target, **kw)
    return f.pred, f.ok, f.sizes


# Pseudo-targets of the in-data backtests: the largest visible size D_top, D_top/2, D_top/4.
BACKTEST_FRACTIONS = (1, 2, 4)


class Backtest(NamedTuple):
    """One backtest inside the visible curve: LensLLM fitted on sizes <= `budget`, judged at
    a visible pseudo-target (log losses; NaN where the fit failed)."""

    log_pred: np.ndarray  # (M,)
    log_true: np.ndarray  # (M,)
    log_var: np.ndarray  # (M,) the fused fit's own variance of log_pred
    budget: float
    target: float


def fused_backtests(
    table: CurveTable, budget_size: float, fractions: tuple[int, ...] = BACKTEST_FRACTIONS
) -> list[Backtest]:
    """Backtests on the visible data only: for each pseudo-target P = D_top / f (f in
    `fractions`, P a visible size) and each visible budget b < P that leaves >= 3 sizes,
    `fused_fit(table, b, P)` against the measured loss at P. Nothing above `budget_size` is
    read. Cost: one `fused_fit` per (P, b), at most 3·(S_b − 3); the law fits are memoised
    per budget, so about S_b − 3 batched fits."""
    sizes, losses = visible_curves(table, budget_size)
    out: list[Backtest] = []
    for f in fractions:
        hit = np.flatnonzero(np.isclose(sizes, sizes[-1] / f, rtol=1e-9, atol=0.0))
        if not hit.size:
            continue
        p = float(sizes[hit[0]])
        truth = np.log(losses[:, hit[0]])
        for b in sizes[2:]:  # at least three sizes <= b
            if b >= p * (1 - 1e-12):
                break
            fit = fused_fit(table, float(b), p)
            with np.errstate(divide="ignore", invalid="ignore"):
                pred = np.where(fit.ok, np.log(fit.pred), np.nan)
            out.append(Backtest(pred, truth, fit.log_var, float(b), p))
    return out
