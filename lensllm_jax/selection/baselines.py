"""Lin et al.'s selection methods (ICML 2024), each ``method(table, budget_size, target)``:

  ZeroShot      score = zero-shot loss                                   no fine-tuning
  SubTuning     score = loss after fine-tuning on the largest D <= budget
  ModelSize     score = −log(n_params) (bigger is better)
  VanillaFit    fit L = B/D^β + E to D in {200, ..., budget}; score = L(target)
  RectifiedFit  fit L = B/(D_l + D^β) + E to {0 (as D = 1e-10), 200, ..., budget}
  AtS           Accept-then-Stop: a line in (log D, log L) on the power phase, extrapolated

Cost: ZeroShot/SubTuning/ModelSize O(M); AtS O(M·S²); the law fits are one batched
`core.fit.fit_law` call (M x starts LM problems of S points, jit-compiled).
"""

from __future__ import annotations

import numpy as np

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.selection.base import (
    Selection,
    all_ok,
    fit_predict,
    from_predictions,
    law_details,
    visible_curves,
)

__all__ = [
    "ZERO_SHOT_D",
    "ats",
    "ats_first_point",
    "line_fit",
    "model_size",
    "rectified_fit",
    "subtuning",
    "vanilla_fit",
    "zero_shot",
]

ZERO_SHOT_D = 1e-10  # Lin et al. enter the zero-shot point as D = 1e-10 in RectifiedFit


def zero_shot(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Score = zero-shot loss (no fine-tuning at all). Cost O(M)."""
    visible_curves(table, budget_size)
    return all_ok(table.zero_shot, (), table.num_models)


def subtuning(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Score = loss after fine-tuning on the largest subset D <= budget. Cost O(M)."""
    sizes, losses = visible_curves(table, budget_size)
    return all_ok(losses[:, -1], (float(sizes[-1]),), table.num_models)


def model_size(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Score = −log(n_params): the biggest model is chosen. Lin et al.'s PearCorr feature is
    log(size), hence ``pearson_sign = −1`` (their ModelSize PearCorr is negative when bigger
    models reach lower loss). Cost O(M)."""
    visible_curves(table, budget_size)
    score = -np.log(np.asarray(table.n_params, np.float64))
    return all_ok(score, (), table.num_models, sign=-1.0)


def vanilla_fit(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Fit the vanilla law L = B/D^β + E to every size D <= budget (MSE of log L, best of
    16 starts); score = L(target). Cost: one batched fit of M x 16 starts."""
    sizes, losses = visible_curves(table, budget_size)
    pred, ok, res = fit_predict("vanilla", sizes, losses, target, num_starts=16)
    return from_predictions(pred, ok, sizes, "VanillaFit", law_details(res, ok))


def rectified_fit(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Fit the rectified law L = B/(D_l + D^β) + E to {zero-shot at D = 1e-10, every size
    D <= budget} (Lin et al.'s protocol; MSE of log L, best of 16 starts); score = L(target).
    Cost: one batched fit of M x 16 starts."""
    sizes, losses = visible_curves(table, budget_size)
    d = np.concatenate([[ZERO_SHOT_D], sizes])
    l_all = np.concatenate([np.asarray(table.zero_shot, np.float64)[:, None], losses], axis=1)
    pred, ok, res = fit_predict("rectified", d, l_all, target, num_starts=16)
    return from_predictions(pred, ok, sizes, "RectifiedFit", law_details(res, ok))


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x."""
    xm, ym = x.mean(), y.mean()
    slope = float(np.sum((x - xm) * (y - ym)) / np.sum((x - xm) ** 2))
    return slope, float(ym - slope * xm)


def ats_first_point(log_d: np.ndarray, log_l: np.ndarray, k: int = 3, delta: float = 5.0) -> int:
    """Index of the first point of the power phase found by Accept-then-Stop.

    Fit a line to the k largest sizes; while the next smaller point's absolute residual
    divided by the std (ddof 0) of the fitted points' residuals is <= delta, accept it and
    refit; stop at the first one that is not. As in Lin et al.'s reference code, the
    smallest size is tested but never fitted (with n <= k points all are used) — this
    reproduces their published table (e.g. Gigaword 1/64 RelAcc 100.0; fitting it gives 87.2).
    Cost O(S²).
    """
    n = log_d.size
    if n <= k:
        return 0
    used = k
    for used in range(k, n):  # fit the `used` largest points, test the next smaller one
        slope, icpt = line_fit(log_d[n - used :], log_l[n - used :])
        resid = log_l[n - used :] - (slope * log_d[n - used :] + icpt)
        spread = float(resid.std())
        test = abs(log_l[n - used - 1] - (slope * log_d[n - used - 1] + icpt))
        if not test <= delta * spread:  # a perfect line (spread 0) accepts only exact points
            break
    return n - used


def ats(
    table: CurveTable, budget_size: float, target: float, k: int = 3, delta: float = 5.0
) -> Selection:
    """AtS (Lin et al.): find the power phase by `ats_first_point`, fit a line to
    (log D, log L) on it, extrapolate to `target`. Details: the line's slope and intercept
    (log L = intercept + slope · log D) and power_from, the first size it was fitted on.
    Cost O(M·S²)."""
    sizes, losses = visible_curves(table, budget_size)
    log_d = np.log(sizes)
    pred = np.empty(table.num_models)
    details = {k: np.empty(table.num_models) for k in ("slope", "intercept", "power_from")}
    with np.errstate(all="ignore"):
        for m in range(table.num_models):
            log_l = np.log(losses[m])
            first = ats_first_point(log_d, log_l, k, delta)
            slope, icpt = line_fit(log_d[first:], log_l[first:])
            pred[m] = np.exp(slope * np.log(target) + icpt)
            details["slope"][m], details["intercept"][m] = slope, icpt
            details["power_from"][m] = sizes[first]
    return from_predictions(pred, np.ones(table.num_models, bool), sizes, "AtS", details)
