"""Matrix-free Hessian quantities of a scalar loss: HVPs, traces, top eigenvalue, vᵀHv.

Everything works on `loss_fn(params) -> scalar` and a params pytree, and is jittable. Pass
`batch=` to have `loss_fn(params, batch)` instead: the compiled program is then cached per
`loss_fn` (params and batch are its arguments), so calling again at other parameters (another
fine-tuned model) or on another batch of the same shapes does not compile again.

The Hessian is only touched through the Hessian-vector product

    H v = d/dε ∇L(θ + ε v) |_{ε=0}     (forward-over-reverse: `jvp` of `grad`),

which costs about one forward + backward pass extra over a gradient (≈ 2-3x a gradient in
FLOPs) and the memory of one gradient plus its tangent.

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
from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree

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
GroupBy = Literal["leaf", "top"] | Callable[[tuple], Hashable]


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


Grouping = list[str | tuple[str, ...]]  # per leaf: one label, or one per stacked layer


def _grouping(params: PyTree, group_by: GroupBy, stacked: str | None) -> Grouping:
    """Label of each leaf; a leaf under the top-level key `stacked` (layers stacked on axis 0,
    as in scanned models) gets one label per layer index, suffixed "[i]"."""
    out: Grouping = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if group_by == "leaf":
            lab = jax.tree_util.keystr(path)
        elif group_by == "top":
            lab = jax.tree_util.keystr(path[:1])
        elif callable(group_by):
            lab = str(group_by(path))
        else:
            raise HessianError(f"group_by must be 'leaf', 'top' or a callable, got {group_by!r}")
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        if stacked is not None and top == stacked:
            if jnp.ndim(leaf) < 1:
                raise HessianError(
                    f"leaf {jax.tree_util.keystr(path)} under stacked={stacked!r} is a scalar; "
                    "stacked leaves need a leading layer axis"
                )
            out.append(tuple(f"{lab}[{i}]" for i in range(jnp.shape(leaf)[0])))
        else:
            out.append(lab)
    return out


def _group_dots(a: PyTree, b: PyTree, grouping: Grouping) -> dict[str, jax.Array]:
    """Σ over each group's entries of a * b (per layer index for stacked leaves)."""
    out: dict[str, jax.Array] = {}

    def add(lab: str, val: jax.Array) -> None:
        out[lab] = out[lab] + val if lab in out else val

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    for x, y, lab in zip(leaves_a, leaves_b, grouping, strict=True):
        if isinstance(lab, tuple):
            per_layer = jnp.sum(x * y, axis=tuple(range(1, x.ndim)))
            for i, sub in enumerate(lab):
                add(sub, per_layer[i])
        else:
            add(lab, jnp.vdot(x, y))
    return out


def _mask_group(v: PyTree, grouping: Grouping, group: str) -> PyTree:
    """v restricted to one group (zeros elsewhere)."""
    leaves, tree = jax.tree.flatten(v)
    masked = []
    for x, lab in zip(leaves, grouping, strict=True):
        if isinstance(lab, tuple):
            keep = jnp.asarray([sub == group for sub in lab], x.dtype)
            masked.append(x * keep.reshape(-1, *([1] * (x.ndim - 1))))
        else:
            masked.append(x if lab == group else jnp.zeros_like(x))
    return jax.tree.unflatten(tree, masked)


