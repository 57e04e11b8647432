"""Ranking confidence: P(best), the credible set and the benchmark calibration of σ."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from lensllm_jax.benchmark import calibration
from lensllm_jax.data.curves import read_curve_table
from lensllm_jax.selection import confidence, ranking


def test_prob_best_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu = np.array([0.0, 0.02, 0.03, 0.10, np.nan, 0.015])
    sigma = 0.04
    p = confidence.prob_best(mu, sigma)
    ok = np.isfinite(mu)
    draws = mu[ok][None, :] + sigma * rng.standard_normal((400_000, ok.sum()))
    mc = np.bincount(np.argmin(draws, axis=1), minlength=ok.sum()) / draws.shape[0]
    np.testing.assert_allclose(p[ok], mc, atol=3e-3)
    assert math.isnan(p[4]) and abs(np.nansum(p) - 1) < 1e-12


def test_two_candidates_reduce_to_the_pairwise_formula():
    mu, sigma = np.array([0.0, 0.05]), 0.03
    p = confidence.prob_best(mu, sigma)
    expected = norm.cdf(0.05 / (math.sqrt(2) * sigma))
    np.testing.assert_allclose(p[0], expected, rtol=1e-9)
    beats = confidence.prob_beats(mu, sigma)
    np.testing.assert_allclose(beats[0, 1], expected, rtol=1e-12)
    np.testing.assert_allclose(beats + beats.T, 1.0, rtol=1e-12)


def test_prob_best_ignores_a_common_shift_and_degenerate_cases():
    mu = np.array([0.3, 0.1, 0.2])
    np.testing.assert_allclose(
        confidence.prob_best(mu, 0.05), confidence.prob_best(mu + 7.0, 0.05), atol=1e-12
    )
    np.testing.assert_array_equal(confidence.prob_best(np.array([1.0]), 0.1), [1.0])
    np.testing.assert_array_equal(confidence.prob_best(mu, 0.0), [0.0, 1.0, 0.0])


def test_credible_set_is_the_fewest_most_probable():
    p = np.array([0.05, 0.5, np.nan, 0.3, 0.15])
    np.testing.assert_array_equal(confidence.credible_set(p, 0.9), [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(confidence.credible_set(p, 0.5), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(confidence.credible_set(p, 0.8), [0, 1, 0, 1, 0])


def test_calibration_recovers_a_known_scale():
    rng = np.random.default_rng(1)
    c_true, preds, truths, ks = 0.02, [], [], []
    for _ in range(60):
        k = float(rng.integers(3, 10))
        mu = rng.normal(0.0, 0.1, 30)
        preds.append(mu)
        truths.append(mu + c_true * k * rng.standard_normal(30) + 0.3)  # + a common bias
        ks.append(k)
    c = calibration.calibrate_per_doubling(preds, truths, ks)
    assert abs(c / c_true - 1) < 0.1, c


@pytest.fixture(scope="module")
def fts_rankings(fts_dir):
    return [
        r
        for name in ("flan", "gigaword")
        for r in calibration.calibration_rankings(read_curve_table(fts_dir / f"{name}.csv"))
    ]


def test_shipped_scale_is_the_benchmark_optimum(fts_rankings):
    assert len(fts_rankings) == 54
    c = calibration.calibrate_per_doubling(
        [r.log_pred for r in fts_rankings],
        [r.log_true for r in fts_rankings],
        [r.doublings for r in fts_rankings],
    )
    np.testing.assert_allclose(confidence.ERROR_PER_DOUBLING, c, rtol=0.01)


def test_credible_set_covers_the_best_on_the_benchmark(fts_rankings):
    covered = []
    for r in fts_rankings:
        conf = confidence.confidence(np.exp(r.log_pred), r.budget, r.target)
        covered.append(conf.in_credible_set[int(np.nanargmin(r.log_true))])
        assert conf.sigma == pytest.approx(confidence.ERROR_PER_DOUBLING * r.doublings)
    assert np.mean(covered) >= 0.9


def test_ranking_rows_carry_p_best_for_lensllm(fts_dir):
    table = read_curve_table(fts_dir / "gigaword.csv")
    rows = ranking.rank(table, 6_553_600, ["LensLLM", "AtS"])
    lens = [r for r in rows if r.method == "LensLLM"]
    conf = confidence.confidence(
        np.array([r.score for r in lens]), float(table.sizes[-1]), 6_553_600
    )
    np.testing.assert_allclose([r.p_best for r in lens], conf.p_best, rtol=1e-12)
    assert all(math.isnan(r.p_best) for r in rows if r.method == "AtS")
    text = ranking.credible_set_text(lens)
    assert text.endswith("hold the best with probability >= 0.9") and lens[0].model in text
    assert ",p_best\n" in ranking.rows_to_csv(rows).splitlines(keepends=True)[0]


def test_select_table_shows_p_best_and_the_credible_set(fts_dir, capsys):
    from lensllm_jax import cli

    code = cli.main(["select", str(fts_dir / "gigaword.csv"), "--target", "6553600"])
    out = capsys.readouterr().out
    assert code == 0
    assert "P(best)" in out and "hold the best with probability >= 0.9" in out
    code = cli.main(
        ["select", str(fts_dir / "gigaword.csv"), "--target", "6553600", "--methods", "AtS"]
    )
    assert code == 0 and "P(best)" not in capsys.readouterr().out


def test_prob_best_with_per_candidate_scales_matches_monte_carlo():
    rng = np.random.default_rng(5)
    mu = np.array([0.0, 0.01, 0.05, 0.02])
    sigma = np.array([0.01, 0.06, 0.02, 0.03])
    p = confidence.prob_best(mu, sigma)
    draws = mu + sigma * rng.standard_normal((400_000, 4))
    mc = np.bincount(np.argmin(draws, axis=1), minlength=4) / draws.shape[0]
    np.testing.assert_allclose(p, mc, atol=3e-3)
    conf = confidence.confidence(np.exp(mu), 1000, 8000, measurement_sd=[0.0, 0.1, np.nan, 0])
    c = confidence.ERROR_PER_DOUBLING * 3
    np.testing.assert_allclose(conf.sigmas, [c, np.hypot(c, 0.1), c, c])
    np.testing.assert_allclose(conf.p_best, confidence.prob_best(mu, conf.sigmas))


def test_standard_errors_in_the_table_widen_p_best(fts_dir):
    import dataclasses

    table = read_curve_table(fts_dir / "gigaword.csv")
    noisy = dataclasses.replace(table, loss_se=0.05 * table.losses)  # 5 % relative error
    plain = ranking.rank(table, 6_553_600)
    wide = ranking.rank(noisy, 6_553_600)
    assert [r.model for r in wide] == [r.model for r in plain]  # scores are unchanged
    assert wide[0].p_best < plain[0].p_best
    conf = confidence.confidence(
        np.array([r.score for r in wide]),
        float(table.sizes[-1]),
        6_553_600,
        measurement_sd=np.full(table.num_models, 0.05),
    )
    np.testing.assert_allclose([r.p_best for r in wide], conf.p_best, rtol=1e-10)
