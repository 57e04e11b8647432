"""Matrix-free Hessian quantities of a scalar loss: HVPs, traces, top eigenvalue, vᵀHv.

Everything works on `loss_fn(params) -> scalar` and a params pytree, and is jittable. Pass
`batch=` to have `loss_fn(params, batch)` instead: the compiled program is then cached per
`loss_fn` (params and batch are its arguments), so calling again at other parameters (another
fine-tuned model) or on another batch of the same shapes does not compile again.

The Hessian is only touched through the Hessian-vector product

    H v = d/dε ∇L(θ + ε v) |_{ε=0}     (forward-over-reverse: `jvp` of `grad`),

which costs about one forward + backward pass extra over a gradient (≈ 2-3x a gradient in
FLOPs) and the memory of one gradient plus its tangent. Every estimator's memory is that of
one HVP: probes run one after another (`lax.map`), the gradient is recomputed per probe by
default (`linearize=False`: `jax.linearize` would keep the whole backward pass's residuals
alive across the probes), and with `example_chunk=` (and `batch=`) each HVP itself runs over
micro-batches of the batch, accumulated: for a loss that is the mean over the batch's examples,

    H v = (1/nb) Σ_b H_b v      (H_b: Hessian of the mean loss on micro-batch b of nb),

so the activations held are those of one micro-batch (memory independent of the batch size;
the FLOPs are unchanged).

Estimators follow matfree: estimator = sampler (probe distribution) + integrand (what each
probe contributes), returning the mean and its standard error. Per-group results ("layers")
come from the same probes: for a probe z split into parameter groups z_g, z_gᵀ (H z)_g is an
unbiased estimate of tr(H_gg), and the groups sum to zᵀHz exactly.

Groups: `group_by="leaf"` (every pytree leaf, labelled by its key path), `"top"` (the top-level
key: e.g. {"wte": ..., "h_0": {...}} -> groups "['wte']", "['h_0']") or a callable
`key_path -> label`. Scanned models stack their layers on axis 0 of every leaf under one key:
`stacked="layers"` splits those leaves per layer index, labels suffixed "[i]" (so "top" gives
"['layers'][0]", "['layers'][1]", ... : true per-layer traces).

Checks that need values (NaN / inf) run only outside `jit`, in the eager front doors; they raise
`HessianError` (a `ValueError`) naming `name=`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree

from lensllm_jax.core._hessian_groups import (
    GroupBy,
    Grouping,
    _group_dots,
    _grouping,
    _mask_group,
    _mean_se,
    _summaries,
)
from lensllm_jax.core._orthonormal import orthonormal_rows
from lensllm_jax.core.probes import SAMPLERS, gaussian, rademacher
from lensllm_jax.errors import HessianError

__all__ = [
    "SAMPLERS",
    "EigenEstimate",
    "HessianDistance",
    "HessianError",
    "TraceEstimate",
    "gaussian",
    "hessian_distance",
    "hutchinson_samples",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "rademacher",
    "top_eigenvalue",
]

PyTree = Any
LossFn = Callable[..., jax.Array]  # loss(params), or loss(params, batch) with batch=


class TraceEstimate(NamedTuple):
    """Stochastic trace estimate: mean ± stderr (standard error of the mean over probes).

    per_group / per_group_stderr: dict label -> estimate of tr(H_gg) (None for Hutch++, whose
    deflation is not block-diagonal). samples: (num_probes,) per-probe values of the integrand;
    stderr = std(samples, ddof=1) / √num_probes (for Hutch++, of the residual term).
    `as_dict()` gives the JSON-ready summary (trace, stderr, num_probes, per-group values).
    """

    mean: jax.Array
    stderr: jax.Array
    per_group: dict[str, jax.Array] | None
    per_group_stderr: dict[str, jax.Array] | None
    samples: jax.Array

    @property
    def num_probes(self) -> int:
        """Number of probes (Hutch++: residual probes) the estimate averages."""
        return int(np.shape(self.samples)[-1])

    def as_dict(self) -> dict[str, Any]:
        """Plain floats for a JSON report: trace, stderr, relative_stderr, num_probes and the
        per-group traces with their standard errors (when available). Not jittable."""
        mean, se = float(self.mean), float(self.stderr)
        out: dict[str, Any] = {
            "trace": mean,
            "stderr": se,
            "relative_stderr": se / abs(mean) if mean else None,
            "num_probes": self.num_probes,
        }
        if self.per_group is not None and self.per_group_stderr is not None:
            out["per_group"] = {
                g: {"trace": float(v), "stderr": float(self.per_group_stderr[g])}
                for g, v in self.per_group.items()
            }
        return out


class EigenEstimate(NamedTuple):
    """Largest-|λ| eigenpair from power iteration; residual = ‖Hv − λv‖ (0 when converged)."""

    eigenvalue: jax.Array
    eigenvector: PyTree
    residual: jax.Array


class HessianDistance(NamedTuple):
    """vᵀHv with v = θ_finetuned − θ_pretrained.

    total: vᵀHv. per_group: v_gᵀ (H v)_g, sums to total (includes cross-group curvature).
    per_group_block: v_gᵀ H_gg v_g, the layer-wise quadratic form of Hessian-based PAC-Bayes
    bounds (Ju et al. 2022), one extra HVP per group.
    """

    total: jax.Array
    per_group: dict[str, jax.Array]
    per_group_block: dict[str, jax.Array]


# ----------------------------------------------------------------------------- checks


def _where(name: str | None) -> str:
    return f" for {name!r}" if name else ""


def _bound(loss_fn: Callable, batch: PyTree | None) -> LossFn:
    """params -> scalar: `loss_fn` itself, or `loss_fn(·, batch)` when a batch is given."""
    return loss_fn if batch is None else lambda p: loss_fn(p, batch)


def _grouping_key(grouping: Grouping) -> tuple:
    return tuple(grouping)


def _check_loss_and_params(loss_fn: LossFn, params: PyTree, name: str | None) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise HessianError(f"params{_where(name)} has no array leaves")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise HessianError(
                f"params{_where(name)} leaf {jax.tree_util.keystr(path)} has dtype "
                f"{jnp.result_type(leaf)}; Hessians need floating-point parameters"
            )
    try:
        out = jax.eval_shape(loss_fn, params)
    except Exception as err:  # any tracing failure becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HessianError(f"loss_fn(params){_where(name)} failed to trace: {first}") from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        got = getattr(out, "shape", type(out).__name__)
        raise HessianError(
            f"loss_fn{_where(name)} must return a scalar, got {got}; average the per-example loss"
        )


def _whole(value: Any, what: str, minimum: int, why: str) -> int:
    """A count argument: an int or numpy integer (not a bool) >= `minimum`, as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise HessianError(f"{what} must be an int >= {minimum} ({why}), got {value!r}")
    if value < minimum:
        raise HessianError(f"{what} must be an int >= {minimum} ({why}), got {int(value)}")
    return int(value)


