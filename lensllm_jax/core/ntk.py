"""Empirical neural tangent kernels and the NTK test loss F(Θ, t) of LENSLLM.

Kernel. For a function f(params, x) that maps a batch x (every leaf has a leading batch axis N)
to outputs of shape (N, *out), acting on each example independently (no batch statistics),

    Θ[i, j, a, b] = Σ_c Σ_p ∂f(x1_i)[a, c] / ∂θ_p · ∂f(x2_j)[b, c] / ∂θ_p

where c runs over the output axes in `trace_axes` and a, b over the remaining ("untraced")
output axes. The result has shape (N1, N2, *untraced, *untraced); with the default
`trace_axes=None` every output axis is traced and Θ is (N1, N2).

Routes (`implementation`; costs in per-example gradient passes, one pass ≈ one batched
gradient of the batch; `_ntk_memory.plan_ntk` models them, `kernel_fn.plan` reports them):

* `JACOBIAN_CONTRACTION` ("blocks"): per-example Jacobians in chunks of c examples, the Gram
  accumulated block by block (at most two chunks alive; one when a single block holds all N).
  1 pass when all N fit, ≈ nb/2 passes for nb = ⌈N/c⌉ blocks otherwise. Exact.
* `NTK_VECTOR_PRODUCTS` ("matrix-free"): Θ e_j = J1 (J2ᵀ e_j), a vjp of example j then a
  batched jvp of the x1 batch, k columns at once. 1 gradient pass + N tangent passes. Exact.
* "sketch": per-example gradients count-sketched to k buckets in one pass; unbiased, with a
  per-entry standard-error bound computed in the same pass (`sketched_ntk`, `_ntk_routes`).
* "auto" (default): by the memory budget (`memory_budget_bytes`, from the device, or what
  `lensllm run` measured on the host), the exact route of least modeled cost; the sketch only
  with `allow_sketch=True` and when the exact kernel would cost more than `max_exact_passes`.
`ntk_vp` exposes the kernel-vector product Θ v itself for large N.

Language-model helpers: `loss_gradient_kernel` (outputs = per-example loss, N x N) and
`logit_kernel` (outputs = target-token log-probs, traced over positions), both on generic
`per_example_loss(params, batch)` / `token_logprobs(params, batch)` functions, e.g. with the
model zoo:

    loss = functools.partial(models.per_example_loss, m.apply)   # (params, batch) -> (N,)
    theta = ntk.loss_gradient_kernel(loss, m.params, batch, chunk_size=32, name=repo)
    feats, diag = ntk.checked_features(theta, residual, name=repo)  # residual: (N,)

Test loss. F(Θ, t) = ‖exp(−η Θ t) r‖² = Σ_k exp(−2 η λ_k t) (u_kᵀ r)² with Θ = U diag(λ) Uᵀ
(`eigh` of the symmetrised kernel, negative round-off eigenvalues clipped to 0). `features`
does the O(N³) eigendecomposition once; `ntk_test_loss_from_features` is O(N), differentiable
in t and η, and vmappable, for use inside a jitted fitting loop.

Checks. Shape / pytree checks run at trace time and so also under `jit`. Checks that need values
(NaN / inf, PSD-ness) run only on concrete arrays: in `empirical_ntk` when it is called outside
`jit` (skipped silently on tracers), and in `checked_features` / `check_kernel`, which are
non-jittable front doors. All raise `NTKError` (a `ValueError`) with one line.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.core import _ntk_blocks, _ntk_routes
from lensllm_jax.core._ntk_checks import (
    _batch_size,
    _check_finite,
    _check_same_structure,
    _is_concrete,
    _normalise_trace_axes,
    _where,
)
from lensllm_jax.core._ntk_layout import OutputLayout as _OutputLayout
from lensllm_jax.core._ntk_layout import acc_dtype as _acc_dtype
from lensllm_jax.core._ntk_layout import as_ac as _as_ac
from lensllm_jax.core._ntk_layout import finish as _finish
from lensllm_jax.core._ntk_layout import layout as _layout
from lensllm_jax.core._ntk_layout import loss_kernel_f, per_example_jacobian
from lensllm_jax.core._ntk_memory import (
    DEVICE_MEMORY_FRACTION,
    HOST_MEMORY_BUDGET,
    MAX_EXACT_PASSES,
    SKETCH_DIM,
    NtkPlan,
    auto_chunk_size,
    jacobian_bytes_per_example,
    memory_budget,
    parse_bytes,
    plan_ntk,
    sketch_relative_error,
)
from lensllm_jax.core.ntk_loss import (
    KernelDiagnostics,
    NTKFeatures,
    check_kernel,
    checked_features,
    features,
    kernel_diagnostics,
    ntk_test_loss,
    ntk_test_loss_from_features,
)
from lensllm_jax.errors import NTKError

__all__ = [
    "DEVICE_MEMORY_FRACTION",
    "HOST_MEMORY_BUDGET",
    "MAX_EXACT_PASSES",
    "SKETCH_DIM",
    "KernelDiagnostics",
    "NTKError",
    "NTKFeatures",
    "NtkImplementation",
    "NtkPlan",
    "SketchedNTK",
    "auto_chunk_size",
    "causal_lm_token_logprobs",
    "check_kernel",
    "checked_features",
    "empirical_ntk",
    "empirical_ntk_fn",
    "features",
    "jacobian_bytes_per_example",
    "kernel_diagnostics",
    "logit_kernel",
    "loss_gradient_kernel",
    "memory_budget",
    "ntk_test_loss",
    "ntk_test_loss_from_features",
    "ntk_vp",
    "parse_bytes",
    "plan_ntk",
    "sketch_relative_error",
    "sketched_ntk",
]

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]
KernelFn = Callable[..., jax.Array]
ChunkSize = int | str | None  # examples per Jacobian block, "auto" (memory budget) or None (all)
ROUTE_NAMES = ("auto", "jacobian_contraction", "ntk_vector_products", "sketch")


class NtkImplementation(enum.Enum):
    """The exact NTK routes (see each `_ntk_*` function for its cost). `implementation=` also
    takes "auto" (default: chosen by the memory budget) and "sketch" (approximate)."""

    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"


class SketchedNTK(NamedTuple):
    """A count-sketched kernel (`sketched_ntk`): Θ̂ (unbiased), a per-entry bound on its
    standard error over the sketch's random signs (same shape), and the plan it ran with."""

    theta: jax.Array
    stderr_bound: jax.Array
    plan: NtkPlan

    def frobenius_error_bound(self) -> float:
        """sqrt(Σ stderr_bound²) >= the root-mean-square of ‖Θ̂ − Θ‖_F over the signs, which
        bounds every eigenvalue's error (Weyl: |λ̂_k − λ_k| <= ‖Θ̂ − Θ‖_2 <= ‖Θ̂ − Θ‖_F)."""
        return float(jnp.sqrt(jnp.sum(jnp.square(self.stderr_bound))))


