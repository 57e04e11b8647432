"""The multi-start fitter: recovery of known laws, batch invariances, masks, statuses,
shared β, Huber, and scipy as an independent optimiser."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares

from lensllm_jax.benchmark import ablations
from lensllm_jax.core import fit, laws
from lensllm_jax.core.fit import FitStatus

SIZES = np.array([1e-10] + [200.0 * 2**i for i in range(14)])  # zero-shot + FTS sizes
TARGET = 1_638_400.0

floats = st.floats


def _np_rectified(x, log_d):
    """log L of the rectified law in plain float64 numpy: the independent reference."""
    return np.logaddexp(x[2], x[0] - np.logaddexp(x[3], np.exp(x[1]) * log_d))


def _rectified_params(draw_list):
    """(ratio, β, E, D*) -> natural parameters. D* = D_l^(1/β) is where D^β overtakes D_l;
    ratio sets the reducible loss at D = 200 relative to E, so every term is visible."""
    ratio, beta, e, dstar = (np.array(c) for c in zip(*draw_list, strict=True))
    d_l = dstar**beta
    return {"B": ratio * e * (d_l + 200.0**beta), "beta": beta, "E": e, "D_l": d_l}


rectified_curves = st.lists(
    st.tuples(
        floats(0.2, 5.0),  # reducible / irreducible loss at D = 200
        floats(0.1, 1.0),  # β
        floats(0.1, 3.0),  # E
        floats(1e2, 1e5),  # D*, inside the observed range
    ),
    min_size=4,
    max_size=4,  # one batch shape: one compilation for every example
)


@settings(max_examples=12, deadline=None)
@given(rectified_curves)
def test_rectified_fit_recovers_noiseless_parameters(draw_list):
    true = _rectified_params(draw_list)
    curves = laws.predict("rectified", true, SIZES)
    res = fit.fit_law("rectified", SIZES, curves)
    assert np.all(res.status == FitStatus.SUCCESS)
    assert np.all(res.rmse < 1e-6)
    for name in ("B", "beta", "E", "D_l"):
        np.testing.assert_allclose(res.params[name], true[name], rtol=2e-3, err_msg=name)
    np.testing.assert_allclose(
        laws.predict("rectified", res.params, TARGET), curves[:, -1], rtol=1e-6
    )


@settings(max_examples=10, deadline=None)
@given(
    st.lists(
        st.tuples(floats(1.0, 100.0), floats(0.1, 1.0), floats(0.1, 3.0)), min_size=4, max_size=4
    )
)
def test_vanilla_fit_recovers_noiseless_parameters(draw_list):
    b, beta, e = (np.array(c) for c in zip(*draw_list, strict=True))
    true = {"B": b, "beta": beta, "E": e}
    curves = laws.predict("vanilla", true, SIZES[1:])
    res = fit.fit_law("vanilla", SIZES[1:], curves)
    assert np.all(res.status == FitStatus.SUCCESS)
    for name in true:
        np.testing.assert_allclose(res.params[name], true[name], rtol=1e-3, err_msg=name)


def test_lensllm_with_fixed_f_recovers_the_rest():
    true = {
        "B": np.array([5.0, 40.0]),
        "beta": np.array([0.3, 0.6]),
        "E": np.array([0.5, 1.2]),
        "F": np.array([3.0, 200.0]),
    }
    curves = laws.predict("lensllm", true, SIZES)
    res = fit.fit_law("lensllm", SIZES, curves, fixed={"F": true["F"]})
    np.testing.assert_allclose(res.params["F"], true["F"], rtol=1e-14)
    for name in ("B", "beta", "E"):
        np.testing.assert_allclose(res.params[name], true[name], rtol=1e-5, err_msg=name)


def test_lensllm_ntk_recovers_the_training_time():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8))
    lam, u = np.linalg.eigh(a @ a.T / 8 + 0.05 * np.eye(8))
    c = u.T @ rng.normal(size=8) * 3
    aux = (lam[None], c[None], np.array([0.1]))
    true = {"B": 20.0, "beta": 0.5, "E": 0.8, "t": 4.0}
    curve = laws.predict("lensllm_ntk", true, SIZES, aux=aux)
    res = fit.fit_law("lensllm_ntk", SIZES, curve, aux=aux, num_starts=32)
    assert res.status[0] == FitStatus.SUCCESS
    for name, value in true.items():
        np.testing.assert_allclose(res.params[name][0], value, rtol=1e-3, err_msg=name)


def _noisy_curves(n, seed):
    rng = np.random.default_rng(seed)
    draws = [
        (rng.uniform(0.2, 5), rng.uniform(0.1, 1), rng.uniform(0.1, 3), 10 ** rng.uniform(2, 5))
        for _ in range(n)
    ]
    clean = laws.predict("rectified", _rectified_params(draws), SIZES)
    return clean * np.exp(rng.normal(0, 0.01, clean.shape))


@settings(max_examples=5, deadline=None)
@given(st.randoms(use_true_random=False))
def test_fit_does_not_depend_on_candidate_order(rnd):
    curves = _noisy_curves(9, 4)
    perm = np.array(rnd.sample(range(9), 9))
    a = fit.fit_law("rectified", SIZES, curves)
    b = fit.fit_law("rectified", SIZES, curves[perm])
    np.testing.assert_allclose(b.raw, a.raw[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(b.status, a.status[perm])


def test_batch_equals_one_by_one_and_masks_pad_ragged_curves():
    curves = _noisy_curves(5, 5)
    lengths = np.array([15, 7, 13, 8, 14])
    mask = np.arange(15)[None, :] < lengths[:, None]
    padded = np.where(mask, curves, np.nan)  # garbage beyond each curve's end
    batch = fit.fit_law("rectified", SIZES, padded, mask=mask)
    for i, n in enumerate(lengths):
        one = fit.fit_law("rectified", SIZES[:n], curves[i, :n])
        # equal up to the optimiser's stopping tolerance (padding changes summation order)
        np.testing.assert_allclose(batch.loss[i], one.loss[0], rtol=1e-9)
        np.testing.assert_allclose(batch.raw[i], one.raw[0], rtol=1e-6, atol=1e-9)
        assert batch.num_points[i] == n


def test_failures_are_statuses_not_exceptions():
    curves = _noisy_curves(3, 6)
    curves[1, 3:] = np.nan  # three usable points for four parameters
    curves[2, :] = -1.0  # nothing usable
    res = fit.fit_law("rectified", SIZES, curves)
    assert res.status.tolist() == [FitStatus.SUCCESS, FitStatus.TOO_FEW_POINTS] * 1 + [
        FitStatus.TOO_FEW_POINTS
    ]
    assert res.ok.tolist() == [True, False, False]
    assert np.isnan(res.params["B"][1:]).all() and np.isnan(res.rmse[1:]).all()


def test_shared_beta_is_recovered_per_group():
    rng = np.random.default_rng(7)
    betas = np.repeat([0.35, 0.7], 4)
    true = {
        "B": rng.uniform(2, 50, 8),
        "beta": betas,
        "E": rng.uniform(0.2, 2, 8),
        "D_l": (10 ** rng.uniform(2.5, 4.5, 8)) ** betas,
    }
    curves = laws.predict("rectified", true, SIZES)
    res = ablations.fit_law_ablation(
        "rectified", SIZES, curves, shared=("beta",), groups=np.repeat([0, 1], 4)
    )
    np.testing.assert_allclose(res.params["beta"], betas, rtol=2e-2)
    assert len(np.unique(res.params["beta"][:4])) == 1
    assert np.all(res.rmse < 5e-3)


def test_huber_resists_an_outlier():
    true = {"B": np.array([30.0]), "beta": np.array([0.5]), "E": np.array([1.0])}
    clean = laws.predict("vanilla", true, SIZES[1:])
    dirty = clean.copy()
    dirty[0, 9] *= 1.5  # one corrupted evaluation
    mse = fit.fit_law("vanilla", SIZES[1:], dirty)
    huber = ablations.fit_law_ablation("vanilla", SIZES[1:], dirty, loss="huber", huber_delta=0.01)
    err = lambda r: abs(laws.predict("vanilla", r.params, TARGET)[0] / clean[0, -1] - 1)  # noqa: E731
    assert err(huber) < 0.2 * err(mse), (err(huber), err(mse))


def test_fits_at_least_as_well_as_scipy_from_the_same_starts(fts_dir):
    from lensllm_jax.data.curves import read_curve_table

    table = read_curve_table(fts_dir / "flan.csv")
    d = np.concatenate([[1e-10], table.sizes])
    losses = np.column_stack([table.zero_shot, table.losses])
    mask = np.broadcast_to(d <= TARGET / 16, losses.shape)
    res = fit.fit_law("rectified", d, losses, mask=mask, num_starts=16)
    import jax

    with jax.enable_x64(True):
        starts = np.asarray(
            fit.initial_starts(
                "rectified",
                np.log(np.where(mask, d, 1.0)),
                np.log(losses),
                mask,
                jax.random.PRNGKey(0),
                16,
            )
        )
    for i in range(0, table.num_models, 3):
        log_d, log_l = np.log(d[mask[i]]), np.log(losses[i, mask[i]])
        best = min(
            least_squares(
                lambda x, ld=log_d, ll=log_l: _np_rectified(x, ld) - ll,
                x0,
                method="lm",
                xtol=1e-15,
                ftol=1e-15,
            ).cost
            for x0 in starts[i]
        )
        ours = 0.5 * res.loss[i] * res.num_points[i]
        assert ours <= best * (1 + 1e-6) + 1e-15, (table.models[i], ours, best)


@pytest.mark.slow
def test_optimistix_solver_reaches_the_same_optimum():
    curves = _noisy_curves(4, 8)
    ours = fit.fit_law("rectified", SIZES, curves)
    theirs = ablations.fit_law_ablation(
        "rectified", SIZES, curves, solver="optimistix", max_steps=400
    )
    np.testing.assert_allclose(theirs.loss, ours.loss, rtol=1e-4)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="same shape"):
        fit.fit_law("rectified", np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="only 'beta' can be shared"):
        ablations.fit_law_ablation("rectified", SIZES, np.ones(15), shared=("E",))
    with pytest.raises(ValueError, match="cannot fix 'F'"):
        fit.fit_law("rectified", SIZES, np.ones(15), fixed={"F": 1.0})


def test_prior_gives_the_map_estimate():
    """With a Gaussian prior on log β the fit minimises ½Σr² + ½(σ/τ)²(log β − log μ)²:
    compare with scipy on the same augmented residuals, and check a tight prior pins β."""
    curves = _noisy_curves(2, 9)
    center, tau, sd = 0.45, 0.2, 0.01
    res = ablations.fit_law_ablation(
        "rectified", SIZES, curves, prior={"beta": (center, tau)}, prior_noise_sd=sd
    )
    for i in range(2):

        def augmented(x, i=i):
            r = _np_rectified(x, np.log(SIZES)) - np.log(curves[i])
            return np.append(r, sd / tau * (x[1] - np.log(center)))

        ref = least_squares(augmented, res.raw[i] + 0.05, method="lm", xtol=1e-15, ftol=1e-15)
        assert 0.5 * res.loss[i] * res.num_points[i] <= ref.cost * (1 + 1e-8)
        np.testing.assert_allclose(res.raw[i], ref.x, rtol=1e-4, atol=1e-6)
    tight = ablations.fit_law_ablation("rectified", SIZES, curves, prior={"beta": (center, 1e-7)})
    np.testing.assert_allclose(tight.params["beta"], center, rtol=1e-5)


def test_zero_shot_point_enters_at_d_zero():
    """D = 0 is a usable point for laws with a curvature term (vanilla cannot take it)."""
    true = {
        "B": np.array([20.0]),
        "beta": np.array([0.4]),
        "E": np.array([0.5]),
        "D_l": np.array([4.0]),
    }
    d = np.concatenate([[0.0], SIZES[1:]])
    curve = laws.predict("rectified", true, d)
    res = fit.fit_law("rectified", d, curve)
    assert res.num_points[0] == 15 and res.status[0] == FitStatus.SUCCESS
    for name, value in true.items():
        np.testing.assert_allclose(res.params[name], value, rtol=1e-4, err_msg=name)
    assert fit.fit_law("vanilla", d, curve).num_points[0] == 14
