"""The empirical loss-gradient NTK on a device mesh: Θ = J Jᵀ without any device holding a
whole per-example gradient of the model.

    theta = loss_gradient_kernel(per_example_loss, params, batch, mesh)   # (N, N) numpy
    r = per_example_values(per_example_loss, params, batch, mesh)        # (N,) numpy

J has one row per example, ∂ℓ(x_i)/∂θ. The N examples are cut into blocks of c (a multiple
of the ``data`` axis size D). A block's Jacobian J_b (c x P) is one jitted program with
explicit shardings: the examples of the block split over ``data`` (c / D per replica), the
parameter axes of each gradient split over ``fsdp`` exactly like the parameters themselves
(`rules`), so a device holds c / D rows of P / F entries. The Gram block J_a J_bᵀ is an
explicit `shard_map` reduction: each device contracts its rows of J_a with the rows of J_b
that pass by on a ring over ``data`` (D - 1 `ppermute`s, so a device never holds more than
three c/D x P/F pieces), and the partial sums over its parameter slice are `psum`-ed over
``fsdp`` (a leaf that is replicated because it has no divisible axis counts once). Blocks
follow the promoted-row schedule of `core._ntk_blocks`: 1 + nb (nb - 1) / 2 block Jacobians
for nb blocks (nb when nb <= 2).

Cost: ≈ one per-example-gradient pass over the N examples (spread over D x F devices; the
F devices of a replica share the work of each example through the sharded weights), plus
2 N² P FLOPs for the Gram, also spread; communication per Gram block: (D - 1) c/D · P/F
values per device on the ring and a c x c psum. Memory per device: 3 · c/D · P/F Jacobian
entries + the parameters' shard + one block's activations.
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

from lensllm_jax.core.ntk import auto_chunk_size, jacobian_bytes_per_example, memory_budget
from lensllm_jax.errors import NTKError
from lensllm_jax.parallel.mesh import DATA, FSDP
from lensllm_jax.parallel.programs import put, signature
from lensllm_jax.parallel.rules import param_specs, replicated

__all__ = ["chunk_for_mesh", "loss_gradient_kernel", "per_example_values"]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]  # (params, batch) -> (N,)


def _shapes(sig: tuple) -> PyTree:
    treedef, leaves = sig
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in leaves])


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


@functools.lru_cache(maxsize=32)
def _programs(f: LossFn, mesh: Mesh, sig: tuple, batch_sig: tuple, jacobian_dtype: Any):
    """(jac, gram) compiled for one loss, mesh, parameter structure and block shape."""
    fsdp, data = int(mesh.shape[FSDP]), int(mesh.shape[DATA])
    specs = param_specs(_shapes(sig), fsdp)
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    j_specs = jax.tree.map(lambda s: P(DATA, *s), specs, is_leaf=_is_spec)
    j_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), j_specs, is_leaf=_is_spec)
    x_sh = jax.tree.map(lambda _: NamedSharding(mesh, P(DATA)), _shapes(batch_sig))
    split = jax.tree.map(lambda s: FSDP in tuple(s), specs, is_leaf=_is_spec)

    def one(p, xi):
        return f(p, jax.tree.map(lambda leaf: leaf[None], xi))[0]

    def jac_fn(p, xb):
        j = jax.vmap(jax.grad(one), in_axes=(None, 0))(p, xb)
        return j if jacobian_dtype is None else jax.tree.map(lambda a: a.astype(jacobian_dtype), j)

    jac = jax.jit(jac_fn, in_shardings=(p_sh, x_sh), out_shardings=j_sh)

    def local_gram(ja, jb):
        # Rows of J_a (c/D, ·) against every replica's rows of J_b, passed round a ring.
        first = jax.lax.axis_index(FSDP) == 0
        me = jax.lax.axis_index(DATA)
        rows = jax.tree.leaves(ja)[0].shape[0]

        def dots(a_tree, b_tree):
            total = jnp.zeros((rows, rows), jnp.float32)
            for a, b, s in zip(
                jax.tree.leaves(a_tree),
                jax.tree.leaves(b_tree),
                jax.tree.leaves(split),
                strict=True,
            ):
                g = jax.lax.dot_general(
                    a.reshape(rows, -1),
                    b.reshape(rows, -1),
                    (((1,), (1,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
                total = total + (g if s else jnp.where(first, g, 0.0))  # replicated: once
            return total

        out = jnp.zeros((rows, data * rows), jnp.float32)
        held = jb
        ring = [(j, (j - 1) % data) for j in range(data)]  # replica j passes to j - 1
        for k in range(data):
            src = (me + k) % data  # the replica whose rows of J_b are held now
            out = jax.lax.dynamic_update_slice(out, dots(ja, held), (0, src * rows))
            if k < data - 1:
                held = jax.tree.map(lambda x: jax.lax.ppermute(x, DATA, ring), held)
        return jax.lax.psum(out, FSDP)  # rows of Θ_ab: (c/D, c) per replica

    gram = jax.jit(  # the rows gathered to every device: a c x c block anyone can read
        jax.shard_map(local_gram, mesh=mesh, in_specs=(j_specs, j_specs), out_specs=P(DATA)),
        out_shardings=replicated(mesh),
    )
    return jac, gram, x_sh


def chunk_for_mesh(
    params: PyTree,
    n: int,
    mesh: Mesh,
    *,
    chunk_size: int | str | None = "auto",
    jacobian_dtype: Any = None,
    memory_budget_bytes: int | None = None,
) -> int:
    """Examples per Jacobian block: a multiple of the ``data`` size D. "auto": the largest
    block whose three live pieces per device (3 · c/D · P/F entries) fit the budget
    (`core.ntk.memory_budget`, per device), balanced over the fewest blocks; None: all N;
    an int is rounded up to a multiple of D."""
    data, fsdp = int(mesh.shape[DATA]), int(mesh.shape[FSDP])
    per_replica = -(-n // data)
    if chunk_size is None:
        local = per_replica
    elif chunk_size == "auto":
        per_example = jacobian_bytes_per_example(params, 1, jacobian_dtype)
        per_device = max(1, -(-3 * per_example // (2 * fsdp)))  # auto_chunk_size counts 2
        device = mesh.devices.flat[0]
        budget = memory_budget(memory_budget_bytes, device=device)
        local = auto_chunk_size(per_replica, per_device, budget)
    elif isinstance(chunk_size, int | np.integer) and chunk_size >= 1:
        local = -(-int(chunk_size) // data)
    else:
        raise NTKError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
    return int(min(local, per_replica)) * data


def _block(batch: PyTree, start: int, size: int) -> PyTree:
    return jax.tree.map(lambda a: np.asarray(a)[start : start + size], batch)


def loss_gradient_kernel(
    per_example_loss: LossFn,
    params: PyTree,
    batch: PyTree,
    mesh: Mesh,
    *,
    chunk_size: int | str | None = "auto",
    jacobian_dtype: Any = None,
    memory_budget_bytes: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Θ_ij = ⟨∇θ ℓ(x_i), ∇θ ℓ(x_j)⟩ (N x N, float32 numpy) on `mesh`: the sharded
    counterpart of `core.ntk.loss_gradient_kernel` (same arguments, plus the mesh).

    `per_example_loss(params, batch) -> (N,)` must treat examples independently; `params`
    should lie on `mesh` by the rules (`rules.shard_params`); `batch` is host arrays with a
    leading example axis, the same in every process. Raises `NTKError` for a kernel that is
    not finite. Cost and layout: see the module docstring.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) < 1:
        raise NTKError(f"batch{_where(name)} has no leading example axis")
    n = int(np.shape(leaves[0])[0])
    c = chunk_for_mesh(
        params,
        n,
        mesh,
        chunk_size=chunk_size,
        jacobian_dtype=jacobian_dtype,
        memory_budget_bytes=memory_budget_bytes,
    )
    nb = -(-n // c)
    pad = nb * c - n
    host = jax.tree.map(
        lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], pad, 0)]), batch
    )
    block_sig = signature(_block(host, 0, c))
    jac_prog, gram_prog, x_sh = _programs(
        per_example_loss, mesh, signature(params), block_sig, jacobian_dtype
    )

    def jac(b: int) -> PyTree:
        xb = jax.tree.map(lambda a, s: put(a, s), _block(host, b * c, c), x_sh)
        return jac_prog(params, xb)

    def gram(ja: PyTree, jb: PyTree) -> np.ndarray:
        return np.asarray(gram_prog(ja, jb), np.float32)

    theta = np.zeros((nb * c, nb * c), np.float32)
    row = jac(0)
    theta[:c, :c] = gram(row, row)
    for i in range(nb - 1):  # promoted rows: the last column computed becomes the next row
        for j in range(nb - 1, i, -1):
            col = jac(j)
            g = gram(row, col)
            theta[i * c : (i + 1) * c, j * c : (j + 1) * c] = g
            theta[j * c : (j + 1) * c, i * c : (i + 1) * c] = g.T
            if j == i + 1:
                theta[j * c : (j + 1) * c, j * c : (j + 1) * c] = gram(col, col)
                row = col
    theta = theta[:n, :n]
    if not np.all(np.isfinite(theta)):
        raise NTKError(
            f"empirical NTK{_where(name)} is not finite (NaN/inf); check the loss on the probe "
            "examples (overflow, log(0)) or use float32 parameters"
        )
    return theta


def _where(name: str | None) -> str:
    return f" for {name!r}" if name else ""


@functools.lru_cache(maxsize=32)
def _values_program(f: LossFn, mesh: Mesh, sig: tuple):
    specs = param_specs(_shapes(sig), int(mesh.shape[FSDP]))
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.jit(f, in_shardings=(p_sh, replicated(mesh)), out_shardings=replicated(mesh))


def per_example_values(
    per_example_loss: LossFn, params: PyTree, batch: PyTree, mesh: Mesh
) -> np.ndarray:
    """ℓ(X) (N,) at `params` on `mesh` (the NTK residual r = f0(X) − y with y = 0), as a
    numpy array every process holds. Cost: one forward pass over the batch."""
    rep = replicated(mesh)
    xb = jax.tree.map(lambda a: put(a, rep), batch)
    return np.asarray(_values_program(per_example_loss, mesh, signature(params))(params, xb))
