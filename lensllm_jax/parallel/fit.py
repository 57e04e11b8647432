"""The scaling-law fitter with its candidates spread over the devices of a mesh.

    res = fit_law("rectified", d, losses, mesh)      # same result as core.fit.fit_law

Each candidate's fit depends on its own curve only (the normalised starts are shared, see
`core.fit.initial_starts`), so the candidates are simply split: the starting points are
drawn as on one device, then the (M, ...) arrays are cut along M over every device of the
mesh (``data`` x ``fsdp`` as one axis, M padded to a multiple of the device count) and a
`shard_map` runs the core's compiled multi-start solve on each device's own rows, with no
communication until the results are gathered. A device whose candidates converge early
stops early: the while loops are per device, not global.

Cost: (M / devices) x starts LM problems per device, all in float64 (enabled locally by
the core), instead of M x starts on one. Worth it only for very many candidates (the core
fits 3,000 in well under a second on a CPU).
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

from lensllm_jax.core import fit as core_fit
from lensllm_jax.parallel.mesh import AXES

__all__ = ["fit_law"]

_ROWS = P(AXES)  # the candidate axis over every device


def _unjitted(fn: Any) -> Callable[..., Any]:
    """The Python function under a `jax.jit` wrapper."""
    return fn.__wrapped__


@functools.lru_cache(maxsize=16)
def _program(mesh: Mesh, law_name: str, free: tuple, aux_tree: Any, has_prior: bool, static):
    """shard_map of `core.fit._solve_batch` over the candidate axis (compiled by jit)."""
    kw = dict(static)

    def local(x0, log_d, log_l, mask, aux, prior):
        # The core's jit wrapper carries compiler options that only a top-level jit may take:
        # call the function it wraps, and give those options to this program instead.
        return _unjitted(core_fit._solve_batch)(
            law_name, x0, jnp.asarray(free), log_d, log_l, mask, aux, prior, **kw
        )

    aux_spec = None if aux_tree is None else jax.tree.unflatten(aux_tree[0], list(aux_tree[1]))
    prior_spec = (_ROWS, _ROWS) if has_prior else None
    spread = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(_ROWS, _ROWS, _ROWS, _ROWS, aux_spec, prior_spec),
        out_specs=_ROWS,
        check_vma=False,  # the core's while loops mix per-device and constant values
    )
    return jax.jit(
        spread,
        out_shardings=NamedSharding(mesh, P()),
        compiler_options={"xla_backend_optimization_level": 1},  # as the core's solve
    )


def _solver(mesh: Mesh) -> Callable[..., Any]:
    """A drop-in for `core.fit._solve_batch` (the `solve_batch=` hook of `core.fit._fit`)."""
    n = int(mesh.size)

    def solve(law_name, x0, free, log_d, log_l, mask, aux, prior, **static):
        m = int(x0.shape[0])
        rows = np.concatenate([np.arange(m), np.zeros(-m % n, np.int64)])

        def cut(a: Any) -> Any:
            return jnp.asarray(a)[rows] if np.ndim(a) else a

        leaves, tree = jax.tree.flatten(aux) if aux is not None else ([], None)
        aux_tree = None
        if aux is not None:
            aux_tree = (tree, tuple(_ROWS if np.ndim(a) else P() for a in leaves))
        prog = _program(
            mesh,
            law_name,
            tuple(bool(b) for b in np.asarray(free)),
            aux_tree,
            prior is not None,
            tuple(sorted(static.items())),
        )
        out = prog(
            cut(x0),
            cut(log_d),
            cut(log_l),
            cut(mask),
            None if aux is None else jax.tree.map(cut, aux),
            None if prior is None else tuple(cut(a) for a in prior),
        )
        return tuple(a[:m] for a in out)

    return solve


def fit_law(law: Any, d: Any, loss_values: Any, mesh: Mesh, **kwargs: Any) -> core_fit.FitResult:
    """`core.fit.fit_law` (same arguments and result) with the candidates split over every
    device of `mesh`. Raises what the core raises for bad input. Cost: see the module."""
    return core_fit._fit(law, d, loss_values, solve_batch=_solver(mesh), **kwargs)
