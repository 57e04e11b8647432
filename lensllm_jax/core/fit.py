"""Multi-start least-squares fitting of scaling laws, jit-compiled and vmapped over
candidates x starting points, in float64.

Objective, per candidate m with usable points S_m (mask):

    J_m(θ) = ½ Σ_{s ∈ S_m} ρ(log L̂(D_s; θ) − log L_s)

with ρ(r) = r² (``loss="mse"``) or the Huber function (``loss="huber"``, handled as a
pseudo-residual so any least-squares solver applies). θ are raw (log) parameters.

Solver: a batched Levenberg-Marquardt (Moré's diagonal scaling, Nielsen's damping update,
an unrolled P x P Cholesky) written as one `lax.while_loop` per (candidate, start) lane and
vmapped over all lanes; see `levenberg_marquardt`. Multi-start in two phases: every start
takes a few steps, the best per candidate then runs to convergence (`_solve_batch`).
Chosen over optimistix's LevenbergMarquardt and a scipy loop by `benchmarks/bench_fit.py`
(speed and optimum quality; figures in README). The research knobs (Huber loss, a shared β,
Gaussian priors, another solver) are in `lensllm_jax.benchmark.ablations`.

Cost: one LM step is one evaluation of the residuals and their Jacobian (closed form for
the vanilla/rectified/lensllm laws, forward-mode AD otherwise), O(S·P²), plus an O(P³)
solve; a fit is (candidates x starts x steps) of those, all inside one XLA program.

A fit that fails is a status (`FitStatus`), never an exception inside a batch.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from lensllm_jax.core._lm import Solution, levenberg_marquardt
from lensllm_jax.core.laws import Law, get_law
from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "FitResult",
    "FitStatus",
    "Solution",
    "fit_law",
    "initial_starts",
    "levenberg_marquardt",
]

Solver = Callable[..., Solution]  # (residual_and_jac, x0, free, *, max_steps) -> Solution


class FitStatus(enum.IntEnum):
    """Outcome of one candidate's fit. `SUCCESS` and `MAX_STEPS` carry usable parameters."""

    SUCCESS = 0
    MAX_STEPS = 1  # the best start ran out of steps before converging; still the best found
    NONFINITE = 2  # no start reached a finite objective
    TOO_FEW_POINTS = 3  # fewer usable points than free parameters


class FitResult(NamedTuple):
    """Best-of-starts fit per candidate (float64 numpy).

    Attributes:
      params: natural parameters by name, each (M,).
      raw: (M, P) raw (log) parameters.
      loss: (M,) objective at the optimum, mean of ρ(r) over the candidate's points.
      rmse: (M,) root mean squared residual of log L (in-sample).
      status: (M,) `FitStatus` values.
      num_points: (M,) usable points per candidate.
      law: the law's name.
    """

    params: dict[str, np.ndarray]
    raw: np.ndarray
    loss: np.ndarray
    rmse: np.ndarray
    status: np.ndarray
    num_points: np.ndarray
    law: str

    @property
    def ok(self) -> np.ndarray:
        """(M,) bool: the parameters are usable (converged, or the best within max_steps)."""
        return self.status <= FitStatus.MAX_STEPS


# ----------------------------------------------------------------------------- objective


def _residuals_and_jac(
    law: Law, raw, log_d, log_l, mask, aux, loss: str, delta: float | Array, prior=None
):
    """Masked (pseudo-)residuals of log L and their Jacobian, (S,) and (S, P); with a
    Gaussian prior (mean μ, weight w = σ_noise/τ per raw parameter) P more residuals
    w·(θ − μ) follow, so the least-squares optimum is the MAP estimate."""
    if law.value_and_jac is not None:
        y, jac = law.value_and_jac(raw, log_d, aux)
    else:
        y = law.log_predict(raw, log_d, aux)
        jac = jax.jacfwd(law.log_predict)(raw, log_d, aux)
    r = y - log_l
    if loss == "huber":
        a = jnp.abs(r)
        inside = a <= delta
        root = jnp.sqrt(jnp.maximum(2 * delta * a - delta**2, delta**2))
        jac = jac * jnp.where(inside, 1.0, delta / root)[:, None]
        r = jnp.where(inside, r, jnp.sign(r) * root)
    r, jac = jnp.where(mask, r, 0.0), jnp.where(mask[:, None], jac, 0.0)
    if prior is not None:
        mean, weight = prior
        r = jnp.concatenate([r, weight * (raw - mean)])
        jac = jnp.concatenate([jac, jnp.diag(weight)])
    return r, jac


