"""Hessian quantities on a device mesh: Hutchinson probes spread over devices, vᵀHv with
sharded parameters.

    est = hutchinson_trace(loss_fn, params, key, num_probes, mesh, batch=batch)
    vhv = hessian_distance(loss_fn, params_pretrained, params_finetuned, mesh, batch=batch)

Hutchinson: the K probe keys are `jax.random.split(key, K)`, exactly those of
`core.hessian.hutchinson_trace`, so the estimate is the same number; they are split over
the ``data`` axis (K/D per replica, padded to a multiple of D), and each replica runs the
core's own per-probe program (`hessian.hutchinson_samples`) on its keys inside a
`shard_map` that is manual over ``data`` only: within a replica, the parameters stay split
over ``fsdp``, the probe batch's examples too (when they divide), and XLA partitions each
Hessian-vector product across those devices as it does a training step. The
per-probe values are gathered and averaged on the host: mean and standard error of the
mean over probes, per group and in total, as the core does.

Cost: K HVPs (≈ 2-3 gradients each) spread over D replicas: ≈ K/D HVPs of wall time, each
on P/F parameters per device; memory per device: the parameter shard plus one HVP's
tangents and activations. vᵀHv: 1 + G HVPs, sharded like the parameters.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lensllm_jax.core import hessian
from lensllm_jax.errors import HessianError
from lensllm_jax.parallel.mesh import DATA, FSDP
from lensllm_jax.parallel.programs import put, signature
from lensllm_jax.parallel.rules import param_specs, replicated

__all__ = ["hessian_distance", "hutchinson_trace"]

PyTree = Any
LossFn = Callable[..., jax.Array]


def _param_shardings(mesh: Mesh, sig: tuple) -> PyTree:
    treedef, leaves = sig
    shapes = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in leaves])
    specs = param_specs(shapes, int(mesh.shape[FSDP]))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _batch_sharding(mesh: Mesh, batch: PyTree) -> NamedSharding:
    """The probe batch's examples over ``fsdp`` when they divide (within a replica each
    device then runs the HVP's passes on its own examples, FSDP style), else replicated."""
    leaves = jax.tree.leaves(batch)
    n = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0
    fsdp = int(mesh.shape[FSDP])
    return NamedSharding(mesh, P(FSDP) if n and n % fsdp == 0 else P())


@functools.lru_cache(maxsize=32)
def _hutchinson_program(
    loss_fn: LossFn, mesh: Mesh, sig: tuple, options: tuple, batch_sh: NamedSharding
):
    sampler, group_by, stacked, batch_size, linearize = options

    def local(params: PyTree, batch: PyTree, keys: jax.Array) -> dict[str, jax.Array]:
        # The probes differ per replica; the point they are applied at is the same everywhere,
        # but the linearisation must be typed as varying over `data` like its tangents.
        params, batch = jax.tree.map(
            lambda x: jax.lax.pcast(x, (DATA,), to="varying"), (params, batch)
        )
        return hessian.hutchinson_samples(
            loss_fn,
            params,
            keys,
            sampler=sampler,
            group_by=group_by,
            stacked=stacked,
            batch_size=batch_size,
            linearize=linearize,
            batch=batch,
        )

    spread = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P(DATA)), out_specs=P(DATA), axis_names={DATA}
    )
    rep = replicated(mesh)
    return jax.jit(
        spread,
        in_shardings=(_param_shardings(mesh, sig), batch_sh, NamedSharding(mesh, P(DATA))),
        out_shardings=rep,
    )


def _mean_se(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(samples.shape[0]))


