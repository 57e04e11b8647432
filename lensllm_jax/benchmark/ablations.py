"""The research knobs behind the shipped choices, kept for the benchmarks that justify them.

`fit_law_ablation` is `core.fit.fit_law` with every variant the benchmarks measured: a
Huber loss, a β shared across candidates (profiled on a grid), Gaussian priors on the
log-parameters (MAP), the two-phase multi-start's budget, and another solver
(optimistix's LevenbergMarquardt, ``solver="optimistix"``; needs the dev extra).
`lensllm_variant` is LensLLM with its choices exposed (`selection._fusion.fused_predict`).
None of this is used by `lensllm select` or `lensllm run`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.core._lm import Solution, levenberg_marquardt
from lensllm_jax.core.fit import FitResult, _fit
from lensllm_jax.core.laws import Law
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection._fusion import fused_predict as lensllm_variant

__all__ = ["SOLVERS", "fit_law_ablation", "lensllm_variant", "optimistix_lm"]


def optimistix_lm(residual_and_jac, x0, free=None, *, max_steps=200) -> Solution:
    """The same problem through optimistix.LevenbergMarquardt (for measurement)."""
    import optimistix as optx

    def residual_fn(x):
        return residual_and_jac(x)[0]

    free_b = jnp.ones(x0.shape, bool) if free is None else jnp.asarray(free, bool)

    def fn(x, args):
        return residual_fn(jnp.where(free_b, x, x0))

    sol = optx.least_squares(
        fn,
        optx.LevenbergMarquardt(rtol=1e-10, atol=1e-12),
        x0,
        max_steps=max_steps,
        throw=False,
    )
    x = jnp.where(free_b, sol.value, x0)
    r = residual_fn(x)
    cost = 0.5 * jnp.sum(r * r)
    cost = jnp.where(jnp.isfinite(cost), cost, jnp.inf)
    ok = sol.result == optx.RESULTS.successful
    return Solution(x=x, cost=cost, num_steps=sol.stats["num_steps"], converged=ok)


SOLVERS: dict[str, Callable[..., Solution]] = {
    "lm": levenberg_marquardt,
    "optimistix": optimistix_lm,
}


def fit_law_ablation(
    law: str | Law,
    d: Any,
    loss_values: Any,
    mask: Any = None,
    *,
    num_starts: int = 16,
    seed: int = 0,
    key: Any = None,
    fixed: Mapping[str, Any] | None = None,
    shared: Sequence[str] = (),
    groups: Any = None,
    aux: Any = None,
    loss: str = "mse",
    huber_delta: float = 0.01,
    solver: str = "lm",
    max_steps: int = 200,
    explore_steps: int = 20,
    num_polish: int = 1,
    beta_grid: Sequence[float] | None = None,
    prior: Mapping[str, tuple[Any, Any]] | None = None,
    prior_noise_sd: float = 0.01,
) -> FitResult:
    """`core.fit.fit_law` with the research knobs (same result type, same statuses).

    Args (beyond `fit_law`'s):
      shared: ``("beta",)`` fits one β per group of candidates (a task's learning
        difficulty), by profiling: each candidate is fitted with β fixed on a grid, the
        group's total objective picks β, and a finer grid around it refines it.
      groups: (M,) integer group labels for `shared` (default: one group).
      loss: "mse" or "huber" (on log-loss residuals, threshold `huber_delta`).
      solver: "lm" (ours) or "optimistix".
      explore_steps, num_polish: every start first takes `explore_steps` LM steps; the
        `num_polish` best per candidate then run up to `max_steps`.
      beta_grid: the coarse β grid for `shared` (default 48 values log-spaced in [0.005, 5]).
      prior: Gaussian priors on log-parameters, ``{name: (center, tau)}`` (natural center,
        std of log(param); scalars or (M,) each): the fit becomes the MAP estimate under
        log-loss noise of std `prior_noise_sd`, i.e. extra residuals
        (σ/τ)·(log θ − log center). `loss` then includes the prior term; `rmse` does not.
    """
    if solver not in SOLVERS:
        raise LensLLMInputError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    unknown = set(shared) - {"beta"}
    if unknown:
        raise LensLLMInputError(
            f"only 'beta' can be shared across candidates, got {sorted(unknown)}"
        )
    return _fit(
        law,
        d,
        loss_values,
        mask=mask,
        aux=aux,
        fixed=fixed,
        num_starts=num_starts,
        seed=seed,
        key=key,
        max_steps=max_steps,
        explore_steps=explore_steps,
        num_polish=num_polish,
        loss=loss,
        huber_delta=huber_delta,
        solver=SOLVERS[solver],
        prior=prior,
        prior_noise_sd=prior_noise_sd,
        shared=tuple(shared),
        groups=groups,
        solve_rows=functools.partial(_profile_beta, beta_grid=beta_grid) if shared else None,
    )


def _profile_beta(
    run, law: Law, fixed_raw, log_d, log_l, mask, aux, prior, groups, *, beta_grid=None
):
    """Shared-β fit by profiling: fit everything else with β fixed on a grid, pick the β
    that minimises each group's total objective, then refine on a finer grid around it.
    Every grid point of every candidate is one more row of a single batched solve."""
    m, p = fixed_raw.shape
    ib = law.param_names.index("beta")
    grp = np.zeros(m, np.int64) if groups is None else np.asarray(groups)
    if grp.shape != (m,):
        raise ValueError(f"groups must have shape ({m},), got {grp.shape}")
    labels, grp_idx = np.unique(grp, return_inverse=True)
    coarse = np.log(np.asarray(beta_grid if beta_grid is not None else np.geomspace(0.005, 5, 48)))

    def at_betas(log_betas):  # (G, M) β per grid point and candidate
        g = log_betas.shape[0]
        held = np.repeat(fixed_raw[None], g, axis=0)  # (G, M, P)
        held[..., ib] = log_betas
        rep = lambda a: np.concatenate([a] * g, axis=0)  # noqa: E731
        aux_g = None if aux is None else jax.tree.map(lambda a: np.concatenate([a] * g), aux)
        prior_g = None if prior is None else tuple(rep(a) for a in prior)
        x, cost, conv, resid = run(
            held.reshape(g * m, p), rep(log_d), rep(log_l), rep(mask), aux_g, prior_g
        )
        return x.reshape(g, m, p), cost.reshape(g, m), conv.reshape(g, m), resid.reshape(g, m, -1)

    def group_totals(cost):  # (G, M) -> (G, groups); a curve unfittable everywhere is ignored
        fit_somewhere = np.isfinite(cost).any(axis=0)
        c = np.where(np.isfinite(cost), cost, np.where(fit_somewhere, np.inf, 0.0))
        out = np.zeros((cost.shape[0], len(labels)))
        np.add.at(out.T, grp_idx, c.T)
        return out

    _, cost, _, _ = at_betas(np.repeat(coarse[:, None], m, axis=1))
    best = np.argmin(group_totals(cost), axis=0)  # (groups,)
    lo = coarse[np.maximum(best - 1, 0)]
    hi = coarse[np.minimum(best + 1, len(coarse) - 1)]
    fine = lo[None, :] + (hi - lo)[None, :] * np.linspace(0.0, 1.0, 17)[:, None]  # (17, groups)
    xf, costf, convf, residf = at_betas(fine[:, grp_idx])
    bestf = np.argmin(group_totals(costf), axis=0)[grp_idx]  # per candidate
    rows = np.arange(m)
    return xf[bestf, rows], costf[bestf, rows], convf[bestf, rows], residf[bestf, rows]