@functools.partial(
    jax.jit,
    static_argnames=(
        "law_name",
        "loss",
        "solver",
        "max_steps",
        "explore_steps",
        "num_polish",
    ),
    # LLVM at -O1 instead of -O2: measured 20 % less compile time for the same run time.
    compiler_options={"xla_backend_optimization_level": 1},
)
def _solve_batch(
    law_name: str,
    x0: Array,  # (M, K, P) starting points (`initial_starts`)
    free: Array,  # (P,) bool
    log_d: Array,  # (M, S)
    log_l: Array,  # (M, S)
    mask: Array,  # (M, S)
    aux: Any,  # pytree with leading M axis, or None
    prior: Any,  # (mean (M, P), weight (M, P)) or None
    loss: str,
    delta: Array,
    solver: Solver,
    max_steps: int,
    explore_steps: int,
    num_polish: int,
):
    """Two-phase multi-start: every start takes `explore_steps` LM steps, then the
    `num_polish` best per candidate run to convergence (`max_steps`). Most starts fall
    into the same few basins within a few steps, so this spends the step budget where it
    matters: K·explore + polish·max lane-steps instead of K·max."""
    law = get_law(law_name)
    solve = solver
    aux_axis = None if aux is None else 0
    num_starts = x0.shape[1]

    m = log_d.shape[0]

    def run(x_start, ld, ll, mk, ax, pr, steps):
        fn = functools.partial(
            _residuals_and_jac,
            law,
            log_d=ld,
            log_l=ll,
            mask=mk,
            aux=ax,
            loss=loss,
            delta=delta,
            prior=pr,
        )
        return solve(fn, x_start, free, max_steps=steps)

    def batch(x, steps):  # x: (M, k, P). One flat vmap over M·k lanes traces faster.
        k = x.shape[1]
        lane = jnp.repeat(jnp.arange(m), k)
        ax = None if aux is None else jax.tree.map(lambda a: a[lane], aux)
        pr = None if prior is None else jax.tree.map(lambda a: a[lane], prior)
        flat = jax.vmap(run, in_axes=(0, 0, 0, 0, aux_axis, None if prior is None else 0, None))(
            x.reshape(m * k, -1), log_d[lane], log_l[lane], mask[lane], ax, pr, steps
        )
        return jax.tree.map(lambda a: a.reshape((m, k, *a.shape[1:])), flat)

    take = jax.vmap(lambda a, i: a[i])
    if explore_steps < max_steps and num_polish < num_starts:
        explored = batch(x0, explore_steps)
        order = jnp.argsort(explored.cost, axis=1)[:, :num_polish]
        sol = batch(take(explored.x, order), max_steps)
    else:
        sol = batch(x0, max_steps)
    best = jnp.argmin(sol.cost, axis=1)
    x = take(sol.x, best)
    plain = jax.vmap(
        lambda xx, ld, ll, mk, ax: _residuals_and_jac(law, xx, ld, ll, mk, ax, "mse", 0.0)[0],
        in_axes=(0, 0, 0, 0, aux_axis),
    )(x, log_d, log_l, mask, aux)
    return x, take(sol.cost, best), take(sol.converged, best), plain


# ----------------------------------------------------------------------------- starts


