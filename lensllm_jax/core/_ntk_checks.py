"""Argument checks of the NTK functions: one-line `NTKError`s naming the candidate.

Shape and pytree checks run at trace time (so also under `jit`); checks that need values
(NaN / inf) run only on concrete arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.core import Tracer

from lensllm_jax.errors import NTKError

PyTree = Any


def _where(name: str | None) -> str:
    return f" for {name!r}" if name else ""


def _batch_size(x: PyTree, arg: str, name: str | None) -> int:
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise NTKError(f"{arg}{_where(name)} has no array leaves; pass a batch with a leading axis")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise NTKError(
            f"{arg}{_where(name)}: every leaf needs the same leading batch axis, got sizes "
            f"{sorted(s for s in sizes if s is not None)}{' and a scalar' if None in sizes else ''}"
        )
    size = sizes.pop()
    assert size is not None
    return size


def _check_same_structure(x1: PyTree, x2: PyTree, name: str | None) -> None:
    s1, s2 = jax.tree.structure(x1), jax.tree.structure(x2)
    if s1 != s2:
        raise NTKError(f"x1 and x2{_where(name)} have different pytree structures: {s1} vs {s2}")
    for l1, l2 in zip(jax.tree.leaves(x1), jax.tree.leaves(x2), strict=True):
        if np.shape(l1)[1:] != np.shape(l2)[1:]:
            raise NTKError(
                f"x1 and x2{_where(name)} differ in per-example shape: "
                f"{np.shape(l1)[1:]} vs {np.shape(l2)[1:]}; pad or crop to one shape"
            )


def _normalise_trace_axes(
    trace_axes: Sequence[int] | None, out_ndim: int, name: str | None
) -> tuple[int, ...]:
    """Axes of the full output (N, *out) to trace; never the batch axis 0."""
    if trace_axes is None:
        return tuple(range(1, out_ndim))
    axes = []
    for ax in trace_axes:
        a = ax + out_ndim if ax < 0 else ax
        if not 1 <= a < out_ndim:
            raise NTKError(
                f"trace_axes{_where(name)} has {ax}, but outputs have {out_ndim} axes and axis 0 "
                "is the batch; use axes 1..ndim-1 (or negatives)"
            )
        axes.append(a)
    if len(set(axes)) != len(axes):
        raise NTKError(f"trace_axes{_where(name)} repeats an axis: {tuple(trace_axes)}")
    return tuple(sorted(axes))


def _is_concrete(x: Any) -> bool:
    return not any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(x))


def _check_finite(arr: Any, what: str, name: str | None) -> None:
    a = np.asarray(arr)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise NTKError(
            f"{what}{_where(name)} has {bad} non-finite entries (NaN/inf); check the model's "
            "outputs / loss on this batch (overflow, log(0), bad tokens)"
        )
