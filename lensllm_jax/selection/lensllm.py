"""LensLLM (Zeng et al., ICML 2025) as selection methods, ``method(table, budget, target)``:

LensLLM      curves only: the LENSLLM law's tangent fused with AtS's line, slopes pooled
LensLLM-NTK  the law L(D) = B / (F(Θ, t) + D^β) + E with F from each candidate's NTK
             spectrum, F(t) = Σ_k e^{−2ηλ_k t} (u_kᵀ r)² (t, B, β, E fitted)
"""

from __future__ import annotations

import numpy as np

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection._fusion import LENSLLM_ZERO_D, fused_predict
from lensllm_jax.selection.base import (
    Selection,
    fit_predict,
    from_predictions,
    law_details,
    visible_curves,
)

__all__ = ["lensllm", "lensllm_law_predictions", "lensllm_ntk"]


def _with_zero_shot(table: CurveTable, budget_size: float) -> tuple[np.ndarray, ...]:
    """(visible sizes (S_b,), D with the zero-shot point first (S_b + 1,), losses
    (M, S_b + 1)): LENSLLM's law takes the zero-shot loss at D = 0, where L = B/F + E."""
    sizes, losses = visible_curves(table, budget_size)
    d = np.concatenate([[LENSLLM_ZERO_D], sizes])
    l_all = np.concatenate([np.asarray(table.zero_shot, np.float64)[:, None], losses], axis=1)
    return sizes, d, l_all