def _check_finite(x: Any, what: str, name: str | None) -> None:
    leaves = jax.tree.leaves(x)
    if any(isinstance(leaf, Tracer) for leaf in leaves):
        return  # under jit: values unknown, checked by the caller outside jit
    for leaf in leaves:
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise HessianError(
                f"{what}{_where(name)} is not finite (NaN/inf); check the loss on this batch "
                "(overflow, log(0)) or lower the parameter dtype's risk (use float32)"
            )


# ----------------------------------------------------------------------------- HVP + probes


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """H v by forward-over-reverse (`jvp` of `grad`): ≈ 2-3 gradients of FLOPs, memory of one
    gradient + tangent. `v` has the structure of `params`."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _hvp_operator(
    loss_fn: Callable, params: PyTree, batch: PyTree | None, linearize: bool, chunk: int | None
) -> Callable[[PyTree], PyTree]:
    """v -> Hv of `_bound(loss_fn, batch)`.

    linearize=True runs the gradient's primal once (`jax.linearize` of `grad`) and applies only
    the tangent map per vector: ~2/3 of the FLOPs per HVP after the first, but the gradient's
    residuals (every activation of the forward and backward passes, and their parameter-sized
    intermediates) stay alive across all vectors. `chunk` (examples per micro-batch, dividing
    the batch) accumulates H v = (1/nb) Σ_b H_b v over the micro-batches by a `lax.scan`: the
    memory of one micro-batch's HVP plus one parameter-sized accumulator."""
    if chunk is None or batch is None:
        f = _bound(loss_fn, batch)
        if linearize:
            return jax.linearize(jax.grad(f), params)[1]
        return lambda v: hvp(f, params, v)
    n = jax.tree.leaves(batch)[0].shape[0]
    nb = n // chunk
    blocks = jax.tree.map(lambda x: x.reshape(nb, chunk, *x.shape[1:]), batch)

    def matvec(v: PyTree) -> PyTree:
        def body(acc, b):
            hv = hvp(lambda p: loss_fn(p, b), params, v)
            return jax.tree.map(lambda a, h: a + h / nb, acc, hv), None

        zero = jax.tree.map(jnp.zeros_like, v)
        return jax.lax.scan(body, zero, blocks)[0]

    return matvec


