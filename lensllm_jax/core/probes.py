"""Random probe vectors shaped like a params pytree, for the stochastic Hessian estimators:
Rademacher signs (E[z zᵀ] = I, the lowest-variance choice for Hutchinson) and Gaussians.
Each is ``sampler(key, params) -> pytree`` and is jittable and vmappable over keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SAMPLERS", "gaussian", "rademacher", "random_signs"]

PyTree = Any


def random_signs(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """I.i.d. fair ±1 of `shape`: every bit of ⌈size/32⌉ uniform uint32 words is one sign, so the
    PRNG runs 32x less than `jax.random.rademacher` (one uniform per entry).
    Cost: size/32 PRNG words + a shift/mask per sign."""
    size = int(np.prod(shape, dtype=np.int64))
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    signs = bits.reshape(-1)[:size].reshape(shape).astype(dtype)
    return (2 * signs - 1).astype(dtype)


def rademacher(key: jax.Array, params: PyTree) -> PyTree:
    """Probe with i.i.d. ±1 entries (minimum-variance Hutchinson probe), params' dtypes.

    Each leaf's signs are the bits of uniform uint32 words (`random_signs`): the same
    distribution as `jax.random.rademacher`, a different (32x cheaper) stream."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            random_signs(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def gaussian(key: jax.Array, params: PyTree) -> PyTree:
    """Probe with i.i.d. N(0, 1) entries, params' dtypes."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


SAMPLERS: dict[str, Callable[[jax.Array, PyTree], PyTree]] = {
    "rademacher": rademacher,
    "gaussian": gaussian,
}
