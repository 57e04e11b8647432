"""Empirical neural tangent kernels and the NTK test loss F(Θ, t) of LENSLLM.

Kernel. For a function f(params, x) that maps a batch x (every leaf has a leading batch axis N)
to outputs of shape (N, *out), acting on each example independently (no batch statistics),

    Θ[i, j, a, b] = Σ_c Σ_p ∂f(x1_i)[a, c] / ∂θ_p · ∂f(x2_j)[b, c] / ∂θ_p

where c runs over the output axes in `trace_axes` and a, b over the remaining ("untraced")
output axes. The result has shape (N1, N2, *untraced, *untraced); with the default
`trace_axes=None` every output axis is traced and Θ is (N1, N2).

Two implementations (neural-tangents `empirical.py` style, dispatched by a dict):

* `JACOBIAN_CONTRACTION`: per-example Jacobians in chunks of `chunk_size` examples, the Gram
  matrix accumulated block by block (at most two chunks of Jacobians alive; never all N).
  `chunk_size="auto"` (default) takes the largest chunk whose two Jacobian blocks fit a memory
  budget (`memory_budget`, `auto_chunk_size`).
* `NTK_VECTOR_PRODUCTS`: matrix-free, Θ e_k = J1 (J2ᵀ e_k) by a vjp then a jvp, one column per
  basis vector; `ntk_vp` exposes the kernel-vector product Θ v itself for large N.

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

from lensllm_jax.core import _ntk_blocks
from lensllm_jax.core._ntk_checks import (
    _batch_size,
    _check_finite,
    _check_same_structure,
    _is_concrete,
    _normalise_trace_axes,
    _where,
)
from lensllm_jax.core._ntk_memory import (
    DEVICE_MEMORY_FRACTION,
    HOST_MEMORY_BUDGET,
    auto_chunk_size,
    jacobian_bytes_per_example,
    memory_budget,
    parse_bytes,
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
    "KernelDiagnostics",
    "NTKError",
    "NTKFeatures",
    "NtkImplementation",
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
]

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]
KernelFn = Callable[..., jax.Array]
ChunkSize = int | str | None  # examples per Jacobian block, "auto" (memory budget) or None (all)


class NtkImplementation(enum.Enum):
    """How the empirical NTK is computed (see each `_ntk_*` function for its cost)."""

    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"


# ----------------------------------------------------------------------------- kernels


class _OutputLayout(NamedTuple):
    n_untraced: int  # A = prod of untraced output dims
    n_traced: int  # C = prod of traced output dims
    untraced_shape: tuple[int, ...]
    perm: tuple[int, ...]  # permutation of per-example output axes: untraced then traced


def _layout(out_shape: tuple[int, ...], axes: tuple[int, ...]) -> _OutputLayout:
    per_ex = out_shape[1:]
    traced = [a - 1 for a in axes]
    untraced = [a for a in range(len(per_ex)) if a not in traced]
    ushape = tuple(per_ex[a] for a in untraced)
    return _OutputLayout(
        int(np.prod(ushape, dtype=int)),
        int(np.prod([per_ex[a] for a in traced], dtype=int)),
        ushape,
        tuple(untraced + traced),
    )


def _as_ac(y: jax.Array, lay: _OutputLayout) -> jax.Array:
    """(n, *out) -> (n, A, C)."""
    y = jnp.transpose(y, (0, *(p + 1 for p in lay.perm)))
    return y.reshape(y.shape[0], lay.n_untraced, lay.n_traced)


def _finish(theta: jax.Array, lay: _OutputLayout) -> jax.Array:
    """(N1, N2, A, B) -> (N1, N2, *untraced, *untraced)."""
    return theta.reshape(*theta.shape[:2], *lay.untraced_shape, *lay.untraced_shape)


def _acc_dtype(params: PyTree) -> Any:
    dts = [jnp.asarray(p).dtype for p in jax.tree.leaves(params)]
    return jnp.promote_types(jnp.result_type(*dts), jnp.float32)


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
      memory ≈ 2 · c · A·C · P Jacobian entries (in `jacobian_dtype`, e.g. bf16 halves it; the
             Gram is accumulated in float32 or wider) + the activations of c examples.
    `chunk_size` arrives resolved (an int, or None for all examples at once).
    """
    acc = _acc_dtype(params)
    chunk = min(chunk_size or max(n1, n2), max(n1, n2))

    def f_example(p, xi):
        y = f(p, jax.tree.map(lambda leaf: leaf[None], xi))
        return _as_ac(y, lay)[0]  # (A, C)

    if lay.n_untraced * lay.n_traced == 1:  # scalar per example (loss kernel): plain grad
        per_example = jax.grad(lambda p, xi: f_example(p, xi)[0, 0])
        jac_one = lambda p, xi: jax.tree.map(lambda g: g[None, None], per_example(p, xi))  # noqa: E731
    else:
        jac_one = jax.jacrev(f_example)

    def jac(x_chunk):
        j = jax.vmap(jac_one, in_axes=(None, 0))(params, x_chunk)
        if jacobian_dtype is not None:
            j = jax.tree.map(lambda leaf: leaf.astype(jacobian_dtype), j)
        return j

    if x2 is None:
        return _ntk_blocks.symmetric_kernel(
            jac, x1, n1, chunk, (lay.n_untraced, lay.n_untraced), acc, precision
        )
    return _ntk_blocks.cross_kernel(jac, x1, x2, n1, n2, chunk, acc, precision)