# ----------------------------------------------------------------------------- kernels


def _ntk_jacobian_contraction(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None,
    lay: _OutputLayout,
    n1: int,
    n2: int,
    *,
    chunk_size: int | None,
    jacobian_dtype: Any,
    precision: Any,
) -> jax.Array:
    """Jacobian contraction, block by block.

    Per-example Jacobians J_i = ∂f(x_i)/∂θ (shape A·C x P) are computed for a chunk of c
    examples by `vmap(jacrev)` of f on single examples, then contracted leaf by leaf into the
    (c x c) Gram block. Cost with nb = ceil(N / c):
      FLOPs  ≈ (1 + nb (nb − 1)/2) · c · A·C · [fwd + bwd of one example]  (x2 None; nb when
             nb <= 2) or nb1 (1 + nb2) · c · A·C · [fwd + bwd] (x2 given), plus 2 N1 N2 A² C P
             for the Gram blocks.
      memory ≈ 2 · c · A·C · P Jacobian entries (one block when nb = 1; in `jacobian_dtype`,
             e.g. bf16 halves it; the Gram is accumulated in float32 or wider) + the
             activations of c examples.
    `chunk_size` arrives resolved (an int, or None for all examples at once).
    """
    acc = _acc_dtype(params)
    chunk = min(chunk_size or max(n1, n2), max(n1, n2))
    scalar = loss_kernel_f(f, lay, x2, jacobian_dtype)
    if scalar is not None:  # per-example gradients where the backward pass leaves them
        theta = _ntk_blocks.scalar_symmetric_kernel(scalar, params, x1, n1, chunk, acc, precision)
        return theta[:, :, None, None]
    jac = per_example_jacobian(f, params, lay, jacobian_dtype)
    if x2 is None:
        return _ntk_blocks.symmetric_kernel(
            jac, x1, n1, chunk, (lay.n_untraced, lay.n_untraced), acc, precision
        )
    return _ntk_blocks.cross_kernel(jac, x1, x2, n1, n2, chunk, acc, precision)