def _example_chunk(example_chunk: int | None, batch: PyTree | None, name: str | None) -> int | None:
    """The micro-batch size: the largest divisor of the batch's N that is <= example_chunk
    (None: the whole batch at once). Needs `batch=` with one leading axis on every leaf."""
    if example_chunk is None:
        return None
    if not isinstance(example_chunk, int) or example_chunk < 1:
        raise HessianError(
            f"example_chunk{_where(name)} must be a positive int or None, got {example_chunk!r}"
        )
    if batch is None:
        raise HessianError(
            f"example_chunk{_where(name)} needs batch= (the examples to split into micro-batches)"
        )
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise HessianError(
            f"batch{_where(name)}: every leaf needs the same leading example axis to split it "
            f"into micro-batches, got sizes {sorted(str(s) for s in sizes)}"
        )
    n = int(sizes.pop())  # type: ignore[arg-type]
    chunk = min(example_chunk, n)
    while n % chunk:
        chunk -= 1
    return None if chunk == n else chunk


def _sampler(sampler: str | Callable, name: str | None) -> Callable:
    if callable(sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise HessianError(
            f"unknown sampler {sampler!r}{_where(name)}; use one of {sorted(SAMPLERS)}"
        )
    return SAMPLERS[sampler]


def _leaf_dots(a: PyTree, b: PyTree) -> list[jax.Array]:
    return [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]


# ----------------------------------------------------------------------------- traces


# Compiled programs, cached per (loss_fn, options): params and batch are arguments, so a call
# at new parameter values or on a new batch of the same shapes reuses the compiled code.
_CACHE = functools.lru_cache(maxsize=32)


@_CACHE
def _hutchinson_program(loss_fn, draw, grouping: tuple, linearize, batch_size, chunk=None):
    @jax.jit
    def run(params, batch, keys):
        matvec = _hvp_operator(loss_fn, params, batch, linearize, chunk)

        def integrand(k):
            z = draw(k, params)
            return _group_dots(z, matvec(z), list(grouping))

        return jax.lax.map(integrand, keys, batch_size=batch_size)

    return run


@_CACHE
def _hutchpp_program(loss_fn, draw, linearize, k, chunk=None):
    @jax.jit
    def run(params, batch, key):
        matvec = _hvp_operator(loss_fn, params, batch, linearize, chunk)
        _, unravel = ravel_pytree(params)

        def probe(key):
            return ravel_pytree(draw(key, params))[0]

        def mv(v):
            return ravel_pytree(matvec(unravel(v)))[0]

        # Probes drawn where used (never stored); H S orthonormalised in place; one HVP at a time
        ks, kg = jax.random.split(key)
        q = orthonormal_rows(jax.lax.map(lambda kk: mv(probe(kk)), jax.random.split(ks, k)))
        low_rank = jnp.sum(jax.lax.map(lambda qi: jnp.vdot(qi, mv(qi)), q))

        def residual(kk):
            g = probe(kk)
            g = g - (q @ g) @ q  # off the sketched subspace
            return jnp.vdot(g, mv(g))

        return low_rank, jax.lax.map(residual, jax.random.split(kg, k))

    return run


def _normalise(v: PyTree) -> PyTree:
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v)))
    return jax.tree.map(lambda x: x / norm, v)


@_CACHE
def _power_program(loss_fn, linearize, num_iters, chunk=None):
    @jax.jit
    def run(params, batch, v0):
        matvec = _hvp_operator(loss_fn, params, batch, linearize, chunk)
        v = jax.lax.fori_loop(0, num_iters, lambda _, v: _normalise(matvec(v)), _normalise(v0))
        hv = matvec(v)
        lam = sum(_leaf_dots(v, hv))
        resid = jnp.sqrt(
            sum(
                jnp.sum((a - lam * b) ** 2)
                for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(v), strict=True)
            )
        )
        return lam, v, resid

    return run


