"""Scaling laws for fine-tuning loss as pure functions of (params, D), evaluated in log space.

Every law is written over *raw* parameters, the logarithms of its natural (positive)
parameters, so positivity holds by construction and the optimiser works on an
unconstrained vector. The log loss is assembled with `logaddexp`, which keeps it exact
when one term underflows (D = 1e-10 for the zero-shot point, tiny E, huge D_l):

  vanilla    L(D) = B / D^β + E                  log L = lae(e, b − β log D)
  rectified  L(D) = B / (D_l + D^β) + E          log L = lae(e, b − lae(d_l, β log D))
  lensllm    L(D) = B / (F + D^β) + E            the rectified form with F in place of D_l;
                                                 F is fitted, held fixed per candidate, or
                                                 computed from NTK features (`lensllm_ntk`)
  lensllm_ntk L(D) = B / (F(t) + D^β) + E,  F(t) = Σ_k e^{−2ηλ_k t} (u_kᵀ r)²
                                                 (the NTK test loss ‖exp(−ηΘt) r‖², fitted t)
  lensllm_cap L(D) = B / (F + D^β) + E,  F = ‖r‖²·u/(1+u) ∈ (0, ‖r‖²): the cap alone, which is
                                                 what `lensllm_ntk` reduces to (no spectrum)
  lensllm_ntk_steps
              L(D) = B / (F0·φ(D) + D^β) + E,  φ(D) = Σ_k e^{−2ηλ_k τ(D)} ĉ_k²,  ĉ = c/‖c‖,
                                                 τ(D) the schedule-weighted optimiser steps
                                                 actually taken at D (`_steps_time`), η the
                                                 SGD-equivalent rate: F per point, the spectrum
                                                 sets its decay along the curve; F0 = ‖r‖² held
                                                 (the paper's mode) or fitted (units-free)
  lensllm_ntk_steps_rate
              the same with F0 = ‖r‖² and η scaled by a fitted k: F(D) = Σ_k e^{−2kηλ_k τ(D)} c_k²

(lae = logaddexp; lower-case letters are the logs of the capitals.) The laws with a
curvature term accept D = 0 exactly (log D = −inf): there L = B/F + E, the zero-shot loss,
which is how LENSLLM's law ties the curve to the untuned model. Each evaluation costs
O(S) for S sizes (O(S·N) for `lensllm_ntk` with N kernel eigenvalues, `lensllm_ntk_steps`
likewise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "LAWS",
    "Law",
    "get_law",
    "log_predict",
    "predict",
    "raw_from_params",
    "tangent",
    "value_and_jac",
]


class Law(NamedTuple):
    """A scaling law over raw (log) parameters.

    Attributes:
      name: registry key.
      param_names: natural parameter names; raw parameter i is log(param_names[i]).
      log_predict: `(raw (P,), log_d (S,), aux) -> log L (S,)`. `aux` carries per-candidate
        side data (NTK features for `lensllm_ntk`, else None).
      curvature_name: the parameter that plays the role of D_l / F (None for vanilla).
      value_and_jac: optional `(raw, log_d, aux) -> (log L (S,), d log L / d raw (S, P))`
        in closed form; the fitter falls back to `jax.jacfwd` when it is None. The closed
        forms share one exp per `logaddexp` between value and derivative, which makes a
        fitting step about 5x cheaper than forward-mode AD on CPU.
      start_curvature: optional `(log_f_start (M, K), log_d (M, S), mask, aux) -> raw (M, K)`,
        the multi-start value of the curvature parameter given the fitter's default draw
        log F = β·log D* (a crossover size D*); None keeps that draw (F, D_l, F0).
    """

    name: str
    param_names: tuple[str, ...]
    log_predict: Callable[[Array, Array, Any], Array]
    curvature_name: str | None
    value_and_jac: Callable[[Array, Array, Any], tuple[Array, Array]] | None = None
    start_curvature: Callable[..., Array] | None = None


def _beta_log_d(log_beta: Array, log_d: Array) -> Array:
    """β·log D, with D = 0 (log D = −inf) giving −inf and a zero derivative in β (the
    double `where` keeps the unused branch's inf·0 out of the gradient)."""
    finite = jnp.isfinite(log_d)
    return jnp.where(finite, jnp.exp(log_beta) * jnp.where(finite, log_d, 0.0), -jnp.inf)


def _vanilla(raw: Array, log_d: Array, aux: Any = None) -> Array:
    log_b, log_beta, log_e = raw[0], raw[1], raw[2]
    return jnp.logaddexp(log_e, log_b - jnp.exp(log_beta) * log_d)


def _rectified(raw: Array, log_d: Array, aux: Any = None) -> Array:
    log_b, log_beta, log_e, log_f = raw[0], raw[1], raw[2], raw[3]
    log_denominator = jnp.logaddexp(log_f, _beta_log_d(log_beta, log_d))
    return jnp.logaddexp(log_e, log_b - log_denominator)


def _lae_and_sigmoid(a: Array, b: Array) -> tuple[Array, Array]:
    """logaddexp(a, b) and σ(a − b) = ∂/∂a logaddexp(a, b), sharing one exp."""
    z = jnp.exp(-jnp.abs(a - b))
    value = jnp.maximum(a, b) + jnp.log1p(z)
    sig = jnp.where(a >= b, 1.0, z) / (1.0 + z)
    return value, sig


def _vanilla_value_and_jac(raw: Array, log_d: Array, aux: Any = None):
    log_b, log_beta, log_e = raw[0], raw[1], raw[2]
    u = jnp.exp(log_beta) * log_d
    y, s_e = _lae_and_sigmoid(log_e, log_b - u)  # s_e = ∂y/∂e
    s = 1.0 - s_e
    return y, jnp.stack([s, -s * u, s_e], axis=-1)


def _rectified_value_and_jac(raw: Array, log_d: Array, aux: Any = None):
    log_b, log_beta, log_e, log_f = raw[0], raw[1], raw[2], raw[3]
    u = _beta_log_d(log_beta, log_d)
    a, q = _lae_and_sigmoid(log_f, u)  # q = ∂a/∂f, 1 − q = ∂a/∂u
    y, s_e = _lae_and_sigmoid(log_e, log_b - a)
    s = 1.0 - s_e  # ∂y/∂b
    du = jnp.where(jnp.isfinite(u), (1.0 - q) * u, 0.0)  # D = 0: a = f exactly, no β term
    return y, jnp.stack([s, -s * du, s_e, -s * q], axis=-1)


def _ntk_log_f(log_t: Array, aux: Any) -> Array:
    """log F(t) = log Σ_k exp(−2ηλ_k t) c_k², computed as a log-sum-exp (no underflow)."""
    eigenvalues, projected_residual, eta = aux
    log_terms = -2.0 * eta * eigenvalues * jnp.exp(log_t) + jnp.log(projected_residual**2 + 1e-300)
    return jnp.log(jnp.sum(jnp.exp(log_terms - jnp.max(log_terms)))) + jnp.max(log_terms)


def _lensllm_ntk(raw: Array, log_d: Array, aux: Any) -> Array:
    log_b, log_beta, log_e, log_t = raw[0], raw[1], raw[2], raw[3]
    log_f = _ntk_log_f(log_t, aux)
    log_denominator = jnp.logaddexp(log_f, _beta_log_d(log_beta, log_d))
    return jnp.logaddexp(log_e, log_b - log_denominator)


def _steps_time(log_d: Array, schedule: Array) -> Array:
    """τ(D), the optimiser's schedule-weighted time after fine-tuning on D examples:

        N(D) = max(epochs·⌈D/B⌉, min_steps, 1) (capped at max_steps when > 0),
        τ(D) = slope·N(D) + offset = Σ_s lr_s / lr (exact for warmup + cosine/linear decay),

    and τ(0) = 0 (the zero-shot point: nothing trained). `schedule` = (B, epochs,
    min_steps, max_steps, slope, offset)."""
    batch, epochs, min_steps, max_steps, slope, offset = (schedule[i] for i in range(6))
    finite = jnp.isfinite(log_d)
    d = jnp.exp(jnp.where(finite, log_d, 0.0))
    n = jnp.maximum(jnp.maximum(epochs * jnp.ceil(d / batch * (1 - 1e-12)), min_steps), 1.0)
    n = jnp.where(max_steps > 0, jnp.minimum(n, max_steps), n)
    return jnp.where(finite, slope * n + offset, 0.0)


def _ntk_steps_log_phi(log_d: Array, aux: Any) -> Array:
    """log φ(D) = log [F(Θ, τ(D)) / F(Θ, 0)] = log Σ_k e^{−2ηλ_k τ(D)} ĉ_k², ĉ = c/‖c‖:
    the share of the probe residual the linearised dynamics leave after the steps taken at
    D (a log-sum-exp, no underflow; 0 at D = 0)."""
    eigenvalues, projected_residual, eta, schedule = aux
    tau = _steps_time(log_d, schedule)  # (S,)
    weight = projected_residual**2
    log_w = jnp.log(weight / jnp.maximum(jnp.sum(weight), 1e-300) + 1e-300)
    log_terms = -2.0 * eta * eigenvalues[None, :] * tau[:, None] + log_w[None, :]
    top = jnp.max(log_terms, axis=1, keepdims=True)
    return (jnp.log(jnp.sum(jnp.exp(log_terms - top), axis=1, keepdims=True)) + top)[:, 0]


def _lensllm_ntk_steps(raw: Array, log_d: Array, aux: Any) -> Array:
    log_b, log_beta, log_e, log_f0 = raw[0], raw[1], raw[2], raw[3]
    log_f = log_f0 + _ntk_steps_log_phi(log_d, aux)
    log_denominator = jnp.logaddexp(log_f, _beta_log_d(log_beta, log_d))
    return jnp.logaddexp(log_e, log_b - log_denominator)


def _lensllm_ntk_steps_value_and_jac(raw: Array, log_d: Array, aux: Any):
    """Closed form: the rectified law's Jacobian with log F = log F0 + log φ(D) (φ has no
    parameter, so ∂ log F/∂ log F0 = 1)."""
    log_b, log_beta, log_e, log_f0 = raw[0], raw[1], raw[2], raw[3]
    u = _beta_log_d(log_beta, log_d)
    a, q = _lae_and_sigmoid(log_f0 + _ntk_steps_log_phi(log_d, aux), u)
    y, s_e = _lae_and_sigmoid(log_e, log_b - a)
    s = 1.0 - s_e
    du = jnp.where(jnp.isfinite(u), (1.0 - q) * u, 0.0)
    return y, jnp.stack([s, -s * du, s_e, -s * q], axis=-1)


def _lensllm_ntk_steps_rate(raw: Array, log_d: Array, aux: Any) -> Array:
    """F(D) = Σ_k e^{−2kηλ_k τ(D)} c_k², F(0) = ‖r‖²: the steps law with the rate scaled by
    a fitted k (AdamW's effective rate unknown), the per-point shape kept."""
    log_b, log_beta, log_e, log_k = raw[0], raw[1], raw[2], raw[3]
    eigenvalues, projected_residual, eta, schedule = aux
    log_r2 = jnp.log(jnp.sum(projected_residual**2))
    log_phi = _ntk_steps_log_phi(
        log_d, (eigenvalues, projected_residual, eta * jnp.exp(log_k), schedule)
    )
    log_denominator = jnp.logaddexp(log_r2 + log_phi, _beta_log_d(log_beta, log_d))
    return jnp.logaddexp(log_e, log_b - log_denominator)


def _rate_start(log_f: Array, log_d: Array, mask: Array, aux: Any) -> Array:
    """log k so that 2kηλ_max·τ(D_top) spans [1e-2, 1e3] across the starts (from the default
    draw's spread), D_top the largest used size."""
    eigenvalues, _, eta, schedule = aux
    top = jnp.max(jnp.where(mask & jnp.isfinite(log_d), log_d, -jnp.inf), axis=1)  # (M,)
    tau = jax.vmap(lambda x, s: _steps_time(x[None], s)[0])(top, schedule)
    scale = 2.0 * jnp.max(eigenvalues, axis=1) * eta * jnp.maximum(tau, 1.0)
    u = jnp.clip(log_f / jnp.log(1e8), 0.0, 1.0)  # the default draw, mapped to [0, 1]
    return jnp.log(1e-2) + u * jnp.log(1e5) - jnp.log(jnp.maximum(scale, 1e-300))[:, None]


def _cap_start(log_f: Array, log_d: Array, mask: Array, aux: Any) -> Array:
    """log u with F = ‖r‖²·u/(1+u) = min(D*^β, 0.99‖r‖²) (the default draw, capped)."""
    log_r2 = jnp.log(aux)[:, None]
    share = jnp.exp(jnp.minimum(log_f - log_r2, jnp.log(0.99)))
    return jnp.log(share) - jnp.log1p(-share)


def _lensllm_cap(raw: Array, log_d: Array, aux: Any) -> Array:
    """F = ‖r‖² · u/(1 + u), u > 0: any F in (0, ‖r‖²), no spectrum (aux = ‖r‖²)."""
    log_b, log_beta, log_e, log_u = raw[0], raw[1], raw[2], raw[3]
    log_f = jnp.log(aux) - jnp.logaddexp(0.0, -log_u)
    log_denominator = jnp.logaddexp(log_f, _beta_log_d(log_beta, log_d))
    return jnp.logaddexp(log_e, log_b - log_denominator)


LAWS: dict[str, Law] = {
    "vanilla": Law("vanilla", ("B", "beta", "E"), _vanilla, None, _vanilla_value_and_jac),
    "rectified": Law(
        "rectified", ("B", "beta", "E", "D_l"), _rectified, "D_l", _rectified_value_and_jac
    ),
    "lensllm": Law("lensllm", ("B", "beta", "E", "F"), _rectified, "F", _rectified_value_and_jac),
    "lensllm_ntk": Law("lensllm_ntk", ("B", "beta", "E", "t"), _lensllm_ntk, "t"),
    "lensllm_cap": Law(
        "lensllm_cap", ("B", "beta", "E", "u"), _lensllm_cap, "u", start_curvature=_cap_start
    ),
    "lensllm_ntk_steps_rate": Law(
        "lensllm_ntk_steps_rate",
        ("B", "beta", "E", "k"),
        _lensllm_ntk_steps_rate,
        "k",
        start_curvature=_rate_start,
    ),
    "lensllm_ntk_steps": Law(
        "lensllm_ntk_steps",
        ("B", "beta", "E", "F0"),
        _lensllm_ntk_steps,
        "F0",
        _lensllm_ntk_steps_value_and_jac,
    ),
}


def get_law(law: str | Law) -> Law:
    """The `Law` named `law` (or `law` itself). Raises `LensLLMInputError` naming the known laws."""
    if isinstance(law, Law):
        return law
    try:
        return LAWS[law]
    except KeyError:
        known = ", ".join(sorted(LAWS))
        raise LensLLMInputError(f"unknown law {law!r}; choose one of: {known}") from None


def raw_from_params(law: str | Law, params: Mapping[str, Any]) -> Array:
    """Stack natural parameters into raw (log) form, shape (..., P)."""
    law = get_law(law)
    return jnp.stack([jnp.log(jnp.asarray(params[n])) for n in law.param_names], axis=-1)


def log_predict(law: str | Law, raw: Array, d: Array, aux: Any = None) -> Array:
    """log L at sizes `d` (any shape) for one candidate's raw parameters (P,)."""
    law = get_law(law)
    d = jnp.asarray(d)
    return law.log_predict(raw, jnp.log(d.reshape(-1)), aux).reshape(d.shape)


def predict(law: str | Law, params: Mapping[str, Any], d: Any, aux: Any = None) -> np.ndarray:
    """L(D) for a batch of M candidates (float64 numpy).

    Args:
      law: a law name or `Law`.
      params: natural parameters, each of shape (M,), or scalars for a single candidate.
      d: sizes: a scalar (-> (M,)), a 1-D array shared by all candidates (-> (M, S)), or
        (M, S) per candidate (-> (M, S)).
      aux: per-candidate side data with a leading M axis (`lensllm_ntk` only).

    A NaN parameter (a failed fit) gives NaN. Raises `LensLLMInputError` for a missing
    parameter, a negative or infinite one, sizes that are not numbers >= 0, or shapes that
    do not go together.
    """
    law = get_law(law)
    values, d_in = _checked(law, params, d)
    with np.errstate(divide="ignore"):  # log 0 = −inf: the zero-shot point
        raw = np.stack([np.log(v) for v in values], -1)
        single = raw.ndim == 1
        raw = np.atleast_2d(raw)
        if d_in.ndim == 2:
            d_2d = d_in
        else:
            d_2d = np.broadcast_to(d_in.reshape(1, -1), (raw.shape[0], d_in.size))
        log_d = np.log(d_2d)
    with jax.enable_x64(True):
        out = np.exp(np.asarray(_predict_batch(law.name, raw, log_d, aux)))
    if d_in.ndim == 0:
        out = out[:, 0]
    return out[0] if single else out


def _checked(law: Law, params: Mapping[str, Any], d: Any) -> tuple[list[np.ndarray], np.ndarray]:
    """`predict`'s arguments as float64 arrays, or one `LensLLMInputError` line."""
    missing = [n for n in law.param_names if n not in params]
    if missing:
        raise LensLLMInputError(
            f"law {law.name!r} needs parameter {missing[0]!r} (has {law.param_names})"
        )
    try:
        values = [np.asarray(params[n], np.float64) for n in law.param_names]
        d_in = np.asarray(d, dtype=np.float64)
    except (TypeError, ValueError):
        raise LensLLMInputError("parameters and sizes must be numbers") from None
    for n, v in zip(law.param_names, values, strict=True):
        if np.any(v < 0) or np.any(np.isinf(v)):
            raise LensLLMInputError(f"parameter {n!r} must be finite and >= 0 (NaN: a failed fit)")
    if not np.all(d_in >= 0):
        raise LensLLMInputError(f"sizes d must be numbers >= 0, got {d_in.ravel()[:4]}")
    if len({v.shape for v in values}) > 1:
        raise LensLLMInputError(f"parameters have different shapes {[v.shape for v in values]}")
    m = values[0].size if values[0].ndim else 1
    if d_in.ndim == 2 and d_in.shape[0] != m:
        raise LensLLMInputError(f"d has {d_in.shape[0]} rows for {m} candidates")
    return values, d_in


# The batched helpers below are tiny programs run a few times per selection: compiling them
# without LLVM optimisation saves most of their compile time at no noticeable run time.
_SMALL = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnames="law_name", compiler_options=_SMALL)
def _predict_batch(law_name: str, raw: Array, log_d: Array, aux: Any) -> Array:
    law = get_law(law_name)
    in_axes = (0, 0, None if aux is None else 0)
    return jax.vmap(law.log_predict, in_axes=in_axes)(raw, log_d, aux)