def _ntk_vector_products(f, params, x1, x2, lay, n1, n2, *, chunk_size, **_) -> jax.Array:
    """Matrix-free: k = `chunk_size` examples of x2 per step, each column Θ e_j = J1 (J2ᵀ e_j)
    by example j's own vjp and a jvp of the x1 batch (`_ntk_routes.matrix_free`). Cost: N2
    per-example gradients + N1·N2·A·C example tangents; memory k·A·C tangents."""
    return _ntk_routes.matrix_free(f, params, x1, x2, lay, n1, n2, chunk=chunk_size or n2)


def _ntk_sketch(f, params, x1, x2, lay, n1, n2, key, *, chunk_size, jacobian_dtype, sketch_dim):
    """Count sketch (`_ntk_routes.sketch`): (Θ̂, stderr bound); one gradient pass."""
    return _ntk_routes.sketch(
        f, params, x1, x2, lay, n1, n2, chunk=chunk_size or max(n1, n2), sketch_dim=sketch_dim,
        key=key, jacobian_dtype=jacobian_dtype,
    )  # fmt: skip


def _dispatch(f, params, x1, x2, key, *, route, lay, n1, n2, chunk_size, with_bound, **kw):
    if route == "sketch":
        theta, bound = _ntk_sketch(
            f, params, x1, x2, lay, n1, n2, key, chunk_size=chunk_size,
            jacobian_dtype=kw["jacobian_dtype"], sketch_dim=kw["sketch_dim"],
        )  # fmt: skip
        return (theta, bound) if with_bound else theta
    if route == "ntk_vector_products":
        return _ntk_vector_products(f, params, x1, x2, lay, n1, n2, chunk_size=chunk_size)
    kw.pop("sketch_dim")
    return _ntk_jacobian_contraction(f, params, x1, x2, lay, n1, n2, chunk_size=chunk_size, **kw)


def _route_name(implementation: NtkImplementation | str) -> str:
    value = implementation
    if isinstance(implementation, NtkImplementation):
        value = implementation.value
    if value not in ROUTE_NAMES:
        raise NTKError(
            f"unknown NTK implementation {implementation!r}; use one of {list(ROUTE_NAMES)}"
        )
    return str(value)