@_CACHE
def _distance_program(loss_fn, grouping: tuple, blocks: bool = True, chunk=None):
    @jax.jit
    def run(at, batch, pre, ft):
        # v inside the program: an eager per-leaf subtraction compiled one program per shape
        v = jax.tree.map(lambda a, b: b - a, pre, ft)
        matvec = _hvp_operator(loss_fn, at, batch, False, chunk)
        per_group = _group_dots(v, matvec(v), list(grouping))
        block = {}
        for g in per_group if blocks else ():
            vg = _mask_group(v, list(grouping), g)
            block[g] = sum(_leaf_dots(vg, matvec(vg)))
        return functools.reduce(operator.add, per_group.values()), per_group, block

    return run


def hutchinson_trace(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    num_probes: int,
    *,
    sampler: str | Callable[[jax.Array, PyTree], PyTree] = "rademacher",
    group_by: GroupBy = "leaf",
    stacked: str | None = None,
    batch_size: int | None = None,
    linearize: bool = False,
    name: str | None = None,
    batch: PyTree | None = None,
    example_chunk: int | None = None,
) -> TraceEstimate:
    """Hutchinson: tr(H) ≈ (1/m) Σ_i z_iᵀ H z_i with E[z zᵀ] = I, and per-group tr(H_gg).

    Probes run sequentially via `lax.map` (memory of one HVP; `batch_size` vmaps that many at
    once, for speed, at that many HVPs' memory). Cost: m HVPs ≈ 2-3 m gradients (≈ 1 + 2m/3
    with `linearize`, which keeps the gradient's residuals alive, see `_hvp_operator`).
    `example_chunk` (with `batch=`, for a loss that is the mean over the batch's examples):
    each HVP over micro-batches of that many examples (the largest divisor of N not above
    it), memory of one micro-batch. Variance for Rademacher probes: 2 Σ_{i≠j} H_ij², so the
    stderr (from the sample spread) shrinks as 1/√m.
    """
    num_probes = _whole(num_probes, "num_probes", 2, "for a standard error")
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    draw = _sampler(sampler, name)
    grouping = _grouping(params, group_by, stacked)
    chunk = _example_chunk(example_chunk, batch, name)
    run = _hutchinson_program(
        loss_fn, draw, _grouping_key(grouping), linearize and chunk is None, batch_size, chunk
    )
    samples = run(params, batch, jax.random.split(key, num_probes))
    per_group, total, (mean, se) = _summaries(samples)
    _check_finite(mean, "Hutchinson trace", name)
    return TraceEstimate(
        mean,
        se,
        {g: v[0] for g, v in per_group.items()},
        {g: v[1] for g, v in per_group.items()},
        total,
    )


def hutchinson_samples(
    loss_fn: LossFn,
    params: PyTree,
    keys: jax.Array,
    *,
    sampler: str | Callable[[jax.Array, PyTree], PyTree] = "rademacher",
    group_by: GroupBy = "leaf",
    stacked: str | None = None,
    batch_size: int | None = None,
    linearize: bool = True,
    batch: PyTree | None = None,
) -> dict[str, jax.Array]:
    """Per-probe Hutchinson integrands z_kᵀ (H z)_g for explicit probe keys (K,): a dict
    group -> (K,), the samples `hutchinson_trace` averages (its probes are
    `jax.random.split(key, num_probes)`). Jittable; a hook for `lensllm_jax.parallel`,
    which spreads the keys over devices. Cost: K HVPs (as `hutchinson_trace`)."""
    grouping = _grouping(params, group_by, stacked)
    draw = _sampler(sampler, None)
    run = _hutchinson_program(loss_fn, draw, _grouping_key(grouping), linearize, batch_size)
    return run(params, batch, keys)