def _mean_se(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = samples.shape[0]
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(n)


# ----------------------------------------------------------------------------- HVP + probes


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """H v by forward-over-reverse (`jvp` of `grad`): ≈ 2-3 gradients of FLOPs, memory of one
    gradient + tangent. `v` has the structure of `params`."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _hvp_operator(loss_fn: LossFn, params: PyTree, linearize: bool) -> Callable[[PyTree], PyTree]:
    """v -> Hv. linearize=True runs the gradient's primal once (`jax.linearize` of `grad`) and
    applies only the tangent map per vector: ~half the FLOPs per HVP after the first, holding
    the gradient's residuals (activations) alive meanwhile, about one HVP's peak memory."""
    if linearize:
        return jax.linearize(jax.grad(loss_fn), params)[1]
    return lambda v: hvp(loss_fn, params, v)


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
def _hutchinson_program(loss_fn, draw, grouping: tuple, linearize, batch_size):
    @jax.jit
    def run(params, batch, keys):
        matvec = _hvp_operator(_bound(loss_fn, batch), params, linearize)

        def integrand(k):
            z = draw(k, params)
            return _group_dots(z, matvec(z), list(grouping))

        return jax.lax.map(integrand, keys, batch_size=batch_size)

    return run


@_CACHE
def _hutchpp_program(loss_fn, draw, linearize, k):
    @jax.jit
    def run(params, batch, key):
        matvec = _hvp_operator(_bound(loss_fn, batch), params, linearize)
        _, unravel = ravel_pytree(params)

        def probe(key):
            return ravel_pytree(draw(key, params))[0]

        def mv(v):
            return ravel_pytree(matvec(unravel(v)))[0]

        ks, kg = jax.random.split(key)
        s = jax.lax.map(probe, jax.random.split(ks, k))  # (k, P) rows are probes
        g = jax.lax.map(probe, jax.random.split(kg, k))
        hs = jax.lax.map(mv, s)
        q, _ = jnp.linalg.qr(hs.T)  # (P, min(P, k)) orthonormal columns
        low_rank = jnp.sum(jax.lax.map(lambda qi: jnp.vdot(qi, mv(qi)), q.T))
        g_perp = g - (g @ q) @ q.T  # project the probes off the sketched subspace
        return low_rank, jax.lax.map(lambda gi: jnp.vdot(gi, mv(gi)), g_perp)

    return run


def _normalise(v: PyTree) -> PyTree:
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v)))
    return jax.tree.map(lambda x: x / norm, v)


@_CACHE
def _power_program(loss_fn, linearize, num_iters):
    @jax.jit
    def run(params, batch, v0):
        matvec = _hvp_operator(_bound(loss_fn, batch), params, linearize)
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
def _distance_program(loss_fn, grouping: tuple):
    @jax.jit
    def run(at, batch, v):
        f = _bound(loss_fn, batch)
        per_group = _group_dots(v, hvp(f, at, v), list(grouping))
        block = {}
        for g in per_group:
            vg = _mask_group(v, list(grouping), g)
            block[g] = sum(_leaf_dots(vg, hvp(f, at, vg)))
        return per_group, block

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
    linearize: bool = True,
    name: str | None = None,
    batch: PyTree | None = None,
) -> TraceEstimate:
    """Hutchinson: tr(H) ≈ (1/m) Σ_i z_iᵀ H z_i with E[z zᵀ] = I, and per-group tr(H_gg).

    Probes run sequentially via `lax.map` (memory of one HVP; `batch_size` vmaps that many at
    once for speed). Cost: m HVPs ≈ 2-3 m gradients (≈ 1 + m with `linearize`, see
    `_hvp_operator`). Variance for Rademacher probes:
    2 Σ_{i≠j} H_ij², so the stderr (from the sample spread) shrinks as 1/√m.
    """
    if not isinstance(num_probes, int) or num_probes < 2:
        raise HessianError(
            f"num_probes must be an int >= 2 (for a standard error), got {num_probes!r}"
        )
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    draw = _sampler(sampler, name)
    grouping = _grouping(params, group_by, stacked)
    run = _hutchinson_program(loss_fn, draw, _grouping_key(grouping), linearize, batch_size)
    samples = run(params, batch, jax.random.split(key, num_probes))
    per_group = {g: _mean_se(s) for g, s in samples.items()}
    total = functools.reduce(operator.add, samples.values())
    mean, se = _mean_se(total)
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
    linearize: bool = True,
    name: str | None = None,
    batch: PyTree | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): deflate the top of the spectrum, then
    Hutchinson on the rest.

    k = num_matvecs // 3: Q = orth(H S) for a P x k probe block S; tr(H) ≈ tr(Qᵀ H Q) +
    (1/k) Σ_i g_iᵀ (I − QQᵀ) H (I − QQᵀ) g_i. Error O(1/m) instead of O(1/√m) for PSD H; exact
    when k >= rank(H). Cost: 3k HVPs + O(P k²) for the QR; memory: 2 P x k blocks (the sketch
    and Q), so use it where k parameter-sized vectors fit. stderr is that of the residual
    Hutchinson term; per-group traces are not returned.
    """
    if not isinstance(num_matvecs, int) or num_matvecs < 6:
        raise HessianError(
            f"num_matvecs must be an int >= 6 (three blocks of >= 2), got {num_matvecs!r}"
        )
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    draw = _sampler(sampler, name)
    run = _hutchpp_program(loss_fn, draw, linearize, num_matvecs // 3)
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
    linearize: bool = True,
    name: str | None = None,
    batch: PyTree | None = None,
) -> EigenEstimate:
    """Largest-magnitude Hessian eigenvalue by power iteration (v <- Hv / ‖Hv‖, λ = vᵀHv).

    Cost: num_iters + 1 HVPs, memory of one HVP. Converges at rate |λ2/λ1| per step; check
    `residual` (‖Hv − λv‖ for the unit vector returned). The sign of λ is kept (a saddle's
    largest |λ| may be negative).
    """
    _check_loss_and_params(_bound(loss_fn, batch), params, name)
    v0 = gaussian(key, params)
    lam, v, resid = _power_program(loss_fn, linearize, num_iters)(params, batch, v0)
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
) -> HessianDistance:
    """Hessian-weighted distance vᵀHv, v = θ_finetuned − θ_pretrained, total and per group.

    H is taken at `hessian_at` (default: the fine-tuned parameters, as in Hessian-based
    PAC-Bayes bounds for fine-tuning). Cost: 1 + G HVPs for G groups (the block forms mask v
    to one group), memory of one HVP.
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
    v = jax.tree.map(
        lambda a, b: jnp.asarray(b) - jnp.asarray(a), params_pretrained, params_finetuned
    )
    grouping = _grouping(at, group_by, stacked)
    per_group, block = _distance_program(loss_fn, _grouping_key(grouping))(at, batch, v)
    total = functools.reduce(operator.add, per_group.values())
    _check_finite(total, "vᵀHv", name)
    return HessianDistance(total, per_group, block)