def empirical_ntk_fn(
    f: ApplyFn,
    *,
    trace_axes: Sequence[int] | None = None,
    implementation: NtkImplementation | str = "auto",
    chunk_size: ChunkSize = "auto",
    jacobian_dtype: Any = None,
    precision: Any = None,
    memory_budget_bytes: int | None = None,
    allow_sketch: bool = False,
    max_exact_passes: float = MAX_EXACT_PASSES,
    sketch_dim: int = SKETCH_DIM,
    sketch_seed: int = 0,
) -> KernelFn:
    """Return `kernel_fn(params, x1, x2=None, *, name=None) -> Θ` for `f(params, x)`.

    Θ[i, j, a, b] = Σ_{c ∈ traced} ⟨∂f(x1_i)[a, c]/∂θ, ∂f(x2_j)[b, c]/∂θ⟩, shape
    (N1, N2, *untraced, *untraced); x2=None means x2 = x1 (symmetric, cheaper).

    Args:
      f: pure function; every example of the batch must be processed independently.
      trace_axes: output axes (of the full (N, *out) output, not 0) summed over; None = all.
      implementation: "auto" (default), an `NtkImplementation` (or its value) or "sketch";
        routes and costs in the module docstring, the choice in `_ntk_memory.plan_ntk`.
      chunk_size: examples per Jacobian block (blocks), x2 examples per batched jvp
        (matrix-free) or examples per sketch step; "auto" (default) = the largest the memory
        budget allows (2 · c · A·C · P · itemsize bytes, or c · ... for one symmetric block of
        all N); None = all N at once. An int with implementation="auto" means blocks.
      jacobian_dtype: e.g. jnp.bfloat16 to store per-example Jacobians in bf16 (half memory
        and Gram bandwidth); the Gram is always accumulated in float32 or wider. Pass bf16
        params to make the backward passes themselves bf16.
      precision: `lax.Precision` for the Gram contractions (e.g. HIGHEST to avoid TF32 on GPU).
      memory_budget_bytes: bytes the route's parameter-sized buffers may take (default: from
        the device, see `memory_budget`; `lensllm run` passes what the host has available).
      allow_sketch: let "auto" pick the sketch when the exact kernel would cost more than
        `max_exact_passes` per-example gradient passes (an approximation: opt in).
      sketch_dim, sketch_seed: buckets and seed of the sketch (relative standard error
        ≈ sqrt(2 / sketch_dim); `sketched_ntk` also returns its per-entry bound; the seed is
        an argument of the compiled program, not a constant).

    The returned function is jittable (shape checks at trace time); outside `jit` it also
    checks the kernel for NaN/inf and names `name` in the error. `kernel_fn.plan(params, x1,
    x2=None)` returns the `NtkPlan` (route, chunk, passes, memory) a call would use. Keep and
    reuse it: it compiles once per input shape (`empirical_ntk` caches one per (f, options)).
    """
    route = _route_name(implementation)
    if chunk_size is not None and chunk_size != "auto":
        if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise NTKError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
        chunk_size = int(chunk_size)
    if memory_budget_bytes is not None:
        memory_budget(memory_budget_bytes)  # validate now, not at the first call
    if not isinstance(sketch_dim, int | np.integer) or sketch_dim < 1:
        raise NTKError(f"sketch_dim must be a positive int, got {sketch_dim!r}")

    # One compiled program per factory and input shapes (a no-op under an outer jit); eager
    # op-by-op dispatch would compile every scan and jacobian separately.
    compiled = jax.jit(
        functools.partial(
            _dispatch,
            f,
            jacobian_dtype=jacobian_dtype,
            precision=precision,
            sketch_dim=int(sketch_dim),
        ),
        static_argnames=("route", "lay", "n1", "n2", "chunk_size", "with_bound"),
    )

    def resolve(params: PyTree, x1: PyTree, x2: PyTree | None, name=None):
        n1 = _batch_size(x1, "x1", name)
        n2 = n1
        if x2 is not None:
            n2 = _batch_size(x2, "x2", name)
            _check_same_structure(x1, x2, name)
        try:
            out = jax.eval_shape(f, params, x1)
        except Exception as err:  # any tracing failure becomes one line naming the candidate
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NTKError(f"f(params, x1){_where(name)} failed to trace: {first}") from err
        if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 1 or out.shape[0] != n1:
            got = getattr(out, "shape", type(out).__name__)
            raise NTKError(
                f"f(params, x1){_where(name)} must return one array with leading batch axis "
                f"{n1}, got {got}"
            )
        lay = _layout(out.shape, _normalise_trace_axes(trace_axes, out.ndim, name))
        per_example = jacobian_bytes_per_example(
            params, lay.n_untraced * lay.n_traced, jacobian_dtype
        )
        budget = memory_budget(memory_budget_bytes)
        fixed = max(n1, n2) if chunk_size is None else chunk_size
        plan = plan_ntk(
            n1, n2, per_example, budget, symmetric=x2 is None, route=route,
            chunk=None if fixed == "auto" else fixed, allow_sketch=allow_sketch,
            max_exact_passes=max_exact_passes, sketch_dim=int(sketch_dim),
        )  # fmt: skip
        return plan, lay, n1, n2

    host_cache: dict[tuple, _ntk_blocks.HostPrograms] = {}

    def run(params, x1, x2=None, *, name=None, with_bound=False, seed=None):
        """(Θ, stderr bound or None, plan); the bound only for the sketch with with_bound."""
        plan, lay, n1, n2 = resolve(params, x1, x2, name)
        scalar = loss_kernel_f(f, lay, x2, jacobian_dtype)
        if plan.route == "jacobian_contraction" and scalar and _is_concrete((params, x1)):
            # Outside jit, the loss kernel's blocks are driven from Python over per-example
            # gradients in their natural layout (the plan's memory).
            theta = _ntk_blocks.host_symmetric_kernel(
                scalar, host_cache, params, x1, n1, plan.chunk or n1, _acc_dtype(params),
                precision, key=lay,
            )  # fmt: skip
            theta = jnp.asarray(_finish(theta[:, :, None, None], lay))  # type: ignore[arg-type]
            _check_finite(theta, "empirical NTK", name)
            return theta, None, plan
        key = jax.random.key(sketch_seed if seed is None else seed)
        with_bound = with_bound and plan.route == "sketch"
        out = compiled(
            params, x1, x2, key, route=plan.route, lay=lay, n1=n1, n2=n2, chunk_size=plan.chunk,
            with_bound=with_bound,
        )  # fmt: skip
        theta, bound = out if with_bound else (out, None)
        theta = _finish(theta, lay)
        if _is_concrete(theta):
            _check_finite(theta, "empirical NTK", name)
        return theta, None if bound is None else _finish(bound, lay), plan

    def kernel_fn(params: PyTree, x1: PyTree, x2: PyTree | None = None, *, name=None):
        return run(params, x1, x2, name=name)[0]

    def plan_of(params: PyTree, x1: PyTree, x2: PyTree | None = None) -> NtkPlan:
        return resolve(params, x1, x2)[0]

    kernel_fn.plan = plan_of  # type: ignore[attr-defined]
    kernel_fn._run = run  # type: ignore[attr-defined]
    return kernel_fn