def hutchinson_trace(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    num_probes: int,
    mesh: Mesh,
    *,
    sampler: str | Callable[[jax.Array, PyTree], PyTree] = "rademacher",
    group_by: hessian.GroupBy = "leaf",
    stacked: str | None = None,
    batch_size: int | None = None,
    linearize: bool = True,
    name: str | None = None,
    batch: PyTree | None = None,
) -> hessian.TraceEstimate:
    """tr(H) ≈ (1/K) Σ_k z_kᵀ H z_k with the probes of `core.hessian.hutchinson_trace`
    (same arguments, plus the mesh), spread over the ``data`` replicas. `params` should lie
    on `mesh` by the rules; `batch` is host arrays (or None), the same in every process.
    Returns the core's `TraceEstimate` (numpy values). Raises `HessianError` for fewer than
    2 probes or a non-finite trace. Cost: see the module docstring."""
    if not isinstance(num_probes, int) or num_probes < 2:
        raise HessianError(
            f"num_probes must be an int >= 2 (for a standard error), got {num_probes!r}"
        )
    data = int(mesh.shape[DATA])
    split = jax.random.split(key, num_probes)  # the core's probes, in the core's order
    typed = jnp.issubdtype(split.dtype, jax.dtypes.prng_key)
    keys = np.asarray(jax.random.key_data(split) if typed else split)
    pad = -num_probes % data
    keys = np.concatenate([keys, np.repeat(keys[-1:], pad, 0)])
    options = (sampler, group_by, stacked, batch_size, linearize)
    batch_sh = _batch_sharding(mesh, batch)
    prog = _hutchinson_program(loss_fn, mesh, signature(params), options, batch_sh)
    batch_g = None if batch is None else jax.tree.map(lambda a: put(a, batch_sh), batch)
    keys_g = put(keys, NamedSharding(mesh, P(DATA)))
    if typed:
        keys_g = jax.random.wrap_key_data(keys_g, impl=jax.random.key_impl(split))
    out = prog(params, batch_g, keys_g)
    samples = {g: np.asarray(v)[:num_probes] for g, v in out.items()}
    total = functools.reduce(operator.add, samples.values())
    mean, se = _mean_se(total)
    if not np.isfinite(mean):
        where = f" for {name!r}" if name else ""
        raise HessianError(
            f"Hutchinson trace{where} is not finite (NaN/inf); check the loss on this batch "
            "(overflow, log(0)) or use float32 parameters"
        )
    per = {g: _mean_se(s) for g, s in samples.items()}
    return hessian.TraceEstimate(
        jnp.asarray(mean),
        jnp.asarray(se),
        {g: jnp.asarray(v[0]) for g, v in per.items()},
        {g: jnp.asarray(v[1]) for g, v in per.items()},
        jnp.asarray(total),
    )


@functools.lru_cache(maxsize=32)
def _distance_program(loss_fn: LossFn, mesh: Mesh, sig: tuple, group_by: Any, stacked: Any):
    p_sh = _param_shardings(mesh, sig)
    rep = replicated(mesh)

    def total(pre: PyTree, ft: PyTree, batch: PyTree) -> jax.Array:
        dist = hessian.hessian_distance(
            loss_fn, pre, ft, group_by=group_by, stacked=stacked, batch=batch
        )
        return dist.total

    return jax.jit(total, in_shardings=(p_sh, p_sh, rep), out_shardings=rep)


def hessian_distance(
    loss_fn: LossFn,
    params_pretrained: PyTree,
    params_finetuned: PyTree,
    mesh: Mesh,
    *,
    group_by: hessian.GroupBy = "leaf",
    stacked: str | None = None,
    name: str | None = None,
    batch: PyTree | None = None,
) -> float:
    """vᵀHv, v = θ_finetuned − θ_pretrained, H at the fine-tuned parameters: the total of
    `core.hessian.hessian_distance`, computed with both parameter sets sharded on `mesh`.
    Raises `HessianError` when it is not finite. Cost: 1 + G HVPs for G groups."""
    rep = replicated(mesh)
    batch_g = None if batch is None else jax.tree.map(lambda a: put(a, rep), batch)
    prog = _distance_program(loss_fn, mesh, signature(params_pretrained), group_by, stacked)
    value = float(np.asarray(prog(params_pretrained, params_finetuned, batch_g)))
    if not np.isfinite(value):
        where = f" for {name!r}" if name else ""
        raise HessianError(f"vᵀHv{where} is not finite (NaN/inf); check the loss on this batch")
    return value