def lensllm_law_predictions(
    table: CurveTable, budget_size: float, target: float, num_starts: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit the LENSLLM law L(D) = B/(F + D^β) + E (F >= 0 fitted: curves only) to the
    zero-shot point at D = 0 (where the law gives B/F + E) and every size D <= budget.

    MSE of log L, per candidate, best of `num_starts` starts (`fit.fit_law`, batched LM in
    float64). Returns (predicted L(target) (M,), ok (M,), in-sample log RMSE (M,)).
    Cost: one batched fit of M x num_starts problems of S_b + 1 points.
    """
    _, d, l_all = _with_zero_shot(table, budget_size)
    pred, ok, res = fit_predict("lensllm", d, l_all, target, num_starts=num_starts)
    return pred, ok, np.asarray(res.rmse)


def lensllm(table: CurveTable, budget_size: float, target: float) -> Selection:
    """LENSLLM from curves only: the LENSLLM law's local line and AtS's line, fused by
    their calibrated variances, with the extrapolation slope pooled across the task.

    0. Shared residual (`_fusion._without_common`): every candidate is fine-tuned on the
       same subsets and scored on the same test set, so log L_m(D) = c(D) + g_m(D) + ε.
       c, the median across candidates of the law fits' residuals at each size, is
       removed (two backfitting passes: fit, remove c, refit, remove the rest) before
       the lines below are fitted; c(target) is common to all, so no ranking needs it.
    1. Law: B/(F + D^β) + E fitted to the zero-shot point (D = 0) and every size <= budget
       (`lensllm_law_predictions`); its tangent at x_top = log D_top (level ℓ_T, slope s_T)
       with the Laplace covariance s²·gᵀ(JᵀJ)⁺g (g = ∂(ℓ, s)/∂θ, closed-form J). Using the
       law as a smoother of the curve, not its floor E, keeps the tail out of the guesswork.
    2. AtS: Lin et al.'s line on the power phase (level ℓ_A at x_top, slope s_A), OLS
       covariance. Residual variances of both are pooled across the task
       (`_fusion._shrunk_variance`).
    3. Bias-aware calibration (`_fusion._calibration`): each method's variances are
       multiplied by k >= 1, its mean squared standardised backtest error one doubling
       back (task-wide mean error removed).
    4. Per model, inverse-variance fusion: s = (s_T/v_T + s_A/v_A)/(1/v_T + 1/v_A), v_s its
       variance; the level ℓ likewise. Both v_T and v_A first get half of τ², the
       DerSimonian-Laird between-method variance of s_T − s_A (ℓ_T − ℓ_A) across the task
       (`_fusion._between_methods`): disagreement beyond the stated variances is bias
       neither line's own fit can see.
    5. Partial pooling (the paper's "β is the task's learning difficulty", made soft): the
       fused slopes are shrunk by Fay-Herriot empirical Bayes toward a linear trend in
       log(model size), s_m ~ N(θ_m, v_s,m), θ_m ~ N(γ₀ + γ₁ log n_m, τ²), τ² estimated.

        log L̂(target) = ℓ + E[θ | s] · (log target − x_top)

    Nothing is tuned per dataset; only sizes <= budget, the zero-shot losses and the
    parameter counts enter. `benchmarks/lensllm_vs_ats.py` measures it against AtS on the
    benchmark (and every ablation of these choices); the figures are in README.
    The law fits and lines are memoised on the data they see (a repeated call is free).
    A model whose law fit fails is "failed" (NaN, ranks last, `CurveFitWarning`).
    Cost: four batched LM fits (M x 16 starts: at the budget, one per pass of the shared
    residual and one for the lines; at budget/2 for the calibration), M Laplace
    covariances (P = 4) each,
    O(M·S²) for AtS, O(M) for the pooling.
    """
    details: dict[str, np.ndarray] = {}
    pred, ok, sizes = fused_predict(table, budget_size, target, details=details)
    return from_predictions(pred, ok, sizes, "LensLLM", details)


def lensllm_ntk(table: CurveTable, budget_size: float, target: float) -> Selection:
    """LENSLLM with the NTK term: per candidate, fit

        L(D) = B / (F(Θ, t) + D^β) + E,   F(Θ, t) = ‖exp(−ηΘt) r‖² = Σ_k e^{−2ηλ_k t} (u_kᵀ r)²,

    (B, β, E and t free; λ_k, u_kᵀr and η from the table's NTK spectra, `CurveTable.ntk`) to
    the zero-shot point at D = 0 and every size <= budget; score = L(target). A candidate
    without a spectrum, or whose fit fails, is "failed" (NaN, ranks last).

    With t free, F only ranges over (0, ‖r‖²] (F falls monotonically in t from ‖r‖²), so
    this is the curve-only law with F capped at ‖r‖²: the spectrum's shape does not enter
    the optimum, only ‖r‖² does (see the NTK arms of `benchmarks/`).

    Raises `LensLLMInputError` when the table carries no NTK spectra at all.
    Cost: one batched `fit.fit_law` (M x 16 LM problems of S_b + 1 points, O(N) each).
    """
    spectra = table.ntk
    if spectra is None:
        raise LensLLMInputError(
            "LensLLM-NTK needs each candidate's NTK spectrum",
            file=table.source or table.name,
            hint="give lensllm select --ntk FILE (lensllm run writes ntk_features.csv), "
            "or drop the method",
        )
    sizes, d, l_all = _with_zero_shot(table, budget_size)
    have = np.asarray(spectra.available, bool)
    pred = np.full(table.num_models, np.nan)
    ok = np.zeros(table.num_models, bool)
    details = {k: np.full(table.num_models, np.nan) for k in ("B", "beta", "E", "t", "F")}
    if have.any():
        aux = (
            np.asarray(spectra.eigenvalues, np.float64)[have],
            np.asarray(spectra.projected_residual, np.float64)[have],
            np.asarray(spectra.eta, np.float64)[have],
        )
        pred[have], ok[have], res = fit_predict("lensllm_ntk", d, l_all[have], target, aux=aux)
        for k, v in law_details(res, ok[have]).items():
            details[k][have] = v
        lam, c, eta = aux  # F(Θ, t) at the fitted t: the law's curvature term
        with np.errstate(all="ignore"):
            decay = np.exp(-2.0 * eta[:, None] * lam * details["t"][have][:, None])
            details["F"][have] = np.sum(decay * c**2, axis=1)
    return from_predictions(pred, ok, sizes, "LensLLM-NTK", details)
