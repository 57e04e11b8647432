"""Loading a checkpoint straight into its shards: the `place` hook of
`models.weights.build_params`, used by ``models.load(path, mesh=mesh)``.

For each parameter leaf, in file order: its sharding comes from `rules.leaf_spec`; a
top-level tensor is read once (checked, converted to the parameter dtype) and each device
receives only its slice (`jax.make_array_from_callback`, which in a multi-process run asks
each process for its own devices' slices only); a stacked leaf (one tensor per layer) is
read one layer at a time, each layer placed on the same devices with the layer axis
dropped, and the layers are stacked on the devices by one jitted program whose output
sharding is the leaf's (the layer axis is never split, so stacking moves no data between
devices). The host holds one tensor (one layer's) at a time, never the model; a device holds
its slices, never the whole model; the transient extra on a device is one stacked leaf's
slices.

Cost: one read of every tensor (as without a mesh), plus per stacked leaf one on-device
concatenation of its slices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lensllm_jax.parallel.mesh import FSDP
from lensllm_jax.parallel.rules import leaf_spec

__all__ = ["placer"]


@functools.lru_cache(maxsize=64)
def _stack_program(count: int, out: NamedSharding) -> Callable[..., jax.Array]:
    return jax.jit(lambda *layers: jnp.stack(layers), out_shardings=out)


def _from_host(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def placer(mesh: Mesh) -> Callable[..., jax.Array]:
    """`place(path, shape, readers, per_layer, dtype) -> jax.Array` laid out on `mesh` by the
    parameter rules (see the module docstring)."""
    fsdp = int(mesh.shape[FSDP])

    def place(
        path: tuple[str, ...],
        shape: tuple[int, ...],
        readers: list[Callable[[], np.ndarray]],
        per_layer: bool,
        dtype: Any,
    ) -> jax.Array:
        keys = tuple(jax.tree_util.DictKey(k) for k in path)
        spec = leaf_spec(keys, shape, fsdp)
        sharding = NamedSharding(mesh, spec)
        np_dtype = np.dtype(dtype)
        if not per_layer:
            return _from_host(np.asarray(readers[0](), np_dtype), sharding)
        entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
        layer_sharding = NamedSharding(mesh, P(*entries[1:]))
        layers = []
        for read in readers:  # one layer's tensor on the host at a time
            layers.append(_from_host(np.asarray(read(), np_dtype), layer_sharding))
        return _stack_program(len(layers), sharding)(*layers)

    return place
