"""Block-wise Gram accumulation for the Jacobian-contraction eNTK (private).

Per-example Jacobians are computed one chunk of `c` examples at a time and contracted leaf by
leaf (no ravel / concatenate of parameters, which would copy every per-example gradient). At
most two chunks of Jacobians are alive at once: a "row" block R and a "column" block C.

Symmetric schedule (x2 is None), nb = ceil(N / c) blocks: row i is held while the columns are
visited from the last down to i + 1; the last column computed (i + 1) is promoted to be the next
row, so the kernel costs 1 + nb (nb - 1) / 2 chunk Jacobians instead of the nb^2 of a naive
double loop (exactly nb when nb <= 2). For nb <= UNROLL_MAX_BLOCKS the schedule is unrolled;
beyond that it runs inside one `lax.scan` whose first step is block 0 itself, so the model
appears once in the program and every block's backward pass reuses one set of temporaries.

A scalar per example (the loss kernel) takes its per-example gradients in the layout the
backward pass leaves them (`_ntk_layout.per_example_grads`: a scanned stack's leaves keep
their example axis at 1; vmap's default moves it to the front, a copy of most of a chunk),
contracted where they lie (`gram_at_axes`), and is scanned from two blocks on: unrolled,
XLA merges the two identical computations of block 2 at nb = 3 and runs independent blocks
side by side (`benchmarks/bench_ntk_jit_memory.py` measures what a program holds). Under
`jit` that is `scalar_symmetric_kernel`; called outside `jit` (as `lensllm run` does), the
same schedule runs from Python over two compiled programs (`host_symmetric_kernel`), where
buffers die with their Python references.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.core._ntk_layout import per_example_grads
from lensllm_jax.core._pytree import signature

PyTree = Any
# Up to this many blocks the schedule is unrolled at trace time (the model appears
# 1 + nb (nb − 1) / 2 times in the program); beyond it a `lax.scan` keeps one copy.
UNROLL_MAX_BLOCKS = 3
JacFn = Callable[
    [PyTree], PyTree
]  # chunk of inputs (c, ...) -> per-example Jacobians (c, A, C, *leaf)


def gram(j1: PyTree, j2: PyTree, acc_dtype: Any, precision: Any = None) -> jax.Array:
    """Σ_leaves Σ_{c,p} J1[i,a,c,p] J2[j,b,c,p] -> (c1, c2, A, B); 2 c1 c2 A B C P FLOPs."""
    total = None
    leaves1, leaves2 = jax.tree.leaves(j1), jax.tree.leaves(j2)
    (c1, a), (c2, b) = leaves1[0].shape[:2], leaves2[0].shape[:2]
    for l1, l2 in zip(leaves1, leaves2, strict=True):
        # (c1·A, C·P) x (c2·B, C·P)ᵀ: contiguous reshapes, one plain matmul, no transposed
        # copy of the Jacobians (a 4-d einsum was ~3x slower on CPU).
        g = jax.lax.dot_general(
            l1.reshape(c1 * a, -1),
            l2.reshape(c2 * b, -1),
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=acc_dtype,
        )
        total = g if total is None else total + g
    assert total is not None
    return total.reshape(c1, a, c2, b).transpose(0, 2, 1, 3)


def pad_and_block(x: PyTree, chunk: int) -> tuple[PyTree, int]:
    """Pad the batch axis to a multiple of `chunk` (repeating the last example) and reshape each
    leaf to (nb, chunk, ...). Returns the blocked tree and nb."""
    n = jax.tree.leaves(x)[0].shape[0]
    nb = -(-n // chunk)
    pad = nb * chunk - n

    def blk(leaf: jax.Array) -> jax.Array:
        if pad:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)], axis=0)
        return leaf.reshape(nb, chunk, *leaf.shape[1:])

    return jax.tree.map(blk, x), nb


def _unblock(theta_blocks: Any, n1: int, n2: int) -> Any:
    """(nb1, nb2, c1, c2, A, B) -> (n1, n2, A, B); a jax or a numpy array."""
    nb1, nb2, c1, c2 = theta_blocks.shape[:4]
    t = theta_blocks.transpose(0, 2, 1, 3, 4, 5).reshape(
        nb1 * c1, nb2 * c2, *theta_blocks.shape[4:]
    )
    return t[:n1, :n2]


def symmetric_kernel(
    jac: JacFn,
    x: PyTree,
    n: int,
    chunk: int,
    shape_ab: tuple[int, int],
    acc_dtype: Any,
    precision,
    pair_gram: Callable[[PyTree, PyTree], jax.Array] | None = None,
    unroll_max_blocks: int = UNROLL_MAX_BLOCKS,
) -> jax.Array:
    """Θ(x, x) with the promoted-row schedule described in the module docstring.
    `pair_gram(j1, j2) -> (c, c, A, B)` contracts two chunks of `jac`'s output (default
    `gram`, for the (c, A, C, *leaf) layout of `_ntk_layout.per_example_jacobian`); up to
    `unroll_max_blocks` blocks the schedule is unrolled, beyond it scanned."""
    if pair_gram is None:
        pair_gram = lambda j1, j2: gram(j1, j2, acc_dtype, precision)  # noqa: E731
    xb, nb = pad_and_block(x, chunk)
    a, b = shape_ab
    take = lambda i: jax.tree.map(lambda leaf: leaf[i], xb)  # noqa: E731
    theta = jnp.zeros((nb, nb, chunk, chunk, a, b), acc_dtype)
    steps = [(i, j, j == i + 1) for i in range(nb - 1) for j in range(nb - 1, i, -1)]
    if nb <= unroll_max_blocks:
        r_jac = jac(take(0))
        theta = theta.at[0, 0].set(pair_gram(r_jac, r_jac))
        for i, j, prom in steps:
            c_jac = jac(take(j))
            g = pair_gram(r_jac, c_jac)
            theta = theta.at[i, j].set(g).at[j, i].set(g.transpose(1, 0, 3, 2))
            if prom:
                theta = theta.at[j, j].set(pair_gram(c_jac, c_jac))
                r_jac = c_jac
        return _unblock(theta, n, n)
    # Block 0 is the scan's first step too (against a zero row, promoted at once), so the
    # model appears once in the program and every block's backward pass reuses one set of
    # temporaries.
    rows, cols, promote = (np.asarray(s) for s in zip((0, 0, True), *steps, strict=True))
    zero_row = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(jac, take(0)))

    def body(carry, step):
        r_jac, th = carry
        i, j, prom = step
        c_jac = jac(take(j))
        g = pair_gram(r_jac, c_jac)
        th = th.at[i, j].set(g).at[j, i].set(g.transpose(1, 0, 3, 2))
        # Promote C to be the next row block: its diagonal block is needed exactly then.
        r_jac, th = jax.lax.cond(
            prom,
            lambda: (c_jac, th.at[j, j].set(pair_gram(c_jac, c_jac))),
            lambda: (r_jac, th),
        )
        return (r_jac, th), None

    (_, theta), _ = jax.lax.scan(body, (zero_row, theta), (rows, cols, promote))
    return _unblock(theta, n, n)


def scalar_symmetric_kernel(
    f_scalar: Callable, params: PyTree, x: PyTree, n: int, chunk: int, acc_dtype: Any, precision
) -> jax.Array:
    """Θ(x, x) (N, N) of `f_scalar(params, batch) -> (N,)` in one program (under `jit`):
    `symmetric_kernel` on per-example gradients in the layout the backward pass leaves them
    (`_ntk_layout.per_example_grads`), contracted where they lie (`gram_at_axes`), scanned
    from two blocks on (see the module docstring). Cost as `symmetric_kernel`."""
    spec = lambda a, shape=None: jax.ShapeDtypeStruct(shape or a.shape, a.dtype)  # noqa: E731
    x0 = jax.tree.map(lambda a: spec(a, (chunk, *a.shape[1:])), x)
    grads_fn, axes = per_example_grads(f_scalar, jax.tree.map(spec, params), x0)
    theta = symmetric_kernel(
        lambda xc: grads_fn(params, xc), x, n, chunk, (1, 1), acc_dtype, precision,
        pair_gram=lambda g1, g2: gram_at_axes(g1, g2, axes, acc_dtype, precision)[..., None, None],
        unroll_max_blocks=1,
    )  # fmt: skip
    return theta[:, :, 0, 0]


def cross_kernel(
    jac: JacFn,
    x1: PyTree,
    x2: PyTree,
    n1: int,
    n2: int,
    chunk: int,
    acc_dtype: Any,
    precision,
) -> jax.Array:
    """Θ(x1, x2): hold one row block of x1, stream the column blocks of x2.

    Costs nb1 + nb1 nb2 chunk Jacobians (choose chunk >= n2 to make it nb1 + nb1)."""
    x1b, _ = pad_and_block(x1, chunk)
    x2b, _ = pad_and_block(x2, chunk)

    def row(x1_chunk):
        r_jac = jac(x1_chunk)
        return jax.lax.map(lambda x2_chunk: gram(r_jac, jac(x2_chunk), acc_dtype, precision), x2b)

    theta = jax.lax.map(row, x1b)  # (nb1, nb2, c, c, A, B)
    return _unblock(theta, n1, n2)


def gram_at_axes(t1: PyTree, t2: PyTree, axes: PyTree, acc_dtype: Any, precision: Any = None):
    """Σ_leaves ⟨g1_i, g2_j⟩ -> (c1, c2) for per-example gradients whose example axis is
    `axes` (per leaf, `_ntk_layout.per_example_grads`): the axes before it are dot_general
    batch axes (summed after), the ones after it contracted; no transposed copy."""
    total = None
    for l1, l2, k in zip(*(jax.tree.leaves(t) for t in (t1, t2, axes)), strict=True):
        a1, a2 = l1.reshape(*l1.shape[: k + 1], -1), l2.reshape(*l2.shape[: k + 1], -1)
        batch = tuple(range(k))
        g = jax.lax.dot_general(
            a1, a2, (((k + 1,), (k + 1,)), (batch, batch)),
            precision=precision, preferred_element_type=acc_dtype,
        )  # fmt: skip
        g = g.sum(batch) if k else g
        total = g if total is None else total + g
    assert total is not None
    return total


class HostPrograms(NamedTuple):
    """The two compiled programs of the host-driven schedule (`symmetric_kernel_host`)."""

    first: Callable  # (params, x_chunk) -> (Θ_CC, G_C)
    step: Callable  # (params, g_r, x_chunk) -> (Θ_RC, Θ_CC, G_C)


def host_programs(grads_fn: Callable, axes: PyTree, acc_dtype: Any, precision: Any) -> HostPrograms:
    """Compiled steps over per-example gradients in their natural layout (`grads_fn`, `axes`
    from `_ntk_layout.per_example_grads`). Cost of a step: one chunk of per-example gradients
    + two c x c Gram blocks; memory: G_R (an input) + G_C + one chunk's activations."""

    @jax.jit
    def first(params: PyTree, x_chunk: PyTree):
        g_c = grads_fn(params, x_chunk)
        return gram_at_axes(g_c, g_c, axes, acc_dtype, precision), g_c

    @jax.jit
    def step(params: PyTree, g_r: PyTree, x_chunk: PyTree):
        g_c = grads_fn(params, x_chunk)
        g_rc = gram_at_axes(g_r, g_c, axes, acc_dtype, precision)
        return g_rc, gram_at_axes(g_c, g_c, axes, acc_dtype, precision), g_c

    return HostPrograms(first, step)


