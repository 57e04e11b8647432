"""A batched Levenberg-Marquardt solver for small least-squares problems (P = 3-4 free
parameters, S = a few dozen residuals), pure and jit/vmap-able: the engine of `fit.fit_law`.

Cost per step: one evaluation of the residuals and their Jacobian, O(S·P²) for JᵀJ and an
O(P³) unrolled Cholesky solve. Never raises: a non-finite start gives cost = +inf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["Solution", "levenberg_marquardt"]


class Solution(NamedTuple):
    """Result of `levenberg_marquardt` for one problem (batched under vmap)."""

    x: Array  # (P,) final parameters
    cost: Array  # ½ Σ r², +inf if not finite
    num_steps: Array  # iterations taken
    converged: Array  # bool


def _spd_solve(a: Array, b: Array) -> Array:
    """Solve a x = b for a small symmetric positive-definite `a` by an unrolled Cholesky.

    P is static and tiny (3-4), so this is O(P³) scalar ops that XLA fuses across a vmapped
    batch; a batched `linalg.solve` would call LAPACK once per matrix on CPU.
    """
    p = a.shape[0]
    zero = jnp.zeros((), a.dtype)
    low: list[list[Array]] = [[zero] * p for _ in range(p)]
    for i in range(p):
        for j in range(i + 1):
            s = a[i, j] - sum(low[i][k] * low[j][k] for k in range(j))
            low[i][j] = jnp.sqrt(jnp.maximum(s, 1e-300)) if i == j else s / low[j][j]
    y: list[Array] = [zero] * p
    for i in range(p):
        y[i] = (b[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x: list[Array] = [zero] * p
    for i in reversed(range(p)):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, p))) / low[i][i]
    return jnp.stack(x)


def levenberg_marquardt(
    residual_and_jac: Callable[[Array], tuple[Array, Array]],
    x0: Array,
    free: Array | None = None,
    *,
    max_steps: int = 200,
    ftol: float = 1e-9,
    gtol: float = 1e-12,
) -> Solution:
    """Minimise ½‖r(x)‖² from `x0` by Levenberg-Marquardt; pure, jit- and vmap-able.

    `residual_and_jac(x)` returns r (S,) and its Jacobian (S, P) (e.g. from
    `jax.jacfwd`, or in closed form). Step: (JᵀJ + λ·D + εI) δ = −Jᵀr with Moré's scaling
    D = running max of diag(JᵀJ), accepted when it lowers the cost; λ follows Nielsen's
    rule (λ ← λ·max(1/3, 1 − (2ρ − 1)³) for gain ratio ρ; on rejection λ ← νλ, ν ← 2ν).
    Stops when an accepted step improves the cost by less than `ftol` relatively, when
    ‖Jᵀr‖∞ < gtol, or when λ saturates (no descent direction left). Coordinates with
    ``free[i] == False`` stay at x0.

    Cost per step: one evaluation of `residual_and_jac` (at the trial point, reused as the
    next step's linearisation when accepted) and a P x P Cholesky solve. Never raises: a
    non-finite start gives cost = +inf and converged = False.
    """
    p = x0.shape[0]
    free_f = jnp.ones((p,), x0.dtype) if free is None else jnp.asarray(free, x0.dtype)

    def evaluate(x):
        r, jac = residual_and_jac(x)
        c = 0.5 * jnp.sum(r * r)
        return r, jac * free_f[None, :], jnp.where(jnp.isfinite(c), c, jnp.inf)

    def body(state):
        x, r, jac, cost, lam, nu, scale, step, _done, _conv = state
        # Elementwise products + reductions rather than dot_general: XLA:CPU fuses these
        # across the vmapped batch, where tiny batched matmuls become per-problem calls.
        g = jnp.sum(jac * r[:, None], axis=0)
        h = jnp.sum(jac[:, :, None] * jac[:, None, :], axis=0)
        scale = jnp.maximum(scale, jnp.diag(h))  # Moré: never shrink the scaling
        a = h + jnp.diag(lam * scale) + 1e-12 * (1.0 + jnp.max(scale)) * jnp.eye(p)
        delta = _spd_solve(a, -g) * free_f
        delta = jnp.where(jnp.all(jnp.isfinite(delta)), delta, jnp.zeros_like(delta))
        x_new = x + delta
        r_new, jac_new, cost_new = evaluate(x_new)
        predicted = 0.5 * jnp.sum(delta * (lam * scale * delta - g))
        gain = (cost - cost_new) / jnp.maximum(predicted, 1e-300)
        accept = (cost_new < cost) & (gain > 0)
        small_gain = accept & ((cost - cost_new) <= ftol * cost)
        converged = small_gain | (jnp.max(jnp.abs(g)) < gtol) | (lam > 1e15)
        keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        # Nielsen's damping update: shrink λ by how well the quadratic model predicted the
        # gain; on a rejected step grow it by ν and double ν.
        shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
        state = (
            keep(x_new, x),
            keep(r_new, r),
            keep(jac_new, jac),
            keep(cost_new, cost),
            jnp.where(accept, lam * shrink, lam * nu),
            jnp.where(accept, 2.0, nu * 2.0),
            scale,
            step + 1,
            converged | ~jnp.isfinite(cost),
            converged,
        )
        return state

    def cond(state):
        return (~state[8]) & (state[7] < max_steps)

    r0, jac0, cost0 = evaluate(x0)
    init = (
        x0,
        r0,
        jac0,
        cost0,
        jnp.asarray(1e-3, x0.dtype),
        jnp.asarray(2.0, x0.dtype),
        jnp.zeros((p,), x0.dtype),
        jnp.asarray(0, jnp.int32),
        ~jnp.isfinite(cost0),
        jnp.asarray(False),
    )
    x, _, _, cost, _, _, _, steps, _, conv = jax.lax.while_loop(cond, body, init)
    return Solution(x=x, cost=cost, num_steps=steps, converged=conv & jnp.isfinite(cost))
