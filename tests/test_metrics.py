"""Metrics against scipy and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lensllm_jax.benchmark import metrics
from lensllm_jax.data.curves import CurveTable
from lensllm_jax.selection.base import Selection


def _table(n_params):
    m = len(n_params)
    return CurveTable(
        name="toy",
        models=tuple(f"m{i}" for i in range(m)),
        sizes=np.array([200.0, 400.0, 800.0]),
        losses=np.ones((m, 3)),
        zero_shot=np.ones(m),
        n_params=np.asarray(n_params, np.float64),
        families=("f",) * m,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_and_kendall_match_scipy(seed):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(1.0, 3.0, 30)
    scores = truth + rng.normal(0, 0.4, 30)
    scores[:6] = np.round(scores[:6], 0)  # ties in the scores
    truth[6:10] = truth[6]  # ties in the truth
    assert metrics.pearson_percent(scores, truth) == pytest.approx(
        100 * stats.pearsonr(scores, truth)[0], abs=1e-9
    )
    assert metrics.kendall_tau_percent(scores, truth) == pytest.approx(
        100 * stats.kendalltau(scores, truth)[0], abs=1e-9
    )


def test_nan_scores_are_dropped_and_rank_last():
    truth = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    scores = np.array([np.nan, 2.1, 2.9, 4.2, 5.5])
    keep = slice(1, None)
    assert metrics.pearson_percent(scores, truth) == pytest.approx(
        100 * stats.pearsonr(scores[keep], truth[keep])[0]
    )
    assert metrics.kendall_tau_percent(scores, truth) == pytest.approx(100.0)
    # The true best (index 0) failed: the selection is the best finite score, index 1.
    assert metrics.relacc_percent(scores, truth) == pytest.approx(100 * (5 - 2) / (5 - 1))
    assert np.isnan(metrics.relacc_percent(np.full(5, np.nan), truth))
    assert np.isnan(metrics.pearson_percent(np.array([np.nan, 1.0, np.nan]), truth[:3]))


def test_relacc_by_hand():
    truth = np.array([1.6, 1.5, 2.0, 1.9])
    assert metrics.relacc_percent(np.array([0.0, 1.0, 2.0, 3.0]), truth) == pytest.approx(80.0)
    assert metrics.relacc_percent(np.array([9.0, 1.0, 2.0, 3.0]), truth) == pytest.approx(100.0)
    assert metrics.relacc_percent(np.array([9.0, 9.0, 2.0, 3.0]), truth) == pytest.approx(0.0)


def test_model_size_pearson_sign():
    # Bigger models have lower loss: Lin et al.'s feature log(size) correlates negatively.
    n = np.array([1e8, 1e9, 1e10])
    truth = np.array([3.0, 2.0, 1.0])
    sel = Selection(-np.log(n), ("ok",) * 3, ((),) * 3, pearson_sign=-1.0)
    expected = 100 * stats.pearsonr(np.log(n), truth)[0]
    assert expected < 0
    assert metrics.selection_pearson_percent(sel, truth) == pytest.approx(expected)
    plain = Selection(truth + 0.1, ("ok",) * 3, ((),) * 3)
    assert metrics.selection_pearson_percent(plain, truth) == pytest.approx(100.0)


def test_cost_percent_by_hand():
    table = _table([1.0, 3.0])
    sel = Selection(np.zeros(2), ("ok", "failed"), ((200.0, 400.0), (800.0,)))
    # (1·600 + 3·800) / ((1 + 3) · 1600) = 3000 / 6400
    assert metrics.cost_percent(table, sel, 1600.0) == pytest.approx(100 * 3000 / 6400)
    none = Selection(np.zeros(2), ("ok", "ok"), ((), ()))
    assert metrics.cost_percent(table, none, 1600.0) == 0.0
    with pytest.raises(ValueError, match="2 models"):
        metrics.cost_percent(_table([1.0, 2.0, 3.0]), sel, 1600.0)