def initial_starts(
    law: str | Law,
    log_d: Array,
    log_l: Array,
    mask: Array,
    key: Array,
    num_starts: int,
    aux: Any = None,
    fixed_raw: Array | None = None,
) -> Array:
    """Data-driven random starting points, (M, K, P) raw parameters.

    The normalised draws are shared by all candidates (so a fit never depends on batch
    order). E is a random fraction of the smallest observed loss, β log-uniform in [0.02, 2],
    the curvature term (D_l or F) equals D*^β for a crossover size D* log-uniform in
    [1, 1e8] (so it is sampled relative to the data, whatever β is), and B is then set in
    closed form so the curve passes through the data on average:
    log B = mean_s[log(L_s − E) + log(F + D_s^β)]. Start 0 is a fixed central point.
    `fixed_raw` (M, P), NaN where free, replaces draws by held values before B is solved.
    """
    law = get_law(law)
    m = log_d.shape[0]
    p = len(law.param_names)
    fixed_raw = jnp.full((m, p), jnp.nan) if fixed_raw is None else fixed_raw
    k_e, k_b, k_c = jax.random.split(key, 3)
    # The same normalised starts for every candidate: a candidate's fit then depends on
    # its own curve alone, not on its position in the batch.
    shape = (1, num_starts)
    u_e = jax.random.uniform(k_e, shape, minval=0.02, maxval=0.98).at[:, 0].set(0.5)
    log_beta = jax.random.uniform(k_b, shape, minval=jnp.log(0.02), maxval=jnp.log(2.0))
    log_beta = log_beta.at[:, 0].set(jnp.log(0.3))
    log_dstar = jax.random.uniform(k_c, shape, minval=0.0, maxval=jnp.log(1e8))
    log_dstar = log_dstar.at[:, 0].set(jnp.log(1e3))

    def held(i, drawn):  # (M, K): the fixed value of parameter i where there is one
        return jnp.where(jnp.isnan(fixed_raw[:, i : i + 1]), drawn, fixed_raw[:, i : i + 1])

    l_min = jnp.min(jnp.where(mask, jnp.exp(log_l), jnp.inf), axis=1)  # (M,)
    log_e = held(2, jnp.log(u_e * l_min[:, None]))
    log_beta = held(1, jnp.broadcast_to(log_beta, (m, num_starts)))
    log_dstar = jnp.broadcast_to(log_dstar, (m, num_starts))
    if law.curvature_name is None:
        log_curv = None
    elif law.name == "lensllm_ntk":
        # log t: ηλ_max·t log-uniform in [1e-3, 1e5], from "nothing learned" to "all learned".
        eta_lmax = jnp.max(aux[0], axis=1) * jnp.broadcast_to(jnp.asarray(aux[2]), (m,))
        log_curv = held(3, jnp.log(1e-3 / eta_lmax)[:, None] + log_dstar)
    elif law.start_curvature is not None:  # the law maps the default draw F = D*^β itself
        log_curv = held(3, law.start_curvature(jnp.exp(log_beta) * log_dstar, log_d, mask, aux))
    else:
        log_curv = held(3, jnp.exp(log_beta) * log_dstar)  # F = D*^β
    # log of 1/(F + D^β): the law itself with B = 1 and E negligible.
    unit = [jnp.zeros_like(log_e), log_beta, jnp.full_like(log_e, -700.0)]
    unit_raw = jnp.stack(unit + ([] if log_curv is None else [log_curv]), axis=-1)
    per_start = jax.vmap(law.log_predict, in_axes=(0, None, None))
    log_inv_den = jax.vmap(per_start, in_axes=(0, 0, None if aux is None else 0))(
        unit_raw, log_d, aux
    )
    gap = jnp.exp(log_l)[:, None, :] - jnp.exp(log_e)[..., None]
    log_gap = jnp.log(jnp.where(mask[:, None, :], jnp.maximum(gap, 1e-300), 1.0))
    n = jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None]
    log_b = jnp.sum(jnp.where(mask[:, None, :], log_gap - log_inv_den, 0.0), axis=-1) / n
    log_b = held(0, log_b)
    cols = [log_b, log_beta, log_e] + ([] if log_curv is None else [log_curv])
    return jnp.stack(cols, axis=-1)


# ----------------------------------------------------------------------------- front door


def _as_2d(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise LensLLMInputError(f"{name} must have shape (M, S) or (S,), got {arr.shape}")
    return arr


def fit_law(
    law: str | Law,
    d: Any,
    loss_values: Any,
    *,
    mask: Any = None,
    aux: Any = None,
    fixed: Mapping[str, Any] | None = None,
    num_starts: int = 16,
    seed: int = 0,
    key: Array | None = None,
    max_steps: int = 200,
) -> FitResult:
    """Fit `law` to M loss curves at once; the best of `num_starts` starts per candidate.

    Objective per candidate: ½ Σ_s (log L̂(D_s; θ) − log L_s)² over its usable points.

    Args:
      law: "vanilla", "rectified", "lensllm", "lensllm_ntk" or a `Law`.
      d: (M, S) or (S,) sizes D (> 0 where used; laws with a curvature term also take the
        zero-shot point at D = 0, where L = B/F + E; Lin et al. enter it as D = 1e-10).
      loss_values: (M, S) or (S,) losses L (> 0 where used).
      mask: (M, S) bool, True where a point is used; None uses every finite point.
        Curves with different numbers of points share one batch through the mask.
      aux: per-candidate side data with a leading M axis (`lensllm_ntk`: (eigenvalues,
        projected_residual, eta)).
      fixed: natural values for parameters to hold fixed, scalar or (M,) each
        (e.g. ``{"F": f_ntk}`` for LENSLLM with F from the NTK).
      num_starts: random starts per candidate (`initial_starts`), seeded by `seed`/`key`.
      max_steps: LM iterations for the polished start.

    Returns:
      `FitResult`. Never raises for a curve that cannot be fitted: its status says so.

    Cost: M x num_starts LM problems of S points, each step O(S·P²) (see the module).
    """
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
    )