def hutchpp_trace(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    num_matvecs: int,
    *,
    sampler: str | Callable[[jax.Array, PyTree], PyTree] = "rademacher",
    linearize: bool = False,
    name: str | None = None,
    batch: PyTree | None = None,
    example_chunk: int | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): deflate the top of the spectrum, then
    Hutchinson on the rest.

    k = num_matvecs // 3: Q = orth(H S) for a P x k probe block S; tr(H) ≈ tr(Qᵀ H Q) +
    (1/k) Σ_i g_iᵀ (I − QQᵀ) H (I − QQᵀ) g_i. Error O(1/m) instead of O(1/√m) for PSD H; exact
    when k >= rank(H). Cost: 3k HVPs + O(P k²) for the orthonormalisation; memory: one P x k
    block (H S, orthonormalised in place into Q; the probes are drawn where used) and one
    HVP, so use it where k parameter-sized vectors fit. stderr is that of the residual
    Hutchinson term; per-group traces are not returned. `linearize`, `example_chunk`: as in
    `hutchinson_trace`.
    """
    num_matvecs = _whole(num_matvecs, "num_matvecs", 6, "three blocks of >= 2")
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    draw = _sampler(sampler, name)
    chunk = _example_chunk(example_chunk, batch, name)
    run = _hutchpp_program(loss_fn, draw, linearize and chunk is None, num_matvecs // 3, chunk)
    low_rank, samples = run(params, batch, key)
    res_mean, res_se = _mean_se(samples)
    mean = low_rank + res_mean
    _check_finite(mean, "Hutch++ trace", name)
    return TraceEstimate(mean, res_se, None, None, low_rank + samples)


# ----------------------------------------------------------------------------- spectrum


def top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    num_iters: int = 100,
    *,
    linearize: bool = False,
    name: str | None = None,
    batch: PyTree | None = None,
    example_chunk: int | None = None,
) -> EigenEstimate:
    """Largest-magnitude Hessian eigenvalue by power iteration (v <- Hv / ‖Hv‖, λ = vᵀHv).

    Cost: num_iters + 1 HVPs, memory of one HVP. Converges at rate |λ2/λ1| per step; check
    `residual` (‖Hv − λv‖ for the unit vector returned). The sign of λ is kept (a saddle's
    largest |λ| may be negative). `linearize`, `example_chunk`: as in `hutchinson_trace`.
    """
    num_iters = _whole(num_iters, "num_iters", 1, "power iterations")
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    v0 = gaussian(key, params)
    chunk = _example_chunk(example_chunk, batch, name)
    program = _power_program(loss_fn, linearize and chunk is None, num_iters, chunk)
    lam, v, resid = program(params, batch, v0)
    _check_finite(lam, "top Hessian eigenvalue", name)
    return EigenEstimate(lam, v, resid)


# ----------------------------------------------------------------------------- distance


def hessian_distance(
    loss_fn: LossFn,
    params_pretrained: PyTree,
    params_finetuned: PyTree,
    *,
    hessian_at: PyTree | None = None,
    group_by: GroupBy = "leaf",
    stacked: str | None = None,
    name: str | None = None,
    batch: PyTree | None = None,
    blocks: bool = True,
    example_chunk: int | None = None,
) -> HessianDistance:
    """Hessian-weighted distance vᵀHv, v = θ_finetuned − θ_pretrained, total and per group.

    H is taken at `hessian_at` (default: the fine-tuned parameters, as in Hessian-based
    PAC-Bayes bounds for fine-tuning). Cost: 1 + G HVPs for G groups (the block forms mask v
    to one group; `blocks=False` skips them: 1 HVP, `per_group_block` empty), memory of one
    HVP (`example_chunk`: of one micro-batch, as in `hutchinson_trace`).
    """
    s_pre = jax.tree.structure(params_pretrained)
    s_ft = jax.tree.structure(params_finetuned)
    if s_pre != s_ft:
        raise HessianError(
            f"pretrained and fine-tuned params{_where(name)} differ in structure: {s_pre} vs {s_ft}"
        )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(params_pretrained)[0],
        jax.tree.leaves(params_finetuned),
        strict=True,
    ):
        if jnp.shape(a) != jnp.shape(b):
            raise HessianError(
                f"leaf {jax.tree_util.keystr(path)}{_where(name)} has shape {jnp.shape(a)} "
                f"pretrained but {jnp.shape(b)} fine-tuned; compare the same architecture"
            )
    at = params_finetuned if hessian_at is None else hessian_at
    _check_loss_and_params(_bound(loss_fn, batch), at, name)
    grouping = _grouping(at, group_by, stacked)
    chunk = _example_chunk(example_chunk, batch, name)
    program = _distance_program(loss_fn, _grouping_key(grouping), bool(blocks), chunk)
    total, per_group, block = program(at, batch, params_pretrained, params_finetuned)
    _check_finite(total, "vᵀHv", name)
    return HessianDistance(total, per_group, block)
