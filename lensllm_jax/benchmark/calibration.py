"""Calibrating how sure LensLLM's rankings may claim to be, on benchmarks with known
outcomes: the benchmark prior c₀ per doubling of extrapolation that `selection.confidence`
ships, and the pieces to measure the whole error model (`confidence.assess`) on them.

`calibration_rankings` runs LensLLM on every (pseudo-)target and budget of a curve table
whose full-size losses are known and keeps, per ranking, what `assess` uses: the
predictions, each candidate's own variance and the in-data scale from backtests on the
visible sizes. `calibrate_per_doubling` picks the c that makes the pairwise probabilities
P(i beats j) best calibrated (mean log loss, `pairwise_log_loss`); `benchmark_per_doubling`
takes the largest such c over datasets (the prior); `ranking_confidence` rebuilds
`assess`'s answer for one ranking under a given prior.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.selection.confidence import (
    Confidence,
    confidence,
    curve_falls,
    doublings,
    fit_per_doubling,
    in_data_per_doubling,
    pairwise_log_loss,
    task_per_doubling,
)

__all__ = [
    "CALIBRATION_MIN_BUDGET",
    "CALIBRATION_RATIOS",
    "CALIBRATION_TARGETS",
    "Ranking",
    "benchmark_per_doubling",
    "calibrate_per_doubling",
    "calibration_rankings",
    "pairwise_log_loss",
    "prob_beats_matrix",
    "ranking_confidence",
    "reliability_report",
]

# The benchmark cells the constant comes from: pseudo-targets and budget ratios of Lin et
# al.'s protocol, every budget with at least 800 samples (>= 3 fine-tuned sizes plus a
# doubling-back backtest).
CALIBRATION_TARGETS = (1_638_400, 819_200, 409_600, 204_800)
CALIBRATION_RATIOS = (8, 16, 32, 64, 128, 256, 512)
CALIBRATION_MIN_BUDGET = 800.0


class Ranking(NamedTuple):
    """One benchmark ranking with a known outcome: LensLLM's predicted and the true log
    losses, each candidate's own prediction variance, the in-data scale ĉ (NaN: none) and
    its degrees of freedom, and the families (for correlation checks)."""

    dataset: str
    target: float
    budget: float
    log_pred: np.ndarray  # (M,)
    log_true: np.ndarray  # (M,)
    log_var: np.ndarray  # (M,)
    in_data: float
    dof: int
    families: tuple[str, ...] = ()
    falls: bool = True  # some candidate's curve falls (else assess gives no P(best))

    @property
    def doublings(self) -> float:
        return doublings(self.budget, self.target)


def calibrate_per_doubling(
    log_preds: Sequence[np.ndarray],
    log_truths: Sequence[np.ndarray],
    ks: Sequence[float],
    log_vars: Sequence[np.ndarray] | None = None,
) -> float:
    """The c minimising `pairwise_log_loss` over rankings with known outcomes
    (`confidence.fit_per_doubling`). Cost O(iterations · Σ M²)."""
    return fit_per_doubling(log_preds, log_truths, ks, log_vars)


def _optimum(rankings: Sequence[Ranking]) -> float:
    return calibrate_per_doubling(
        [r.log_pred for r in rankings],
        [r.log_true for r in rankings],
        [r.doublings for r in rankings],
        [r.log_var for r in rankings],
    )


def benchmark_per_doubling(by_dataset: Mapping[str, Sequence[Ranking]]) -> float:
    """The prior c₀: the largest per-dataset pairwise-optimal c (with the candidates' own
    variances), i.e. the scale of the least predictable calibration task."""
    return max(_optimum(rs) for rs in by_dataset.values())


def calibration_rankings(
    table: CurveTable,
    targets: Sequence[float] = CALIBRATION_TARGETS,
    ratios: Sequence[int] = CALIBRATION_RATIOS,
    min_budget: float = CALIBRATION_MIN_BUDGET,
) -> list[Ranking]:
    """Run LensLLM on `table` for every (pseudo-)target in `targets` and budget
    target/ratio >= `min_budget` that is one of the table's sizes; the truth is the table's
    loss at the target. Cost: one LensLLM fit per cell plus the backtests per budget (law
    fits memoised across cells)."""
    from lensllm_jax.selection._fusion import fused_fit

    sizes = [float(s) for s in table.sizes]
    in_data: dict[float, tuple[float, int]] = {}
    out = []
    for target in targets:
        if float(target) not in sizes:
            continue
        truth = np.log(table.losses[:, sizes.index(float(target))])
        for ratio in ratios:
            budget = float(target) / ratio
            if budget < min_budget or budget not in sizes:
                continue
            fit = fused_fit(table, budget, float(target))
            with np.errstate(divide="ignore", invalid="ignore"):
                pred = np.where(fit.ok, np.log(fit.pred), np.nan)
            if budget not in in_data:
                in_data[budget] = in_data_per_doubling(table, budget)
            c_hat, dof = in_data[budget]
            falls = bool(curve_falls(table, budget).any())
            out.append(
                Ranking(
                    table.name,
                    float(target),
                    budget,
                    pred,
                    truth,
                    fit.log_var,
                    c_hat,
                    dof,
                    tuple(table.families),
                    falls,
                )
            )
    return out


def ranking_confidence(
    r: Ranking, prior: float, level: float = 0.9, *, in_data: bool = True
) -> Confidence:
    """`confidence.assess`'s answer for one calibration ranking under the prior c₀ =
    `prior` (`in_data=False`: c = c₀, the benchmark scale alone). Cost O(G·M)."""
    if not r.falls:
        nan = np.full(r.log_pred.shape, np.nan)
        return Confidence(nan, np.zeros(nan.shape, bool), math.nan, r.doublings, level, nan)
    c = task_per_doubling(prior, r.in_data, r.dof) if in_data else prior
    with np.errstate(over="ignore"):
        conf = confidence(
            np.exp(r.log_pred), r.budget, r.target, per_doubling=c, level=level, log_var=r.log_var
        )
    return conf._replace(in_data_per_doubling=r.in_data)


# Bins of the favoured side's stated P(i beats j) in the reliability diagram, and of P(best).
PAIR_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
P_BEST_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 1.0)


def _bins(stated: np.ndarray, observed: np.ndarray, edges: Sequence[float]) -> list[dict]:
    rows = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        m = (stated >= lo) & ((stated <= hi) if last else (stated < hi))
        if m.any():
            rows.append(
                {
                    "bin": [lo, hi],
                    "count": int(m.sum()),
                    "stated": round(float(stated[m].mean()), 4),
                    "observed": round(float(observed[m].mean()), 4),
                }
            )
    return rows


def reliability_report(
    rankings: Sequence[Ranking],
    prior: float,
    *,
    in_data: bool = True,
    level: float = 0.9,
    min_bin: int = 100,
) -> dict:
    """How `assess` (prior c₀ = `prior`) holds on rankings with known outcomes: pairwise
    reliability (the favoured side's stated P(i beats j) in `PAIR_BINS` against how often it
    won; the worst bin with >= `min_bin` pairs), P(best) reliability (`P_BEST_BINS`, every
    candidate), coverage and size of the `level` credible set (overall, per target, per
    budget ratio), the top pick's mean P(best) against its hit rate, and the mean pairwise
    log loss. Cost O(Σ (G·M + M²))."""
    stated, won, p_all, is_best = [], [], [], []
    covered, size, p_top, hit, per_doubling, regret = [], [], [], [], [], []
    by_target: dict[str, list[tuple[bool, int]]] = {}
    by_ratio: dict[str, list[tuple[bool, int]]] = {}
    loss, pairs = 0.0, 0
    for r in rankings:
        if not r.falls:
            continue
        conf = ranking_confidence(r, prior, level, in_data=in_data)
        ok = np.isfinite(r.log_pred) & np.isfinite(r.log_true)
        mu, truth, sig = r.log_pred[ok], r.log_true[ok], conf.sigmas[ok]
        beats = prob_beats_matrix(mu, sig)
        i, j = np.triu_indices(mu.size, 1)
        p_ij, y = beats[i, j], truth[i] < truth[j]
        with np.errstate(divide="ignore"):
            loss -= float(np.sum(np.where(y, np.log(p_ij), np.log1p(-p_ij))))
        pairs += i.size
        fav = p_ij >= 0.5
        stated.append(np.where(fav, p_ij, 1 - p_ij))
        won.append(np.where(fav, y, ~y))
        best = int(np.argmin(truth))
        p = conf.p_best[ok]
        p_all.append(p)
        is_best.append(np.arange(mu.size) == best)
        pick = int(np.argmin(mu))
        keep = conf.in_credible_set[ok]
        covered.append(bool(keep[best]))
        size.append(int(keep.sum()))
        p_top.append(float(p[pick]))
        hit.append(pick == best)
        regret.append(float(truth[pick] - truth[best]))
        per_doubling.append(conf.per_doubling)
        by_target.setdefault(f"{r.target:.0f}", []).append((covered[-1], size[-1]))
        by_ratio.setdefault(f"1/{round(r.target / r.budget)}", []).append((covered[-1], size[-1]))
    reliability = _bins(np.concatenate(stated), np.concatenate(won).astype(float), PAIR_BINS)
    big = [b for b in reliability if b["count"] >= min_bin] or reliability
    worst = max(big, key=lambda b: abs(b["stated"] - b["observed"]))

    def cells(groups: dict[str, list[tuple[bool, int]]]) -> dict[str, dict]:
        return {
            key: {
                "rankings": len(v),
                "coverage": round(float(np.mean([c for c, _ in v])), 4),
                "mean_set_size": round(float(np.mean([s for _, s in v])), 2),
            }
            for key, v in groups.items()
        }

    return {
        "rankings": len(covered),
        "mean_per_doubling_used": round(float(np.mean(per_doubling)), 5),
        "pairwise_log_loss": round(loss / max(pairs, 1), 4),
        "credible_set_coverage": round(float(np.mean(covered)), 4),
        "credible_set_mean_size": round(float(np.mean(size)), 2),
        "by_target": cells(by_target),
        "by_budget_ratio": cells(by_ratio),
        "top_pick_mean_p_best": round(float(np.mean(p_top)), 4),
        "top_pick_hit_rate": round(float(np.mean(hit)), 4),
        "top_pick_mean_regret_log_loss": round(float(np.mean(regret)), 5),
        "pairwise_reliability": reliability,
        "pairwise_worst_bin": {**worst, "gap": round(worst["observed"] - worst["stated"], 4)},
        "p_best_reliability": _bins(
            np.concatenate(p_all), np.concatenate(is_best).astype(float), P_BEST_BINS
        ),
    }


def prob_beats_matrix(mu: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """P(i beats j) for independent N(μ, σ²) (`confidence.prob_beats`), clipped to (0, 1)."""
    from lensllm_jax.selection.confidence import prob_beats

    return np.clip(prob_beats(mu, sigmas), 1e-300, 1 - 1e-16)