def empirical_ntk(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    implementation: NtkImplementation | str = "auto",
    trace_axes: Sequence[int] | None = None,
    chunk_size: ChunkSize = "auto",
    jacobian_dtype: Any = None,
    precision: Any = None,
    memory_budget_bytes: int | None = None,
    allow_sketch: bool = False,
    sketch_dim: int = SKETCH_DIM,
    name: str | None = None,
) -> jax.Array:
    """Θ = J(x1) J(x2)ᵀ traced over `trace_axes`; see `empirical_ntk_fn` for every argument.

    The kernel function is cached per (f, options), so calling again with the same `f` (other
    parameters, other inputs of the same shapes) reuses its compiled program."""
    return _kernel_fn(
        f, trace_axes, implementation, chunk_size, jacobian_dtype, precision,
        memory_budget_bytes, allow_sketch, sketch_dim,
    )(params, x1, x2, name=name)  # fmt: skip


def _kernel_fn(f, trace_axes, *options) -> KernelFn:
    key = (tuple(trace_axes) if isinstance(trace_axes, list) else trace_axes, *options)
    try:
        return _cached_ntk_fn(f, *key)
    except TypeError:  # an unhashable option: no caching
        return _cached_ntk_fn.__wrapped__(f, *key)


@functools.lru_cache(maxsize=32)
def _cached_ntk_fn(
    f, trace_axes, implementation, chunk_size, jacobian_dtype, precision, budget, allow_sketch,
    sketch_dim,
):  # fmt: skip
    return empirical_ntk_fn(
        f,
        trace_axes=trace_axes,
        implementation=implementation,
        chunk_size=chunk_size,
        jacobian_dtype=jacobian_dtype,
        precision=precision,
        memory_budget_bytes=budget,
        allow_sketch=allow_sketch,
        sketch_dim=sketch_dim,
    )


def sketched_ntk(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    trace_axes: Sequence[int] | None = None,
    sketch_dim: int = SKETCH_DIM,
    seed: int = 0,
    chunk_size: ChunkSize = "auto",
    jacobian_dtype: Any = None,
    memory_budget_bytes: int | None = None,
    name: str | None = None,
) -> SketchedNTK:
    """The count-sketched kernel Θ̂ with its error bound, in one per-example gradient pass.

    Θ̂_ij = ⟨S g_i, S g_j⟩ for S: R^P -> R^k folding each gradient into k = `sketch_dim`
    buckets with independent random signs (`seed`). Over the signs, E[Θ̂] = Θ and
    sd(Θ̂_ij) <= stderr_bound_ij = sqrt(2 Σ_b u_ib u_jb), u_ib the squared gradient mass of
    example i in bucket b (≈ sqrt(2/k) ‖g_i‖ ‖g_j‖ when spread evenly); see `_ntk_routes`.
    Cost: one per-example gradient pass in chunks (`chunk_size`, "auto" from the memory
    budget) + two O(P) folds per example; memory chunk · P + N · k.
    """
    kfn = _kernel_fn(
        f, trace_axes, "sketch", chunk_size, jacobian_dtype, None, memory_budget_bytes, False,
        sketch_dim,
    )  # fmt: skip
    theta, bound, plan = kfn._run(params, x1, x2, name=name, with_bound=True, seed=seed)  # type: ignore[attr-defined]
    assert bound is not None
    return SketchedNTK(theta, bound, plan)


