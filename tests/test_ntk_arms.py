"""The NTK arms of issue 9 (`selection.ntk_arms`, laws `lensllm_cap` / `lensllm_ntk_steps`):

- B = C: with t free, LensLLM-NTK is the cap F <= ‖r‖² and nothing else: two very different
  spectra with one ‖r‖² give the same predictions as the spectrum-free cap law;
- D and F change when the spectrum changes at fixed ‖r‖² (and the shuffled controls differ
  from them);
- the per-point law against an independent reference: scipy's `expm` of a dense kernel,
  and the optimiser steps and learning rates of `runner.finetune`'s recipe.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lensllm_jax.core import laws
from lensllm_jax.data.curves import CurveTable
from lensllm_jax.data.spectra import (
    EXTRA_COLUMNS,
    read_spectra,
    spectra_to_csv,
    stack_spectra,
    with_spectra,
    write_spectra,
)
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.runner import finetune
from lensllm_jax.selection import lensllm, ntk_arms
from lensllm_jax.selection.registry import METHODS

SIZES = np.array([16.0, 32, 64, 128, 256, 512, 1024, 16384])
SCHEDULE = {  # batch 8, 2 epochs, >= 16 steps, warmup + cosine: τ = N/2 + 1
    "batch_size": 8.0,
    "epochs": 2.0,
    "min_steps": 16.0,
    "max_steps": 0.0,
    "time_slope": 0.5,
    "time_offset": 1.0,
}


def _spectrum(rng, n: int, r2: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A full-rank spectrum of one of two very different shapes, scaled to ‖c‖² = r2."""
    if kind == "flat":
        lam = rng.uniform(0.5, 2.0, n)
    else:  # one huge direction, the rest tiny: a different kernel altogether
        lam = np.concatenate([[rng.uniform(200, 400)], rng.uniform(1e-3, 1e-2, n - 1)])
    c = rng.normal(size=n)
    return np.sort(lam), c * np.sqrt(r2 / np.sum(c**2))


def _table(m: int, seed: int = 0, noise: float = 2e-3) -> CurveTable:
    """Curves drawn from the LENSLLM law with F inside (0, ‖r‖² = 50) and log-normal noise."""
    rng = np.random.default_rng(seed)
    b = rng.uniform(2.0, 6.0, m)
    beta = rng.uniform(0.3, 0.6, m)
    e = rng.uniform(0.6, 1.2, m)
    f = rng.uniform(2.0, 10.0, m)
    d = np.concatenate([[0.0], SIZES])
    with np.errstate(divide="ignore"):
        loss = b[:, None] / (f[:, None] + d[None, :] ** beta[:, None]) + e[:, None]
    loss *= np.exp(noise * rng.normal(size=loss.shape))
    return CurveTable(
        name="synthetic",
        models=tuple(f"m{i}" for i in range(m)),
        sizes=SIZES,
        losses=loss[:, 1:],
        zero_shot=loss[:, 0],
        n_params=np.exp(rng.uniform(np.log(1e5), np.log(1e8), m)),
        families=("x",) * m,
    )


def _with(table: CurveTable, kind: str, r2: float = 50.0, seed: int = 1) -> CurveTable:
    rng = np.random.default_rng(seed)
    spectra = {}
    extras = {}
    for i, name in enumerate(table.models):
        lam, c = _spectrum(rng, 12, r2, kind if kind != "mixed" else ("flat", "spike")[i % 2])
        spectra[name] = (lam, c, 1e-3)
        extras[name] = {"sgd_eta": 0.02, **SCHEDULE}
    return with_spectra(table, spectra, extras)


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.slow
def test_b_equals_c_whatever_the_spectrum():
    """LensLLM-NTK (t fitted) on two very different spectra with one ‖r‖² = 50 gives the
    predictions of the cap law F = ‖r‖²·u/(1+u): the eigenvalues never matter."""
    table = _table(6)
    flat, spike = _with(table, "flat"), _with(table, "spike")
    b_flat = _quiet(lensllm.lensllm_ntk, flat, 1024, 16384)
    b_spike = _quiet(lensllm.lensllm_ntk, spike, 1024, 16384)
    c = _quiet(ntk_arms.lensllm_cap, flat, 1024, 16384)
    c_spike = _quiet(ntk_arms.lensllm_cap, spike, 1024, 16384)
    assert all(s == "ok" for s in (*b_flat.status, *b_spike.status, *c.status))
    np.testing.assert_allclose(b_flat.scores, c.scores, rtol=1e-5)
    np.testing.assert_allclose(b_spike.scores, c.scores, rtol=1e-5)
    np.testing.assert_array_equal(c.scores, c_spike.scores)  # C reads only ‖r‖²
    # and the cap binds nothing here: the free law (arm A) predicts the same
    a = _quiet(ntk_arms.lensllm_law, flat, 1024, 16384)
    np.testing.assert_allclose(a.scores, c.scores, rtol=1e-5)