RowSolver = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _fit(
    law: str | Law,
    d: Any,
    loss_values: Any,
    *,
    mask: Any = None,
    aux: Any = None,
    fixed: Mapping[str, Any] | None = None,
    num_starts: int = 16,
    seed: int = 0,
    key: Array | None = None,
    max_steps: int = 200,
    explore_steps: int = 20,
    num_polish: int = 1,
    loss: str = "mse",
    huber_delta: float = 0.01,
    solver: Solver = levenberg_marquardt,
    prior: Mapping[str, tuple[Any, Any]] | None = None,
    prior_noise_sd: float = 0.01,
    shared: Sequence[str] = (),
    groups: Any = None,
    solve_rows: RowSolver | None = None,
    solve_batch: Callable[..., Any] | None = None,
) -> FitResult:
    """`fit_law` with every knob: the public function's engine, and the research variants'
    (`benchmark.ablations.fit_law_ablation` documents the extra arguments). `shared` names
    parameters held out of the free set and chosen by `solve_rows(run, law, fixed_raw,
    log_d, log_l, mask, aux, prior, groups)` (a profile over a grid, say). `solve_batch`
    replaces the compiled multi-start solve (`_solve_batch`, same arguments): the hook
    through which `lensllm_jax.parallel.fit_law` spreads the candidates over devices."""
    law = get_law(law)
    d2 = _as_2d("d", d)
    l2 = _as_2d("loss_values", loss_values)
    if d2.shape[0] == 1 and l2.shape[0] > 1:
        d2 = np.broadcast_to(d2, l2.shape)
    if d2.shape != l2.shape:
        raise LensLLMInputError(
            f"d and loss_values must have the same shape, got {d2.shape}, {l2.shape}"
        )
    m, _ = l2.shape
    # D = 0 is usable where the law has a curvature term (L(0) = B/F + E), not for vanilla.
    d_ok = (d2 >= 0) if law.curvature_name is not None else (d2 > 0)
    usable = np.isfinite(d2) & np.isfinite(l2) & d_ok & (l2 > 0)
    mk = usable if mask is None else (np.broadcast_to(np.asarray(mask, bool), l2.shape) & usable)
    if loss not in ("mse", "huber"):
        raise LensLLMInputError(f"loss must be 'mse' or 'huber', got {loss!r}")
    if shared and solve_rows is None:
        raise LensLLMInputError(f"shared parameters {list(shared)} need a solve_rows strategy")
    fixed = dict(fixed or {})
    for name in fixed:
        if name not in law.param_names:
            raise LensLLMInputError(f"cannot fix {name!r}: law {law.name!r} has {law.param_names}")
    both = set(shared) & set(fixed)
    if both:
        raise LensLLMInputError(f"{sorted(both)} cannot be both shared and fixed")

    # Sanitise unused entries so no NaN leaks into gradients through masked lanes.
    with np.errstate(divide="ignore"):  # log 0 = −inf is meant
        log_d = np.log(np.where(mk, d2, 1.0))
    log_l = np.log(np.where(mk, l2, 1.0))
    # Pad to bucketed shapes so differently sized calls share compiled code (S to a
    # multiple of 16, M to a power of two or a multiple of 64): duplicated rows are fitted
    # and dropped; padded columns are masked out.
    m_pad, s_pad = _bucket(m, 64), -(-l2.shape[1] // 16) * 16 - l2.shape[1]
    rows = np.concatenate([np.arange(m), np.zeros(m_pad - m, np.int64)])
    log_d, log_l, mk_pad = (np.pad(a[rows], ((0, 0), (0, s_pad))) for a in (log_d, log_l, mk))
    if aux is not None:
        aux = jax.tree.map(lambda a: np.asarray(a)[rows] if np.ndim(a) else a, aux)
    if groups is not None:
        groups = np.asarray(groups)[rows]
    # The solve runs on the law's kernel: the law itself, or a more general law with some
    # raw parameters pinned (vanilla = rectified with D_l = e^-700, i.e. D_l → 0).
    kernel_name, pinned = _KERNELS.get(law.name, (law.name, {}))
    kernel = get_law(kernel_name)
    p_law = len(law.param_names)
    free = np.array(
        [n not in fixed and n not in shared for n in law.param_names] + [False] * len(pinned)
    )
    num_points = mk.sum(axis=1)
    fixed_raw = np.full((m_pad, len(kernel.param_names)), np.nan)
    for name, value in fixed.items():
        value = np.broadcast_to(np.asarray(value, np.float64), (m,))[rows]
        fixed_raw[:, law.param_names.index(name)] = np.log(value)
    for name, raw_value in pinned.items():
        fixed_raw[:, kernel.param_names.index(name)] = raw_value
    prior_arrays = None
    if prior:
        mean = np.zeros_like(fixed_raw)
        weight = np.zeros_like(fixed_raw)
        for name, (center, tau) in prior.items():
            if name not in law.param_names:
                raise LensLLMInputError(
                    f"no parameter {name!r} for a prior: law {law.name!r} has {law.param_names}"
                )
            i = law.param_names.index(name)
            mean[:, i] = np.log(np.broadcast_to(np.asarray(center, np.float64), (m,))[rows])
            weight[:, i] = prior_noise_sd / np.broadcast_to(np.asarray(tau, np.float64), (m,))[rows]
        prior_arrays = (mean, weight)

    with jax.enable_x64(True):
        run = functools.partial(
            _run,
            kernel_name,
            jax.random.PRNGKey(seed) if key is None else key,
            num_starts,
            free=free,
            loss=loss,
            delta=huber_delta,
            solver=solver,
            max_steps=max_steps,
            explore_steps=explore_steps,
            num_polish=num_polish,
            solve_batch=solve_batch or _solve_batch,
        )
        if shared and solve_rows is not None:
            x, cost, conv, resid = solve_rows(
                run, law, fixed_raw, log_d, log_l, mk_pad, aux, prior_arrays, groups
            )
        else:
            x, cost, conv, resid = run(fixed_raw, log_d, log_l, mk_pad, aux, prior_arrays)
        x, cost, conv, resid = x[:m, :p_law], cost[:m], conv[:m], resid[:m]

    n = np.maximum(num_points, 1)
    finite = np.isfinite(cost)
    status = np.where(conv, FitStatus.SUCCESS, FitStatus.MAX_STEPS)
    status = np.where(finite, status, FitStatus.NONFINITE)
    status = np.where(num_points < free.sum(), FitStatus.TOO_FEW_POINTS, status).astype(np.int64)
    failed = status > FitStatus.MAX_STEPS
    x = np.where(failed[:, None], np.nan, x)
    with np.errstate(over="ignore"):  # a parameter that ran off to infinity stays inf
        params = {name: np.exp(x[:, i]) for i, name in enumerate(law.param_names)}
    rmse = np.sqrt(np.sum(resid**2, axis=1) / n)
    return FitResult(
        params=params,
        raw=x,
        loss=np.where(failed, np.nan, 2.0 * cost / n),
        rmse=np.where(failed, np.nan, rmse),
        status=status,
        num_points=num_points,
        law=law.name,
    )


# Laws solved through another law's compiled kernel: same mathematics under other names
# (lensllm with fitted F is the rectified law), or a limit of it with raw parameters pinned
# (vanilla is rectified with D_l -> 0). One compilation then serves all three laws.
_KERNELS: dict[str, tuple[str, dict[str, float]]] = {
    "lensllm": ("rectified", {}),
    "vanilla": ("rectified", {"D_l": -700.0}),
}


def _bucket(n: int, step: int) -> int:
    """n rounded up to a power of two below `step`, else to a multiple of `step`."""
    if n <= step:
        return max(1, 1 << (n - 1).bit_length())
    return -(-n // step) * step


# Starting points are a separate, small program compiled without LLVM optimisation: it runs
# once per fit, and keeping it out of `_solve_batch` shortens that compile by ~20 %.
_starts_batch = jax.jit(
    initial_starts,
    static_argnames=("law", "num_starts"),
    compiler_options={"xla_backend_optimization_level": 0},
)


def _run(
    law_name, key, num_starts, fixed_raw, log_d, log_l, mask, aux, prior, solve_batch, **static
):
    log_d, log_l, mask = jnp.asarray(log_d), jnp.asarray(log_l), jnp.asarray(mask)
    x0 = _starts_batch(law_name, log_d, log_l, mask, key, num_starts, aux, jnp.asarray(fixed_raw))
    out = solve_batch(
        law_name,
        x0,
        jnp.asarray(static.pop("free")),
        log_d,
        log_l,
        mask,
        aux,
        None if prior is None else tuple(jnp.asarray(a) for a in prior),
        **static,
    )
    return tuple(np.asarray(a) for a in out)