@functools.partial(jax.jit, static_argnames="law_name", compiler_options=_SMALL)
def _batched_value_and_jac(law_name: str, raw: Array, log_d: Array) -> tuple[Array, Array]:
    law = get_law(law_name)

    def one(r):
        if law.value_and_jac is not None:
            return law.value_and_jac(r, log_d, None)
        return law.log_predict(r, log_d, None), jax.jacfwd(law.log_predict)(r, log_d, None)

    return jax.vmap(one)(raw)


def value_and_jac(law: str | Law, raw: Any, d: Any) -> tuple[np.ndarray, np.ndarray]:
    """log L and ∂ log L/∂raw for M candidates at shared sizes `d` (S,) (D = 0 allowed
    where the law has a curvature term): (M, S) and (M, S, P), float64 numpy. Closed form
    where the law has one, forward-mode AD otherwise. Cost O(M·S·P)."""
    law = get_law(law)
    with jax.enable_x64(True), np.errstate(divide="ignore"):
        log_d = np.log(np.asarray(d, np.float64)).reshape(-1)
        s = log_d.size
        padded = np.pad(log_d, (0, -(-s // 16) * 16 - s))  # one compilation per 16 sizes
        y, jac = _batched_value_and_jac(law.name, jnp.asarray(raw, jnp.float64), padded)
        return np.asarray(y)[:, :s], np.asarray(jac)[:, :s]


def tangent(law: str | Law, raw: Any, d_top: float) -> tuple[np.ndarray, ...]:
    """The law's tangent line in (log D, log L) at D = d_top, for M candidates:

        level ℓ = log L(d_top),   slope s = d log L / d log D at d_top,

    and their gradients in the raw parameters, ∂ℓ/∂raw and ∂s/∂raw, each (M, P), all by
    forward-mode AD of `log_predict` (exact, no finite differences). Returns
    (level (M,), slope (M,), grad_level (M, P), grad_slope (M, P)). Cost O(M·P²).
    """
    law = get_law(law)
    with jax.enable_x64(True):
        x = jnp.asarray(np.log(float(d_top)), jnp.float64)
        out = _tangent_batch(law.name, np.asarray(raw, np.float64), x)
        return tuple(np.asarray(a) for a in out)


@functools.partial(jax.jit, static_argnames="law_name", compiler_options=_SMALL)
def _tangent_batch(law_name: str, raw: Array, x: Array):
    law = get_law(law_name)

    def level_and_slope(r, x):
        f = lambda t: law.log_predict(r, t[None], None)[0]  # noqa: E731
        return jax.jvp(f, (x,), (jnp.ones_like(x),))  # (ℓ, dℓ/dx): log_predict is pointwise in x

    def with_grads(r, x):
        (lvl, slp), (g_lvl, g_slp) = level_and_slope(r, x), jax.jacfwd(level_and_slope)(r, x)
        return lvl, slp, g_lvl, g_slp

    return jax.vmap(with_grads, in_axes=(0, None))(raw, x)
