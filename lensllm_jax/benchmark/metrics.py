"""How good a selection is, judged on the true full-size losses (Lin et al., ICML 2024).

Every metric takes a method's `scores` (lower = better; NaN for a failed fit) and the true
losses at the target size, and returns a percentage:

  PearCorr   100 · r(s, L)          Pearson r between a method's feature and the true loss,
                                    no sign flip (a good loss predictor gives r > 0)
  RelAcc     100 · (L_worst − L_sel) / (L_worst − L_best),   sel = argmin of finite scores
  KendallTau 100 · τ_b(s, L)        rank agreement (ties handled as scipy's tau-b)
  CostPercent 100 · Σ_m n_m Σ_{D ∈ fine-tuned_m} D / (Σ_m n_m · target)
                                    fine-tuning FLOPs ≈ 6 · params · tokens, tokens ∝ samples

Failed models (NaN score) are dropped from PearCorr and KendallTau and can never be
selected for RelAcc: they "rank last". Each metric is O(M) except Kendall's O(M log² M)
(O(M) memory).
"""

from __future__ import annotations

import numpy as np

from lensllm_jax.data.curves import CurveTable

__all__ = [
    "cost_percent",
    "kendall_tau_percent",
    "pearson_percent",
    "relacc_percent",
    "selection_pearson_percent",
]


