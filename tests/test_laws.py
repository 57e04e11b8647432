"""Laws against independent references: the plain formulas in numpy, forward-mode AD for
the closed-form Jacobians, and scipy's matrix exponential for the NTK test loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lensllm_jax.core import laws

D = np.array([1e-10, 200.0, 800.0, 6400.0, 102400.0, 1638400.0])


def _naive(name, p, d):
    if name == "vanilla":
        return p["B"] / d ** p["beta"] + p["E"]
    curv = p["D_l"] if name == "rectified" else p["F"]
    return p["B"] / (curv + d ** p["beta"]) + p["E"]


@pytest.mark.parametrize("name", ["vanilla", "rectified", "lensllm"])
def test_predict_matches_plain_formula(name):
    rng = np.random.default_rng(0)
    params = {
        "B": rng.uniform(1, 100, 5),
        "beta": rng.uniform(0.05, 1.5, 5),
        "E": rng.uniform(0.01, 2, 5),
        "D_l": 10 ** rng.uniform(-2, 5, 5),
        "F": 10 ** rng.uniform(-2, 5, 5),
    }
    params = {k: params[k] for k in laws.get_law(name).param_names}
    got = laws.predict(name, params, D)
    want = np.stack([_naive(name, {k: v[i] for k, v in params.items()}, D) for i in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # scalar size -> one value per candidate; per-candidate sizes (M, S) -> (M, S)
    np.testing.assert_allclose(laws.predict(name, params, 1638400.0), want[:, -1], rtol=1e-12)
    np.testing.assert_allclose(laws.predict(name, params, np.tile(D, (5, 1))), want, rtol=1e-12)


@pytest.mark.parametrize("name", ["vanilla", "rectified"])
def test_closed_form_jacobian_matches_forward_mode(name):
    law = laws.get_law(name)
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        log_d = jnp.log(jnp.asarray(D))
        for _ in range(5):
            raw = jnp.asarray(rng.normal(0, 2, len(law.param_names)))
            y, jac = law.value_and_jac(raw, log_d, None)
            np.testing.assert_allclose(y, law.log_predict(raw, log_d, None), rtol=1e-13)
            ref = jax.jacfwd(law.log_predict)(raw, log_d, None)
            np.testing.assert_allclose(jac, ref, rtol=1e-10, atol=1e-14)


def test_log_space_stays_finite_where_naive_underflows():
    # B/D_l = e^-920 and E = e^-921 both underflow float64; their log-space sum does not.
    raw = np.array([-690.0, 0.0, -921.0, 230.0])  # log B, log β, log E, log D_l
    with jax.enable_x64(True):
        y = np.asarray(laws.log_predict("rectified", jnp.asarray(raw), jnp.asarray([1.0, 10.0])))
    assert np.exp(-920.0) == 0.0
    np.testing.assert_allclose(
        y, np.logaddexp(-921.0, -690.0 - np.logaddexp(230.0, [0.0, np.log(10.0)])), rtol=1e-14
    )


def test_ntk_law_uses_the_matrix_exponential():
    """F(t) inside `lensllm_ntk` equals ‖expm(−ηΘt) r‖² (scipy) for a random PSD Θ."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 6))
    theta = a @ a.T + 0.1 * np.eye(6)
    r = rng.normal(size=6)
    eta, t = 0.05, 3.0
    f_ref = np.sum((scipy.linalg.expm(-eta * theta * t) @ r) ** 2)
    lam, u = np.linalg.eigh(theta)
    aux = (lam[None], (u.T @ r)[None], np.array([eta]))  # numpy float64, leading M = 1
    params = {"B": 2.0, "beta": 0.4, "E": 0.3, "t": t}
    got = laws.predict("lensllm_ntk", params, D, aux=aux)
    want = 2.0 / (f_ref + D**0.4) + 0.3
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_unknown_law_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown law 'nope'; choose one of: lensllm"):
        laws.get_law("nope")


def test_zero_size_is_the_zero_shot_point_with_finite_derivatives():
    """At D = 0 the rectified law is B/F + E, and its closed-form Jacobian stays finite and
    equals the limit D -> 0 (β has no effect there)."""
    law = laws.get_law("rectified")
    raw = np.log([20.0, 0.4, 0.5, 4.0])
    with jax.enable_x64(True):
        y0, j0 = law.value_and_jac(jnp.asarray(raw), jnp.asarray([-np.inf]), None)
        _, j1 = law.value_and_jac(jnp.asarray(raw), jnp.asarray([np.log(1e-300)]), None)
        g = jax.grad(lambda r: law.log_predict(r, jnp.asarray([-np.inf]), None)[0])(
            jnp.asarray(raw)
        )
    np.testing.assert_allclose(np.exp(np.asarray(y0)), 20.0 / 4.0 + 0.5, rtol=1e-14)
    assert np.all(np.isfinite(np.asarray(j0))) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(j0), np.asarray(j1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(j0)[0], atol=1e-14)
    np.testing.assert_allclose(
        laws.predict("rectified", {"B": 20.0, "beta": 0.4, "E": 0.5, "D_l": 4.0}, 0.0), 5.5
    )


def test_batched_jacobian_and_tangent_match_finite_differences():
    """`value_and_jac` and `tangent` (level, log-log slope and their raw gradients, used by
    LensLLM's Laplace variances) against central differences of the plain formula."""
    rng = np.random.default_rng(3)
    raw = np.column_stack(
        [
            rng.uniform(0, 5, 5),  # log B
            np.log(rng.uniform(0.1, 1.5, 5)),  # log β
            rng.uniform(-3, 1, 5),  # log E
            rng.uniform(-2, 9, 5),  # log F
        ]
    )

    def log_l(r, d):  # plain float64 numpy
        b, beta, e, f = np.exp(r)
        return np.log(b / (f + d**beta) + e)

    def slope_at(r, x, hx=1e-4):
        return (log_l(r, np.exp(x + hx)) - log_l(r, np.exp(x - hx))) / (2 * hx)

    d = np.concatenate([[0.0], D[1:]])
    y, jac = laws.value_and_jac("lensllm", raw, d)
    d_top = 3200.0
    level, slope, g_level, g_slope = laws.tangent("lensllm", raw, d_top)
    h = 1e-6
    for i in range(5):
        np.testing.assert_allclose(y[i], log_l(raw[i], d), rtol=1e-12)
        np.testing.assert_allclose(level[i], log_l(raw[i], d_top), rtol=1e-12)
        x = np.log(d_top)
        fd_slope = (log_l(raw[i], np.exp(x + h)) - log_l(raw[i], np.exp(x - h))) / (2 * h)
        np.testing.assert_allclose(slope[i], fd_slope, rtol=1e-6, atol=1e-9)
        for p in range(4):
            step = np.eye(4)[p] * h
            fd = (log_l(raw[i] + step, d) - log_l(raw[i] - step, d)) / (2 * h)
            np.testing.assert_allclose(jac[i, :, p], fd, rtol=1e-6, atol=1e-9)
            # a derivative of a derivative: wider steps keep round-off (eps/h²) small
            big = np.eye(4)[p] * 1e-4
            fd_gs = (slope_at(raw[i] + big, x) - slope_at(raw[i] - big, x)) / 2e-4
            np.testing.assert_allclose(g_slope[i, p], fd_gs, rtol=1e-5, atol=1e-7)
            fd_gl = (log_l(raw[i] + step, d_top) - log_l(raw[i] - step, d_top)) / (2 * h)
            np.testing.assert_allclose(g_level[i, p], fd_gl, rtol=1e-6, atol=1e-9)