@pytest.mark.slow
def test_steps_arms_change_with_the_spectrum_at_fixed_r2():
    """D (F per point at the recipe's steps) and D-F0 move when only the spectrum's shape
    changes (‖r‖², η, schedule and curves identical); the derangement control differs."""
    table = _table(8)
    flat, spike = _with(table, "flat"), _with(table, "spike")
    arms = (
        ntk_arms.ntk_steps,
        ntk_arms.ntk_steps_f0,
        ntk_arms.ntk_steps_lr,
        ntk_arms.ntk_steps_rate,
    )
    for fn in arms:
        d_flat = _quiet(fn, flat, 1024, 16384).scores
        d_spike = _quiet(fn, spike, 1024, 16384).scores
        assert np.all(np.isfinite(d_flat)) and np.all(np.isfinite(d_spike))
        assert np.max(np.abs(d_flat / d_spike - 1)) > 1e-3, fn.__name__
    mixed = _with(table, "mixed")
    d = _quiet(ntk_arms.ntk_steps, mixed, 1024, 16384).scores
    e = _quiet(ntk_arms.ntk_steps_shuffled, mixed, 1024, 16384).scores
    assert np.max(np.abs(d / e - 1)) > 1e-3


@pytest.mark.slow
def test_kernel_trend_changes_with_the_spectrum_at_fixed_r2():
    """F: the kernel summaries enter the slope trend, so spectra with one ‖r‖² but other
    shapes move its predictions, and the shuffled control differs from it."""
    table = _table(12, noise=2e-2)
    rng = np.random.default_rng(5)
    spectra_a, spectra_b = {}, {}
    for name in table.models:  # one ‖r‖², per-candidate kernels of varied scale
        lam, c = _spectrum(rng, 12, 50.0, "flat")
        spectra_a[name] = (lam * rng.uniform(0.1, 10), c, 1e-3)
        spectra_b[name] = (np.sort(lam**3 * rng.uniform(0.1, 10)), c, 1e-3)
    fa = _quiet(ntk_arms.kernel_trend, with_spectra(table, spectra_a), 1024, 16384).scores
    fb = _quiet(ntk_arms.kernel_trend, with_spectra(table, spectra_b), 1024, 16384).scores
    base = _quiet(lensllm.lensllm, table, 1024, 16384).scores
    shuffled = _quiet(ntk_arms.kernel_trend_shuffled, with_spectra(table, spectra_a), 1024, 16384)
    assert np.all(np.isfinite(fa)) and np.all(np.isfinite(fb))
    assert np.max(np.abs(fa / fb - 1)) > 1e-4
    assert np.max(np.abs(fa / base - 1)) > 1e-4
    assert np.max(np.abs(fa / shuffled.scores - 1)) > 1e-4


