"""Output layout of an NTK: which per-example output axes are traced (summed) and which stay
(private helpers shared by every NTK route)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class OutputLayout(NamedTuple):
    n_untraced: int  # A = prod of untraced output dims
    n_traced: int  # C = prod of traced output dims
    untraced_shape: tuple[int, ...]
    perm: tuple[int, ...]  # permutation of per-example output axes: untraced then traced


def layout(out_shape: tuple[int, ...], axes: tuple[int, ...]) -> OutputLayout:
    per_ex = out_shape[1:]
    traced = [a - 1 for a in axes]
    untraced = [a for a in range(len(per_ex)) if a not in traced]
    ushape = tuple(per_ex[a] for a in untraced)
    return OutputLayout(
        int(np.prod(ushape, dtype=int)),
        int(np.prod([per_ex[a] for a in traced], dtype=int)),
        ushape,
        tuple(untraced + traced),
    )


def as_ac(y: jax.Array, lay: OutputLayout) -> jax.Array:
    """(n, *out) -> (n, A, C)."""
    y = jnp.transpose(y, (0, *(p + 1 for p in lay.perm)))
    return y.reshape(y.shape[0], lay.n_untraced, lay.n_traced)


def finish(theta: jax.Array, lay: OutputLayout) -> jax.Array:
    """(N1, N2, A, B) -> (N1, N2, *untraced, *untraced)."""
    return theta.reshape(*theta.shape[:2], *lay.untraced_shape, *lay.untraced_shape)


def loss_kernel_f(f, lay: OutputLayout, x2: Any, jacobian_dtype: Any):
    """f as `(params, batch) -> (N,)` when the kernel is the loss kernel's kind (one output
    per example, Θ(x, x), gradients in the params' dtype), which the natural-layout schedules
    of `_ntk_blocks` compute; None otherwise."""
    if x2 is not None or lay.n_untraced * lay.n_traced != 1 or jacobian_dtype is not None:
        return None
    return lambda p, x: as_ac(f(p, x), lay)[:, 0, 0]


def acc_dtype(params: PyTree) -> Any:
    """The Gram's accumulation dtype: the params' dtype promoted to at least float32."""
    dts = [jnp.asarray(p).dtype for p in jax.tree.leaves(params)]
    return jnp.promote_types(jnp.result_type(*dts), jnp.float32)


def per_example_jacobian(f, params: PyTree, lay: OutputLayout, jacobian_dtype: Any = None):
    """`jac(x_chunk) -> per-example Jacobians`, a pytree of (c, A, C, *leaf) leaves, by
    `vmap` over the chunk of `jacrev` of f on single examples (`grad` for a scalar output).
    Cost: c per-example backward passes (A·C of them each), ≈ one batched gradient of the
    chunk per output; memory c · A·C · P entries."""

    def f_example(p, xi):
        y = f(p, jax.tree.map(lambda leaf: leaf[None], xi))
        return as_ac(y, lay)[0]  # (A, C)

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

    return jac


def _moved_to_front(eqn: Any) -> int:
    """k if `eqn` is a transpose moving axis k to the front (vmap's moveaxis), else 0."""
    if eqn is None or eqn.primitive.name != "transpose":
        return 0
    perm = tuple(eqn.params["permutation"])
    k = perm[0]
    return k if perm == (k, *range(k), *range(k + 1, len(perm))) else 0


def per_example_grads(f, params: PyTree, x_chunk: PyTree) -> tuple[Any, PyTree]:
    """For a scalar-per-example f: `(grads_fn, axes)`, `grads_fn(params, x_chunk)` the
    per-example gradients with each leaf's example axis where the backward pass leaves it
    (`axes`, a pytree of ints like params): 1 for the leaves a `lax.scan` over layers stacks
    (L, c, ...), 0 elsewhere. Moving it to the front, as `vmap` does by default, copies every
    stacked leaf (for a scanned LM, most of the c·P entries). The axes are read from the
    jaxpr of the default `vmap` (an extra trace, no compile)."""

    def one(p, xi):
        return f(p, jax.tree.map(lambda leaf: leaf[None], xi))[0]

    grad = jax.grad(one)
    jaxpr = jax.make_jaxpr(lambda p, x: jax.vmap(grad, in_axes=(None, 0))(p, x))(params, x_chunk)
    producer = {v: e for e in jaxpr.jaxpr.eqns for v in e.outvars}
    axes = [_moved_to_front(producer.get(v)) for v in jaxpr.jaxpr.outvars]
    axes_tree = jax.tree.unflatten(jax.tree.structure(params), axes)

    def grads_fn(p: PyTree, x: PyTree) -> PyTree:
        return jax.vmap(grad, in_axes=(None, 0), out_axes=axes_tree)(p, x)

    return grads_fn, axes_tree
