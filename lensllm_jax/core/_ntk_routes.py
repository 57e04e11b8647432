"""The NTK routes besides Jacobian blocks (private): matrix-free NTK-vector products and the
count sketch. Both take f on batches whose examples are processed independently.

Matrix-free (exact). Column j of Θ is J1 (J2ᵀ e_j): J2ᵀ e_j is example j's own gradient (a vjp
of f on x2_j alone, since examples are independent), and J1 w is one jvp of f on the whole x1
batch. Chunks of k examples of x2 are done at once: k per-example gradients (k·B·C tangents),
then one jvp of f on x1 vmapped over the tangents (the primal evaluated once per chunk).
Cost: N2 per-example gradients (one pass) + N1·N2·A·C example tangents + ⌈N2/k⌉ forwards of
x1; memory k·A·C parameter-sized tangents and the tangent activations of x1.

Sketch (unbiased, with a stated error bound). Each per-example gradient g ∈ R^P is folded
into k buckets with random signs s_p: (S g)_b = Σ_{p ∈ b} s_p g_p, bucket b given by the
position of p in its leaf (p mod k) rotated by a random per-leaf offset. The entries of one
bucket lie in distinct blocks of k consecutive entries, so a sign per block (and leaf) makes
the signs within every bucket independent, at 1/k of the cost of a sign per entry. Then
Θ̂_ij = ⟨S g_i, S g_j⟩ and, over the signs,

    E[Θ̂_ij] = Θ_ij,   Var[Θ̂_ij] = Σ_b Σ_{p<q ∈ b} (g_ip g_jq + g_iq g_jp)² <= 2 Σ_b u_ib u_jb,

with u_ib = Σ_{p ∈ b} g_ip² (Cauchy–Schwarz; for traced outputs also summed over the traced
index c). `stderr_bound` = sqrt(2 Σ_b u_ib u_jb) is computed in the same pass (a fold of g²);
when the mass spreads over the buckets it is ≈ sqrt(2/k) ‖g_i‖ ‖g_j‖. Cost: one per-example
gradient pass (chunks of c examples) + two O(P) folds per example; memory c·P + N·k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lensllm_jax.core._ntk_blocks import pad_and_block
from lensllm_jax.core._ntk_layout import OutputLayout, acc_dtype, as_ac, per_example_jacobian
from lensllm_jax.core.probes import random_signs

PyTree = Any


def matrix_free(
    f, params: PyTree, x1: PyTree, x2: PyTree | None, lay: OutputLayout, n1: int, n2: int,
    *, chunk: int,
) -> jax.Array:  # fmt: skip
    """Θ (N1, N2, A, B) by per-example vjps of x2 and batched jvps of f on x1 (module doc)."""
    xs2 = x1 if x2 is None else x2
    a, c = lay.n_untraced, lay.n_traced
    acc = acc_dtype(params)
    jac = per_example_jacobian(f, params, lay)

    def f1(p):
        return as_ac(f(p, x1), lay)  # (N1, A, C)

    def columns(x2_chunk):
        w = jac(x2_chunk)  # leaves (k, B, C, *leaf): the tangents
        k = jax.tree.leaves(w)[0].shape[0]
        flat = jax.tree.map(lambda leaf: leaf.reshape(k * a * c, *leaf.shape[3:]), w)
        ys = jax.vmap(lambda t: jax.jvp(f1, (params,), (t,))[1])(flat)  # (k·B·C, N1, A, C)
        ys = ys.reshape(k, a, c, n1, a, c).astype(acc)
        ys = jnp.diagonal(ys, axis1=2, axis2=5).sum(-1)  # Σ_c: (k, B, N1, A)
        return ys.transpose(2, 0, 3, 1)  # (N1, k, A, B)

    xb, nb = pad_and_block(xs2, chunk)
    cols = jax.lax.map(columns, xb)  # (nb, N1, k, A, B)
    theta = cols.transpose(1, 0, 2, 3, 4).reshape(n1, nb * chunk, a, a)
    return theta[:, :n2]


def _tree_sum(m: jax.Array) -> jax.Array:
    """(rows, q, k) -> (rows, k): Σ over q by halving (contiguous adds; a strided reduce over
    the middle axis is several times slower on XLA:CPU)."""
    extra = None
    while m.shape[1] > 1:
        if m.shape[1] % 2:
            extra = m[:, -1] if extra is None else extra + m[:, -1]
            m = m[:, :-1]
        half = m.shape[1] // 2
        m = m[:, :half] + m[:, half:]
    return m[:, 0] if extra is None else m[:, 0] + extra


def _fold(m: jax.Array, k: int, signs: jax.Array | None, offset: jax.Array, acc: Any):
    """(rows, size) -> (rows, k): bucket b = (p mod k) + offset (mod k) of each entry p, the
    q = ⌈size/k⌉ blocks of k entries weighted by `signs` (q,) when given. Entries of one
    bucket lie in distinct blocks, so one sign per block makes their signs independent."""
    pad = (-m.shape[1]) % k
    if pad:
        m = jnp.pad(m, ((0, 0), (0, pad)))
    m = m.reshape(m.shape[0], -1, k).astype(acc)
    if signs is not None:
        m = m * signs[None, :, None]
    return jnp.roll(_tree_sum(m), offset, axis=1)


def sketch(
    f, params: PyTree, x1: PyTree, x2: PyTree | None, lay: OutputLayout, n1: int, n2: int,
    *, chunk: int, sketch_dim: int, key: jax.Array, jacobian_dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(Θ̂, stderr bound), both (N1, N2, A, B): the count-sketched kernel (module doc).
    `key` (a PRNG key, may be traced) draws the signs and the per-leaf bucket rotations."""
    a, c, k = lay.n_untraced, lay.n_traced, sketch_dim
    acc = acc_dtype(params)
    jac = per_example_jacobian(f, params, lay, jacobian_dtype)
    n_leaves = len(jax.tree.leaves(params))
    k_sign, k_off = jax.random.split(key)
    offsets = jax.random.randint(k_off, (n_leaves,), 0, k)

    def sketch_chunk(x_chunk):
        j = jax.tree.leaves(jac(x_chunk))  # (cc, A, C, *leaf) each
        rows = j[0].shape[0] * a * c
        s = jnp.zeros((rows, k), acc)
        u = jnp.zeros((rows, k), acc)
        for i, leaf in enumerate(j):
            m = leaf.reshape(rows, -1)
            signs = random_signs(jax.random.fold_in(k_sign, i), (-(-m.shape[1] // k),), acc)
            s = s + _fold(m, k, signs, offsets[i], acc)
            u = u + _fold(jnp.square(m.astype(acc)), k, None, offsets[i], acc)
        cc = j[0].shape[0]
        return s.reshape(cc, a, c, k), u.reshape(cc, a, c, k).sum(axis=2)

    def run(x, n):
        xb, nb = pad_and_block(x, chunk)
        s, u = jax.lax.map(sketch_chunk, xb)
        return s.reshape(nb * chunk, a, c, k)[:n], u.reshape(nb * chunk, a, k)[:n]

    s1, u1 = run(x1, n1)
    s2, u2 = (s1, u1) if x2 is None else run(x2, n2)
    theta = jnp.einsum("iack,jbck->ijab", s1, s2)
    var = 2.0 * jnp.einsum("iak,jbk->ijab", u1, u2)
    return theta, jnp.sqrt(var)
