"""Sharding rules for the model zoo, its optimizer state and its batches.

Parameters (FSDP, ZeRO-3 style): every leaf is split along the ``fsdp`` mesh axis on its
largest dimension divisible by the axis size (ties: the earlier dimension), and replicated
along ``data``. A leaf with no such dimension (a scalar, a bias shorter than the axis, an
odd vocabulary with an odd hidden size) is replicated. The leading layer axis of the
stacked blocks (the ``layers`` subtree, scanned by `models.layers.run_layers`) is never
chosen: a scan slices it one layer at a time, which a split layer axis would turn into an
all-gather of the whole stack.

Optimizer state: each leaf follows the rule of the parameter it mirrors. The rule reads only
a leaf's key path (its first dict key, "layers" or not) and shape, and optax's Adam moments
carry their parameter's dict keys and shape, so they land exactly where their parameter
lies; counters and other scalars are replicated.

Batches: the example axis is split over ``data`` and ``fsdp`` together when the batch
divides by both (each device then works on its own examples, as FSDP does), else over
``data``, else replicated.

Cost: pure bookkeeping on shapes (no device work) except `shard_params`, which moves each
leaf's slices to their devices once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lensllm_jax.parallel.mesh import DATA, FSDP

__all__ = [
    "STACKED_KEY",
    "batch_sharding",
    "batch_spec",
    "leaf_spec",
    "param_shardings",
    "param_specs",
    "replicated",
    "shard_params",
    "shard_shape",
    "sharded_bytes",
]

PyTree = Any
STACKED_KEY = "layers"  # the subtree whose leaves stack one block per layer on axis 0


def _is_stacked(path: Sequence[Any]) -> bool:
    """True when the first dict key on the path is STACKED_KEY (params or optimizer state)."""
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            return k.key == STACKED_KEY
    return False


def leaf_spec(path: Sequence[Any], shape: Sequence[int], fsdp: int) -> P:
    """PartitionSpec of one leaf: ``fsdp`` on its largest dimension divisible by `fsdp`
    (the layer axis of stacked leaves excluded), P() when none is or fsdp == 1."""
    shape = tuple(int(s) for s in shape)
    if fsdp <= 1 or not shape:
        return P()
    first = 1 if _is_stacked(path) else 0
    dims = [d for d in range(first, len(shape)) if shape[d] >= fsdp and shape[d] % fsdp == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda d: (shape[d], -d))
    return P(*[FSDP if d == best else None for d in range(len(shape))])


def param_specs(tree: PyTree, fsdp: int) -> PyTree:
    """`leaf_spec` of every leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_spec(path, np.shape(leaf), fsdp), tree
    )


def param_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """NamedSharding of every leaf on `mesh` (parameters, or optimizer state: same rule)."""
    fsdp = int(mesh.shape[FSDP])
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(tree, fsdp),
        is_leaf=lambda x: isinstance(x, P),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device."""
    return NamedSharding(mesh, P())


def batch_spec(batch_size: int, mesh: Mesh) -> P:
    """Examples over (data, fsdp) when they divide the batch, else over data, else none."""
    data, fsdp = int(mesh.shape[DATA]), int(mesh.shape[FSDP])
    if batch_size % (data * fsdp) == 0:
        return P((DATA, FSDP))
    if batch_size % data == 0:
        return P(DATA)
    return P()


def batch_sharding(batch_size: int, mesh: Mesh) -> NamedSharding:
    """NamedSharding of a batch array whose axis 0 holds `batch_size` examples."""
    return NamedSharding(mesh, batch_spec(batch_size, mesh))


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """`params` placed on `mesh` by the rules (each device receives only its slices)."""
    return jax.device_put(params, param_shardings(params, mesh))


def shard_shape(shape: Sequence[int], spec: P, sizes: dict[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` laid out by `spec` on a mesh of `sizes`
    ({"data": D, "fsdp": F}), without devices: what `NamedSharding.shard_shape` returns."""
    out = list(int(s) for s in shape)
    for d, axes in enumerate(tuple(spec)):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        out[d] //= int(np.prod([sizes[a] for a in names]))
    return tuple(out)


def sharded_bytes(tree: PyTree, fsdp: int, dtype: Any = None) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by the
    parameter rules with an ``fsdp`` axis of size `fsdp`; `dtype` overrides the leaves'."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = leaf_spec(path, np.shape(leaf), fsdp)
        block = shard_shape(np.shape(leaf), spec, {DATA: 1, FSDP: fsdp})
        item = np.dtype(dtype if dtype is not None else leaf.dtype).itemsize
        total += int(np.prod(block, dtype=np.int64)) * item
    return total