def _finite_pairs(scores: np.ndarray, true_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(true_loss, dtype=np.float64).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and true_loss must have the same length, got {s.size}, {t.size}")
    keep = np.isfinite(s) & np.isfinite(t)
    return s[keep], t[keep]


def pearson_percent(scores: np.ndarray, true_loss: np.ndarray) -> float:
    """100 · Pearson r between `scores` and `true_loss` over models with a finite score.

    No sign flip: pass the method's raw feature (a predicted loss, or log(size) for
    ModelSize, see `selection_pearson_percent`). NaN when fewer than 2 finite scores or
    either side is constant. Cost O(M).
    """
    s, t = _finite_pairs(scores, true_loss)
    if s.size < 2:
        return float("nan")
    s = s - s.mean()
    t = t - t.mean()
    denom = np.sqrt(np.dot(s, s) * np.dot(t, t))
    if denom == 0.0:
        return float("nan")
    return float(100.0 * np.dot(s, t) / denom)


def selection_pearson_percent(selection, true_loss: np.ndarray) -> float:
    """`pearson_percent` of a `select.Selection`, on the feature Lin et al. correlate:
    ``selection.pearson_sign · scores`` (−1 only for ModelSize, whose feature is log(size)
    while its score, lower = better, is −log(size)). This reproduces their signs
    (e.g. ModelSize on FLAN: −20.9). Cost O(M)."""
    sign = float(getattr(selection, "pearson_sign", 1.0))
    return pearson_percent(sign * np.asarray(selection.scores, dtype=np.float64), true_loss)


def relacc_percent(scores: np.ndarray, true_loss: np.ndarray) -> float:
    """100 · (L_worst − L_selected) / (L_worst − L_best); the selected model is the argmin of
    the finite scores (the first one on ties). NaN when no score is finite or every true loss
    is equal. Best and worst are over all models. Cost O(M)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(true_loss, dtype=np.float64).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and true_loss must have the same length, got {s.size}, {t.size}")
    ok = np.isfinite(s)
    if not ok.any():
        return float("nan")
    worst, best = float(np.max(t)), float(np.min(t))
    if worst == best:
        return float("nan")
    selected = t[np.flatnonzero(ok)[np.argmin(s[ok])]]
    return float(100.0 * (worst - selected) / (worst - best))


def kendall_tau_percent(scores: np.ndarray, true_loss: np.ndarray) -> float:
    """100 · Kendall τ_b between scores and true losses over models with a finite score.

    τ_b = (P − Q) / sqrt((P + Q + T_s)(P + Q + T_t)) with P/Q the concordant/discordant pairs
    and T_s/T_t the pairs tied only in s/only in t (scipy.stats.kendalltau's default).
    NaN when fewer than 2 finite scores or either side is constant.

    Knight's algorithm: sort by (t, s); Q is the number of inversions of s in that order
    (`_inversions`); the ties come from group sizes. Cost O(M log² M) time, O(M) memory
    (20,000 models: milliseconds and kilobytes, where the pairwise form needs gigabytes).
    """
    s, t = _finite_pairs(scores, true_loss)
    n = s.size
    if n < 2:
        return float("nan")
    order = np.lexsort((s, t))
    s, t = s[order], t[order]
    pairs = n * (n - 1) // 2
    tied_t = _tied_pairs(t)
    tied_both = _tied_pairs_2(t, s)
    tied_s = _tied_pairs(np.sort(s))
    n_s, n_t = pairs - tied_s, pairs - tied_t
    if n_s == 0 or n_t == 0:
        return float("nan")
    discordant = _inversions(s)
    # Pairs untied in both: P + Q = pairs - T_s - T_t + T_both; P - Q = that - 2Q.
    concord_minus_discord = pairs - tied_s - tied_t + tied_both - 2 * discordant
    return float(100.0 * concord_minus_discord / np.sqrt(float(n_s) * float(n_t)))


def _tied_pairs(sorted_values: np.ndarray) -> int:
    """Σ_g c_g(c_g − 1)/2 over groups of equal values in a sorted array."""
    if sorted_values.size == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
    c = np.diff(starts).astype(np.int64)
    return int(np.sum(c * (c - 1) // 2))


def _tied_pairs_2(t: np.ndarray, s: np.ndarray) -> int:
    """Pairs tied in both t and s, for arrays sorted by (t, s)."""
    change = np.r_[True, (t[1:] != t[:-1]) | (s[1:] != s[:-1]), True]
    c = np.diff(np.flatnonzero(change)).astype(np.int64)
    return int(np.sum(c * (c - 1) // 2))


def _inversions(x: np.ndarray) -> int:
    """Pairs i < j with x[i] > x[j] (strictly), by a vectorised bottom-up merge sort: at
    width w, each element of a right run counts the left-run elements above it with one
    `searchsorted` over all runs at once. O(M log² M) time, O(M) memory."""
    n = x.size
    r = np.unique(x, return_inverse=True)[1].astype(np.int64).reshape(-1)  # dense ranks
    total, w = 0, 1
    idx = np.arange(n)
    while w < n:
        block = idx // (2 * w)  # the merge this element takes part in
        left = (idx % (2 * w)) < w
        key = block * n + r  # runs are sorted, so keys are sorted within each run
        lk = key[left]  # every left run, in order: globally sorted
        right_key = key[~left]
        # left elements of the same block <= x: position in lk minus the earlier blocks'.
        le = np.searchsorted(lk, right_key, side="right")
        before = np.searchsorted(lk, block[~left] * n, side="left")
        size_left = np.searchsorted(lk, block[~left] * n + n, side="left") - before
        total += int(np.sum(size_left - (le - before)))
        r = np.sort(key) - block * n  # merge: each block of 2w sorted
        w *= 2
    return total


def cost_percent(table: CurveTable, selection, target: float) -> float:
    """Fine-tuning cost of a selection as a percentage of fine-tuning every model at `target`.

    FLOPs ≈ 6 · params · tokens and tokens ∝ samples, so the ratio is
    Σ_m n_m Σ_{D ∈ finetuned_sizes[m]} D / (Σ_m n_m · target) · 100 (the 6 and the tokens
    per sample cancel). A failed fit still paid for its fine-tunes. Cost O(M·S).
    """
    n = np.asarray(table.n_params, dtype=np.float64)
    sizes = selection.finetuned_sizes
    if len(sizes) != n.size:
        raise ValueError(f"selection has {len(sizes)} models, table {table.name!r} has {n.size}")
    spent = sum(float(n_m) * float(np.sum(d)) for n_m, d in zip(n, sizes, strict=True))
    return float(100.0 * spent / (float(np.sum(n)) * float(target)))