def _ntk_vector_products(
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
    """NTK-vector products: column (j, b, c) of Θ is J1 (J2ᵀ e_{j,b,c}), a vjp then a jvp.

    Matrix-free (never forms a Jacobian; does not need per-example independence). Cost:
      FLOPs  ≈ N2 · A · C · ([bwd of f on the N2 batch] + [jvp of f on the N1 batch]),
      memory ≈ chunk_size parameter-sized tangents + the two linearisations' residuals.
    `chunk_size` columns are vmapped at once (default 1, via `lax.map`).
    """
    del jacobian_dtype, precision
    xs2 = x1 if x2 is None else x2
    _, vjp2 = jax.vjp(lambda p: _as_ac(f(p, xs2), lay), params)
    _, jvp1 = jax.linearize(lambda p: _as_ac(f(p, x1), lay), params)
    a, c = lay.n_untraced, lay.n_traced
    acc = _acc_dtype(params)
    out_dtype = jax.eval_shape(lambda p: f(p, xs2), params).dtype

    def column(k):
        j, rem = jnp.divmod(k, a * c)
        b, cc = jnp.divmod(rem, c)
        e = jnp.zeros((n2, a, c), out_dtype).at[j, b, cc].set(1)
        (w,) = vjp2(e)
        y = jvp1(w)  # (N1, A, C)
        return jnp.take(y, cc, axis=2).astype(acc)  # (N1, A)

    cols = jax.lax.map(column, jnp.arange(n2 * a * c), batch_size=chunk_size or 1)
    theta = cols.reshape(n2, a, c, n1, a).sum(axis=2)  # (N2, B, N1, A)
    return theta.transpose(2, 0, 3, 1)


_IMPLEMENTATIONS: dict[NtkImplementation, Callable[..., jax.Array]] = {
    NtkImplementation.JACOBIAN_CONTRACTION: _ntk_jacobian_contraction,
    NtkImplementation.NTK_VECTOR_PRODUCTS: _ntk_vector_products,
}


def empirical_ntk_fn(
    f: ApplyFn,
    *,
    trace_axes: Sequence[int] | None = None,
    implementation: NtkImplementation | str = NtkImplementation.JACOBIAN_CONTRACTION,
    chunk_size: ChunkSize = "auto",
    jacobian_dtype: Any = None,
    precision: Any = None,
    memory_budget_bytes: int | None = None,
) -> KernelFn:
    """Return `kernel_fn(params, x1, x2=None, *, name=None) -> Θ` for `f(params, x)`.

    Θ[i, j, a, b] = Σ_{c ∈ traced} ⟨∂f(x1_i)[a, c]/∂θ, ∂f(x2_j)[b, c]/∂θ⟩, shape
    (N1, N2, *untraced, *untraced); x2=None means x2 = x1 (symmetric, cheaper).

    Args:
      f: pure function; every example of the batch must be processed independently.
      trace_axes: output axes (of the full (N, *out) output, not 0) summed over; None = all.
      implementation: `NtkImplementation` (or its value string); costs in their docstrings.
      chunk_size: JACOBIAN_CONTRACTION: examples per Jacobian chunk; "auto" (default) = the
        largest chunk whose two Jacobian blocks (2 · c · A·C · P · itemsize bytes) fit
        `memory_budget(memory_budget_bytes)` (see `auto_chunk_size`; on CPU 2 GiB, on a GPU
        half its free memory); None = all N at once. NTK_VECTOR_PRODUCTS: kernel columns
        vmapped at once ("auto" / None = 1).
      jacobian_dtype: e.g. jnp.bfloat16 to store per-example Jacobians in bf16 (half memory
        and Gram bandwidth); the Gram is always accumulated in float32 or wider. Pass bf16
        params to make the backward passes themselves bf16.
      precision: `lax.Precision` for the Gram contractions (e.g. HIGHEST to avoid TF32 on GPU).
      memory_budget_bytes: bytes for the two Jacobian blocks when chunk_size="auto" (default:
        from the device; see `memory_budget`).

    The returned function is jittable (shape checks at trace time); outside `jit` it also
    checks the kernel for NaN/inf and names `name` in the error. Keep and reuse it: it compiles
    once per input shape (`empirical_ntk` caches one per (f, options), so it does too).
    """
    try:
        impl = NtkImplementation(implementation)
    except ValueError:
        raise NTKError(
            f"unknown NTK implementation {implementation!r}; use one of "
            f"{[m.value for m in NtkImplementation]}"
        ) from None
    if chunk_size is not None and chunk_size != "auto":
        if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise NTKError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
        chunk_size = int(chunk_size)
    if memory_budget_bytes is not None:
        memory_budget(memory_budget_bytes)  # validate now, not at the first call

    # One compiled program per factory and input shapes (a no-op under an outer jit); eager
    # op-by-op dispatch would compile every scan and jacobian separately.
    compiled = jax.jit(
        functools.partial(
            _IMPLEMENTATIONS[impl], f, jacobian_dtype=jacobian_dtype, precision=precision
        ),
        static_argnames=("lay", "n1", "n2", "chunk_size"),
    )

    def resolve_chunk(params: PyTree, lay: _OutputLayout, n: int) -> int | None:
        if chunk_size != "auto":
            return chunk_size
        if impl is not NtkImplementation.JACOBIAN_CONTRACTION:
            return None
        per_example = jacobian_bytes_per_example(
            params, lay.n_untraced * lay.n_traced, jacobian_dtype
        )
        return auto_chunk_size(n, per_example, memory_budget(memory_budget_bytes))

    def kernel_fn(params: PyTree, x1: PyTree, x2: PyTree | None = None, *, name=None):
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
        axes = _normalise_trace_axes(trace_axes, out.ndim, name)
        lay = _layout(out.shape, axes)
        chunk = resolve_chunk(params, lay, max(n1, n2))
        theta = compiled(params, x1, x2, lay=lay, n1=n1, n2=n2, chunk_size=chunk)
        theta = _finish(theta, lay)
        if _is_concrete(theta):
            _check_finite(theta, "empirical NTK", name)
        return theta

    return kernel_fn


def empirical_ntk(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    implementation: NtkImplementation | str = NtkImplementation.JACOBIAN_CONTRACTION,
    trace_axes: Sequence[int] | None = None,
    chunk_size: ChunkSize = "auto",
    jacobian_dtype: Any = None,
    precision: Any = None,
    memory_budget_bytes: int | None = None,
    name: str | None = None,
) -> jax.Array:
    """Θ = J(x1) J(x2)ᵀ traced over `trace_axes`; see `empirical_ntk_fn` for every argument.

    The kernel function is cached per (f, options), so calling again with the same `f` (other
    parameters, other inputs of the same shapes) reuses its compiled program."""
    options = (
        tuple(trace_axes) if isinstance(trace_axes, list) else trace_axes,
        implementation,
        chunk_size,
        jacobian_dtype,
        precision,
        memory_budget_bytes,
    )
    try:
        kernel_fn = _cached_ntk_fn(f, *options)
    except TypeError:  # an unhashable option: no caching
        kernel_fn = _cached_ntk_fn.__wrapped__(f, *options)
    return kernel_fn(params, x1, x2, name=name)


@functools.lru_cache(maxsize=32)
def _cached_ntk_fn(f, trace_axes, implementation, chunk_size, jacobian_dtype, precision, budget):
    return empirical_ntk_fn(
        f,
        trace_axes=trace_axes,
        implementation=implementation,
        chunk_size=chunk_size,
        jacobian_dtype=jacobian_dtype,
        precision=precision,
        memory_budget_bytes=budget,
    )


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
