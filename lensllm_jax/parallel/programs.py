"""Sharded fine-tuning and evaluation: pure step functions (`runner.finetune` passes its own),
compiled with explicit NamedSharding in/out shardings on a ("data", "fsdp") mesh.

    init, step = sharded_train_step(init_fn, step_fn, mesh)  # make_train_step's contract
    sums = sharded_eval_sums(nll_fn, mesh)(params, tokens, loss_mask, attention_mask)

This room knows meshes and shardings, not recipes: the functions come in as arguments
(`runner.finetune.train_fns` / `example_nll_fn`), so imports run one way, runner -> parallel.

The step is FSDP + data parallel: parameters and both Adam moments are split along ``fsdp``
by `rules` (in and out, so they never leave their shards between steps; params and state
are donated), the batch's examples along ``data`` x ``fsdp`` (`rules.batch_spec`), and
XLA's SPMD partitioner inserts the all-gathers of each weight before use and the
reduce-scatters of its gradient. The loss is the same token-weighted mean as on one device
(a global sum over the whole batch, not a mean of per-device means), so the numbers match
the single-device step to f32 round-off.

Host inputs (the batch, the learning rate) become global arrays with
`jax.make_array_from_callback`: every process holds the same host batch and contributes
the slices of its own devices, so the same code runs in one process or many.

Cost per step on D x F devices: ≈ 6·P·B·T / (D·F) FLOPs per device, plus per step an
all-gather of the weights (P values over each fsdp group, forward and backward) and a
reduce-scatter of the gradient (P values). Memory per device ≈ (2 params + 2 moments +
gradient) · P / F + the activations of B / (D·F) examples + one gathered weight at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lensllm_jax.core._pytree import signature
from lensllm_jax.parallel.rules import batch_sharding, param_shardings, replicated

__all__ = ["put", "sharded_eval_sums", "sharded_train_step", "signature"]

PyTree = Any


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array laid out by `sharding` from a host value that every process holds
    whole (each process copies only its own devices' slices)."""
    arr = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(arr, sharding)  # one transfer call (cheaper for small arrays)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _shapes(sig: tuple) -> PyTree:
    treedef, leaves = sig
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in leaves])


@functools.lru_cache(maxsize=32)
def _train_programs(init_fn: Callable, step_fn: Callable, mesh: Mesh, sig: tuple, batch_size: int):
    """(init, step) compiled for one pair of step functions, model structure, mesh and batch
    size (the functions are cache keys: pass the same objects to reuse the programs)."""
    params = _shapes(sig)
    p_sh = param_shardings(params, mesh)
    o_sh = param_shardings(jax.eval_shape(init_fn, params), mesh)
    b_sh, rep = batch_sharding(batch_size, mesh), replicated(mesh)
    init = jax.jit(init_fn, in_shardings=(p_sh,), out_shardings=o_sh)
    step = jax.jit(
        step_fn,
        in_shardings=(p_sh, o_sh, b_sh, b_sh, b_sh, rep),
        out_shardings=(p_sh, o_sh, rep),
        donate_argnums=(0, 1),
    )
    return init, step, b_sh, rep


def sharded_train_step(init_fn: Callable, step_fn: Callable, mesh: Mesh):
    """(init, step) with the contract of `runner.finetune.make_train_step`, sharded on
    `mesh`: `opt_state = init(params)`, `params, opt_state, loss = step(params, opt_state,
    batch, lr)`, from the pure `init_fn(params) -> opt_state` and
    `step_fn(params, opt_state, tokens, loss_mask, attention_mask, lr) -> (params,
    opt_state, loss)` (`runner.finetune.train_fns`). `params` must lie on `mesh` by the
    rules (`rules.shard_params`, or `models.load(..., mesh=mesh)`); they and `opt_state`
    are donated. Compiled once per (functions, model structure, mesh, batch size)."""

    def init(params: PyTree) -> PyTree:
        return _train_programs(init_fn, step_fn, mesh, signature(params), 1)[0](params)

    def step(params: PyTree, opt_state: PyTree, batch: Mapping[str, Any], lr: float):
        tokens = np.asarray(batch["tokens"], np.int32)
        _, prog, b_sh, rep = _train_programs(
            init_fn, step_fn, mesh, signature(params), int(tokens.shape[0])
        )
        return prog(
            params,
            opt_state,
            put(tokens, b_sh),
            put(np.asarray(batch["loss_mask"], np.int32), b_sh),
            put(np.asarray(batch["attention_mask"], np.int32), b_sh),
            put(np.float32(lr), rep),
        )

    return init, step


@functools.lru_cache(maxsize=32)
def _eval_program(nll_fn: Callable, mesh: Mesh, sig: tuple, batch_size: int):
    p_sh = param_shardings(_shapes(sig), mesh)
    b_sh = batch_sharding(batch_size, mesh)
    prog = jax.jit(
        nll_fn,
        in_shardings=(p_sh, b_sh, b_sh, b_sh),
        out_shardings=replicated(mesh),
    )
    return prog, b_sh


def sharded_eval_sums(nll_fn: Callable, mesh: Mesh) -> Callable[..., jax.Array]:
    """(params, tokens, loss_mask, attention_mask) -> (B,) Σ NLL over each example's target
    tokens by the pure `nll_fn` (`runner.finetune.example_nll_fn`), examples split as
    `rules.batch_spec`, the result replicated (every process can read it).
    Cost: one forward pass, ≈ 2·P·B·T / (D·F) FLOPs per device."""

    def sums(params: PyTree, tokens: Any, loss_mask: Any, attention_mask: Any) -> jax.Array:
        tokens = np.asarray(tokens, np.int32)
        prog, b_sh = _eval_program(nll_fn, mesh, signature(params), int(tokens.shape[0]))
        return prog(
            params,
            put(tokens, b_sh),
            put(np.asarray(loss_mask, np.int32), b_sh),
            put(np.asarray(attention_mask, np.int32), b_sh),
        )

    return sums
