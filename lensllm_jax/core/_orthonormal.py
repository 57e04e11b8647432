"""Orthonormalising a few long vectors in place (private; Hutch++'s sketch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def orthonormal_rows(a: jax.Array) -> jax.Array:
    """Orthonormal rows spanning those of `a` (k, P), in place: Gram-Schmidt, each row
    projected twice ("twice is enough"), a row left in the span of the previous ones (a
    Hessian of rank < k) set to 0. Cost O(k² P) FLOPs, memory one k x P block (a QR of the
    P x k transpose held several)."""
    k = a.shape[0]
    norms = jnp.linalg.norm(a, axis=1)
    tol = 100 * jnp.finfo(a.dtype).eps

    def body(i, q):
        v = q[i]
        for _ in range(2):
            v = v - jnp.where(jnp.arange(k) < i, q @ v, 0.0) @ q
        n = jnp.linalg.norm(v)
        return q.at[i].set(jnp.where(n > tol * norms[i], v / jnp.where(n > 0, n, 1.0), 0.0))

    return jax.lax.fori_loop(0, k, body, a)