def test_steps_law_against_expm_and_the_recipe():
    """L(D) = B/(‖expm(−ηΘτ(D)) r‖² + D^β) + E with a dense Θ (scipy expm) and τ(D) the sum
    of `finetune.learning_rates` over `finetune.num_train_steps(D)` steps, divided by lr."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5))
    theta = a @ a.T  # rank 5: two zero eigenvalues (a floor F(∞) > 0)
    r = rng.normal(size=7)
    lam, u = np.linalg.eigh(theta)
    c = u.T @ r
    eta, lr = 0.003, 3e-4
    config = finetune.FinetuneConfig(learning_rate=lr, batch_size=8, epochs=2, min_steps=16)
    d = np.array([0.0, 3, 16, 100, 129, 1000, 4096])
    ref = []
    for size in d:
        tau = 0.0
        if size > 0:
            n = finetune.num_train_steps(int(size), config)
            tau = float(np.sum(finetune.learning_rates(config, n))) / lr
        f = float(np.sum((scipy.linalg.expm(-eta * theta * tau) @ r) ** 2))
        ref.append(2.0 / (f + size**0.4) + 0.7)
    params = {"B": 2.0, "beta": 0.4, "E": 0.7, "F0": float(r @ r)}
    aux = (
        lam.clip(0),
        c,
        np.float64(eta),
        np.array([SCHEDULE[k] for k in ntk_arms.SCHEDULE_COLUMNS]),
    )
    got = laws.predict("lensllm_ntk_steps", params, d, aux=jax.tree.map(lambda x: x[None], aux))
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_rate_law_at_k_1_is_the_steps_law_with_f0_held():
    rng = np.random.default_rng(6)
    lam, c = np.sort(rng.uniform(0, 3, 5)), rng.normal(size=5)
    aux = (
        lam[None],
        c[None],
        np.array([0.05]),
        np.array([[SCHEDULE[k] for k in ntk_arms.SCHEDULE_COLUMNS]]),
    )
    d = np.array([0.0, 8, 64, 1000])
    common = {"B": np.array([3.0]), "beta": np.array([0.5]), "E": np.array([0.9])}
    rate = laws.predict("lensllm_ntk_steps_rate", {**common, "k": np.array([1.0])}, d, aux=aux)
    held = laws.predict("lensllm_ntk_steps", {**common, "F0": np.array([c @ c])}, d, aux=aux)
    np.testing.assert_allclose(rate, held, rtol=1e-12)
    faster = laws.predict("lensllm_ntk_steps_rate", {**common, "k": np.array([3.0])}, d, aux=aux)
    assert faster[0, 0] == pytest.approx(held[0, 0], rel=1e-12)  # D = 0: nothing trained
    # F sits where the rectified law's pre-learned data D_l sits: a faster decay of F
    # (a larger rate) leaves a smaller F, hence a HIGHER predicted loss at every D > 0
    assert np.all(faster[0, 1:] >= held[0, 1:]) and faster[0, 1] > held[0, 1] * 1.01


@pytest.mark.slow
def test_steps_law_closed_form_jacobian_matches_ad():
    rng = np.random.default_rng(2)
    aux = (
        jnp.asarray(np.sort(rng.uniform(0, 5, 9))),
        jnp.asarray(rng.normal(size=9)),
        jnp.float64(0.01),
        jnp.asarray([SCHEDULE[k] for k in ntk_arms.SCHEDULE_COLUMNS]),
    )
    log_d = jnp.log(jnp.array([0.0, 16, 64, 300, 5000]))
    with jax.enable_x64(True):
        for raw in (jnp.array([1.0, -0.7, -0.3, 2.0]), jnp.array([0.2, -1.5, 0.1, -1.0])):
            y, jac = laws._lensllm_ntk_steps_value_and_jac(raw, log_d, aux)
            y_ad = laws._lensllm_ntk_steps(raw, log_d, aux)
            jac_ad = jax.jacfwd(laws._lensllm_ntk_steps)(raw, log_d, aux)
            np.testing.assert_allclose(y, y_ad, rtol=1e-12)
            np.testing.assert_allclose(jac, jac_ad, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_steps_f0_with_a_null_kernel_is_the_curve_only_law():
    """λ = 0 leaves φ ≡ 1: D with F0 fitted is exactly the LENSLLM law with F fitted (A)."""
    table = _table(5)
    spectra = {m: (np.zeros(4), np.ones(4), 1e-3) for m in table.models}
    extras = {m: {"sgd_eta": 0.02, **SCHEDULE} for m in table.models}
    null = with_spectra(table, spectra, extras)
    d = _quiet(ntk_arms.ntk_steps_f0, null, 512, 16384).scores
    a = _quiet(ntk_arms.lensllm_law, null, 512, 16384).scores
    np.testing.assert_allclose(d, a, rtol=1e-6)


def test_steps_arms_need_the_schedule():
    table = _table(3)
    bare = with_spectra(table, {m: (np.ones(3), np.ones(3), 1e-3) for m in table.models})
    with pytest.raises(LensLLMInputError, match="schedule"):
        ntk_arms.ntk_steps(bare, 512, 16384)
    with pytest.raises(LensLLMInputError, match="NTK spectrum"):
        ntk_arms.lensllm_cap(table, 512, 16384)


def test_kernel_summaries_against_the_dense_kernel():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 20))
    theta, r = a @ a.T, rng.normal(size=6)
    lam, u = np.linalg.eigh(theta)
    s = ntk_arms.kernel_summaries(lam, u.T @ r)
    n = 6
    assert s["lambda_max"] == pytest.approx(np.linalg.eigvalsh(theta).max(), rel=1e-12)
    assert s["trace_per_n"] == pytest.approx(np.trace(theta) / n, rel=1e-12)
    assert s["effective_rank"] == pytest.approx(np.trace(theta) ** 2 / np.sum(theta**2), rel=1e-10)
    assert s["alignment"] == pytest.approx(r @ theta @ r / (r @ r * np.trace(theta) / n), rel=1e-10)
    assert s["residual_norm2"] == pytest.approx(r @ r, rel=1e-12)


def test_derangement_has_no_fixed_point_and_is_seeded():
    for m in (2, 3, 14):
        p = ntk_arms.derangement(m, 7)
        assert sorted(p) == list(range(m)) and not np.any(p == np.arange(m))
        np.testing.assert_array_equal(p, ntk_arms.derangement(m, 7))


def test_spectra_extras_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(4)
    spectra = {
        "a": (rng.uniform(size=3), rng.normal(size=3), 1e-4),
        "b,c": (rng.uniform(size=2), rng.normal(size=2), 3e-4),
    }
    extras = {"a": {"sgd_eta": 0.1234567891234, **SCHEDULE}, "b,c": {"sgd_eta": 1 / 3}}
    path = write_spectra(tmp_path / "s.csv", spectra, extras)
    back = read_spectra(path)
    assert back.extras == extras
    for k, (lam, c, eta) in spectra.items():
        np.testing.assert_array_equal(back[k][0], lam)
        np.testing.assert_array_equal(back[k][1], c)
        assert back[k][2] == eta
    stacked = stack_spectra(["b,c", "a", "z"], back)
    np.testing.assert_array_equal(stacked.extras["sgd_eta"], [1 / 3, 0.1234567891234, np.nan])
    assert np.isnan(stacked.extras["epochs"][0]) and stacked.extras["epochs"][1] == 2.0
    # written again from what was read: the same bytes
    assert spectra_to_csv(back) == path.read_text()


def test_spectra_without_extras_read_as_before(tmp_path):
    path = write_spectra(tmp_path / "s.csv", {"a": (np.ones(2), np.ones(2), 1e-4)})
    assert path.read_text().splitlines()[0] == "config name,eta,k,eigenvalue,projected_residual"
    back = read_spectra(path)
    assert back.extras == {} and dict(back)["a"][2] == 1e-4
    assert stack_spectra(["a"], back).extras == {}


def test_spectra_extras_errors_are_one_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(
        "config name,eta,k,eigenvalue,projected_residual,sgd_eta\n"
        "a,0.1,0,1.0,0.5,0.2\na,0.1,1,2.0,0.5,0.3\n"
    )
    with pytest.raises(LensLLMInputError, match=r"row 3, column 'sgd_eta': sgd_eta of 'a' differs"):
        read_spectra(path)
    path.write_text("config name,eta,k,eigenvalue,projected_residual,epochs\na,0.1,0,1.0,0.5,x\n")
    with pytest.raises(LensLLMInputError, match="not a finite number"):
        read_spectra(path)
    with pytest.raises(LensLLMInputError, match="unknown NTK spectra column"):
        spectra_to_csv({"a": (np.ones(1), np.ones(1), 0.1)}, {"a": {"learning": 1.0}})


def test_arms_are_registered_and_need_the_ntk():
    for name in ("LensLLM-cap", "LensLLM-NTK-steps", "LensLLM-NTK-steps-F0", "LensLLM-kernel"):
        assert METHODS[name].needs_ntk
    assert set(ntk_arms.SCHEDULE_COLUMNS) <= set(EXTRA_COLUMNS)
    # the kernel arms leave a table without the zoo's columns to LensLLM-NTK: unchanged
    table = _table(3)
    assert dataclasses.replace(table).ntk is None
