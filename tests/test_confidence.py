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
def fts_by_dataset(fts_dir):
    return {
        name: calibration.calibration_rankings(read_curve_table(fts_dir / f"{name}.csv"))
        for name in ("flan", "gigaword")
    }


@pytest.mark.slow
def test_shipped_prior_is_the_largest_benchmark_optimum(fts_by_dataset):
    assert [len(rs) for rs in fts_by_dataset.values()] == [27, 27]
    optima = {
        name: calibration.calibrate_per_doubling(
            [r.log_pred for r in rs],
            [r.log_true for r in rs],
            [r.doublings for r in rs],
            [r.log_var for r in rs],
        )
        for name, rs in fts_by_dataset.items()
    }
    assert optima["flan"] > 2 * optima["gigaword"]  # the scale is the task's, not universal
    np.testing.assert_allclose(confidence.ERROR_PER_DOUBLING, max(optima.values()), rtol=0.01)
    np.testing.assert_allclose(
        calibration.benchmark_per_doubling(fts_by_dataset), max(optima.values()), rtol=1e-12
    )


@pytest.mark.slow
def test_credible_set_covers_the_best_leaving_one_dataset_out(fts_by_dataset):
    # The evidence: the prior calibrated on one dataset, the in-data scale from the
    # other's own visible curves; the 90 % set holds the truly best model in >= 90 % of the
    # rankings at every pseudo-target (7, or 6 at 204,800, rankings each).
    for name, other in (("flan", "gigaword"), ("gigaword", "flan")):
        rs = fts_by_dataset[other]
        prior = calibration.calibrate_per_doubling(
            [r.log_pred for r in rs],
            [r.log_true for r in rs],
            [r.doublings for r in rs],
            [r.log_var for r in rs],
        )
        rep = calibration.reliability_report(fts_by_dataset[name], prior)
        assert set(rep["by_target"]) == {"1638400", "819200", "409600", "204800"}
        for target, cell in rep["by_target"].items():
            assert cell["coverage"] >= 0.9, (name, target, cell)
        # The coverage is checked by hand for one ranking: the set holds argmin of the truth.
        r = fts_by_dataset[name][0]
        conf = calibration.ranking_confidence(r, prior)
        assert conf.in_credible_set[int(np.argmin(r.log_true))]


@pytest.mark.slow
def test_calibration_harness_reproduces_what_rank_states(fts_dir, fts_by_dataset):
    # One benchmark ranking through the harness and through the shipped path (`rank` on the
    # table cut to the budget) gives the same P(best).
    r = next(x for x in fts_by_dataset["flan"] if x.target == 1_638_400 and x.budget == 12_800)
    table = read_curve_table(fts_dir / "flan.csv").up_to(12_800)
    rows = ranking.rank(table, 1_638_400)
    got = {row.model: row.p_best for row in rows}
    conf = calibration.ranking_confidence(r, confidence.ERROR_PER_DOUBLING)
    np.testing.assert_allclose([got[m] for m in table.models], conf.p_best, rtol=1e-9, atol=1e-12)
    assert math.isfinite(r.in_data) and r.dof == 29


def test_ranking_rows_carry_p_best_for_lensllm(fts_dir):
    table = read_curve_table(fts_dir / "gigaword.csv")
    rows = ranking.rank(table, 6_553_600, ["LensLLM", "AtS"])
    lens = [r for r in rows if r.method == "LensLLM"]
    by_model = {r.model: r for r in lens}
    scores = np.array([by_model[m].score for m in table.models])
    conf = confidence.assess(table, 6_553_600, scores)
    np.testing.assert_allclose([by_model[m].p_best for m in table.models], conf.p_best, rtol=1e-12)
    # Independent check of the stated P(best): Monte Carlo over the model's own errors.
    rng = np.random.default_rng(3)
    draws = np.log(scores) + conf.sigmas * rng.standard_normal((200_000, scores.size))
    mc = np.bincount(np.argmin(draws, axis=1), minlength=scores.size) / draws.shape[0]
    np.testing.assert_allclose(conf.p_best, mc, atol=4e-3)
    # c: the benchmark prior, raised only by the table's own backtests; per-candidate widths.
    assert conf.per_doubling >= confidence.ERROR_PER_DOUBLING
    assert conf.per_doubling == pytest.approx(
        confidence.task_per_doubling(confidence.ERROR_PER_DOUBLING, conf.in_data_per_doubling, 29)
    )
    assert np.all(conf.sigmas > conf.sigma) and np.ptp(conf.sigmas) > 0
    assert all(math.isnan(r.p_best) for r in rows if r.method == "AtS")
    text = ranking.credible_set_text(lens)
    assert text.endswith("hold the best with probability >= 0.9") and lens[0].model in text
    assert ",p_best\n" in ranking.rows_to_csv(rows).splitlines(keepends=True)[0]


def test_task_scale_is_the_conjugate_update_floored_at_the_prior():
    c0, nu0 = 0.02, confidence.PRIOR_DOF
    # A larger in-data scale raises c: (ν₀ c₀² + n ĉ²) / (ν₀ + n) by hand.
    assert confidence.task_per_doubling(c0, 0.04, 8) == pytest.approx(
        math.sqrt((nu0 * 0.0004 + 8 * 0.0016) / (nu0 + 8)), rel=1e-12
    )
    # A smaller one, or none, leaves the prior (never surer than the benchmark).
    assert confidence.task_per_doubling(c0, 0.005, 29) == c0
    assert confidence.task_per_doubling(c0, math.nan, 0) == c0
    # Few candidates weigh little: 2 dof of ĉ against ν₀.
    assert confidence.task_per_doubling(c0, 0.04, 1) < confidence.task_per_doubling(c0, 0.04, 29)


def test_in_data_scale_reads_only_the_visible_sizes_and_tracks_a_harder_task(fts_dir):
    import dataclasses

    table = read_curve_table(fts_dir / "gigaword.csv").up_to(51_200)
    c_hat, dof = confidence.in_data_per_doubling(table, 25_600)
    # Changing a loss above the budget changes nothing.
    changed = table.losses.copy()
    changed[:, -1] *= 1.5
    again = confidence.in_data_per_doubling(dataclasses.replace(table, losses=changed), 25_600)
    assert again == (c_hat, dof) and dof == table.num_models - 1
    # L -> L²: every log-loss error doubles, and so (about) does the backtests' scale.
    harder = dataclasses.replace(table, losses=table.losses**2, zero_shot=table.zero_shot**2)
    ratio = confidence.in_data_per_doubling(harder, 25_600)[0] / c_hat
    assert 1.6 < ratio < 2.5, ratio
    # Too few visible sizes for a backtest: no estimate.
    assert math.isnan(confidence.in_data_per_doubling(table, 800)[0])


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
    # The same model with the 5 % added in quadrature to every candidate's width.
    scores = np.array([{r.model: r.score for r in plain}[m] for m in table.models])
    ref = confidence.assess(table, 6_553_600, scores)
    conf = confidence.confidence(
        scores,
        float(table.sizes[-1]),
        6_553_600,
        per_doubling=ref.per_doubling,
        measurement_sd=np.full(table.num_models, 0.05),
        log_var=ref.sigmas**2 - ref.sigma**2,
    )
    np.testing.assert_allclose(conf.sigmas, np.sqrt(ref.sigmas**2 + 0.05**2), rtol=1e-12)
    got = {r.model: r.p_best for r in wide}
    np.testing.assert_allclose([got[m] for m in table.models], conf.p_best, rtol=1e-9)