def symmetric_kernel_host(
    programs: HostPrograms, params: PyTree, x: PyTree, n: int, chunk: int
) -> np.ndarray:
    """Θ(x, x) (N, N) of a scalar-per-example f by the promoted-row schedule of
    `symmetric_kernel`, driven from Python over two compiled programs (`host_programs`):
    buffers die with their Python references, so at most two chunks of per-example gradients
    are alive, in the layout the backward pass leaves them. Outside `jit` only (under `jit`:
    `scalar_symmetric_kernel`). The same 1 + nb (nb − 1) / 2 chunk gradients (nb when
    nb <= 2)."""
    treedef = jax.tree.structure(x)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(x)]
    nb = -(-n // chunk)
    if nb * chunk > n:  # pad with the last example, as `pad_and_block`
        leaves = [np.concatenate([a, np.repeat(a[-1:], nb * chunk - n, 0)]) for a in leaves]

    def take(i: int) -> PyTree:
        return jax.tree.unflatten(treedef, [a[i * chunk : (i + 1) * chunk] for a in leaves])

    diag, g_r = programs.first(params, take(0))
    theta = np.zeros((nb, nb, *np.shape(diag)), np.asarray(diag).dtype)
    theta[0, 0] = np.asarray(diag)
    for i in range(nb - 1):
        for j in range(nb - 1, i, -1):  # the last column visited (i + 1) becomes the next row
            g, diag, g_c = programs.step(params, g_r, take(j))
            theta[i, j] = np.asarray(g)
            theta[j, i] = theta[i, j].T
            if j == i + 1:
                theta[j, j], g_r = np.asarray(diag), g_c
            del g_c  # the column's gradients go now, unless promoted
    return _unblock(theta[..., None, None], n, n)[:, :, 0, 0]


def host_symmetric_kernel(
    f_scalar: Callable, cache: dict, params: PyTree, x: PyTree, n: int, chunk: int,
    acc_dtype: Any, precision: Any, key: Any = None,
) -> np.ndarray:  # fmt: skip
    """Θ(x, x) (N, N) of `f_scalar(params, batch) -> (N,)` by `symmetric_kernel_host`; the
    programs (and the per-example gradients' natural axes, one extra trace) are built once
    per shapes and `key` and kept in `cache`."""
    x0 = jax.tree.map(lambda leaf: np.asarray(leaf)[:chunk], x)
    k = (signature(params), signature(x0), key)
    if k not in cache:
        grads_fn, axes = per_example_grads(f_scalar, params, x0)
        cache[k] = host_programs(grads_fn, axes, acc_dtype, precision)
    return symmetric_kernel_host(cache[k], params, x, n, chunk)