def ntk_vp(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    v: jax.Array,
    x2: PyTree | None = None,
    *,
    trace_axes: Sequence[int] | None = None,
    name: str | None = None,
) -> jax.Array:
    """Kernel-vector product (Θ(x1, x2) v)[i, a] = Σ_{j, b} Θ[i, j, a, b] v[j, b], matrix-free.

    v has shape (N2, *untraced); the result (N1, *untraced). Each traced output index c needs its
    own vjp/jvp pair (Θ = Σ_c J_c J_cᵀ), done sequentially by `lax.map`.
    Cost: C · ([bwd of f on N2] + [jvp of f on N1]) FLOPs, memory of one parameter-sized
    tangent plus the linearisation residuals of both batches. Never forms Θ or a Jacobian.
    """
    n1 = _batch_size(x1, "x1", name)
    xs2 = x1 if x2 is None else x2
    n2 = _batch_size(xs2, "x2", name)
    if x2 is not None:
        _check_same_structure(x1, x2, name)
    out = jax.eval_shape(f, params, x1)
    lay = _layout(out.shape, _normalise_trace_axes(trace_axes, out.ndim, name))
    v = jnp.asarray(v)
    if v.shape != (n2, *lay.untraced_shape):
        raise NTKError(
            f"v{_where(name)} has shape {v.shape}, expected (N2, *untraced) = "
            f"{(n2, *lay.untraced_shape)}"
        )

    @jax.jit
    def apply(params, x1, xs2, v):
        _, vjp2 = jax.vjp(lambda p: _as_ac(f(p, xs2), lay), params)
        _, jvp1 = jax.linearize(lambda p: _as_ac(f(p, x1), lay), params)
        vf = v.reshape(n2, lay.n_untraced).astype(out.dtype)

        def one_traced_index(c):
            e = jnp.zeros((n2, lay.n_untraced, lay.n_traced), out.dtype).at[:, :, c].set(vf)
            (w,) = vjp2(e)
            return jnp.take(jvp1(w), c, axis=2)  # (N1, A)

        return jax.lax.map(one_traced_index, jnp.arange(lay.n_traced)).sum(axis=0)

    return apply(params, x1, xs2, v).reshape(n1, *lay.untraced_shape)


# ----------------------------------------------------------------------------- LM helpers


def loss_gradient_kernel(
    per_example_loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch1: PyTree,
    batch2: PyTree | None = None,
    **kwargs: Any,
) -> jax.Array:
    """Loss-gradient kernel Θ_ij = ⟨∇θ ℓ(x_i), ∇θ ℓ(x_j)⟩, (N1, N2).

    `per_example_loss(params, batch) -> (N,)` (e.g. the model zoo's mean token cross-entropy per
    sequence). Keyword arguments go to `empirical_ntk` (implementation, chunk_size,
    jacobian_dtype, name, ...). Jacobian contraction costs about one per-example-gradient pass
    over the batch (≈ one batched gradient in FLOPs) plus 2 N1 N2 P for the Gram.
    """
    return empirical_ntk(per_example_loss, params, batch1, batch2, trace_axes=None, **kwargs)


def logit_kernel(
    token_logprobs: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch1: PyTree,
    batch2: PyTree | None = None,
    **kwargs: Any,
) -> jax.Array:
    """Logit kernel Θ_ij = Σ_t ⟨∇θ log p(y_it | x_i,<t), ∇θ log p(y_jt | x_j,<t)⟩, (N1, N2).

    `token_logprobs(params, batch) -> (N, T)` target-token log-probabilities (0 at padding);
    traced over positions. Jacobian contraction costs T backward passes per example (memory
    c · T · P per chunk), so keep `chunk_size` small or use NTK_VECTOR_PRODUCTS.
    """
    return empirical_ntk(token_logprobs, params, batch1, batch2, trace_axes=None, **kwargs)


def causal_lm_token_logprobs(
    apply: Callable[[PyTree, jax.Array], jax.Array],
) -> Callable[[PyTree, jax.Array], jax.Array]:
    """From `apply(params, tokens (N, T)) -> logits (N, T, V)` build
    `token_logprobs(params, tokens) -> (N, T - 1)`, log p(tokens[:, t+1] | tokens[:, :t+1])."""

    def token_logprobs(params: PyTree, tokens: jax.Array) -> jax.Array:
        logits = apply(params, tokens)[:, :-1]
        # at least float32 (bf16 logits lose the tail of the softmax); float64 stays float64
        logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return token_logprobs
