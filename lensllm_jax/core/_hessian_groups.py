"""Parameter groups of the Hessian estimators (private): a label per leaf (or per stacked
layer), group-wise dot products and masks. See `hessian` for `group_by` and `stacked`."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.errors import HessianError

PyTree = Any
GroupBy = Literal["leaf", "top"] | Callable[[tuple], Hashable]


Grouping = list[str | tuple[str, ...]]  # per leaf: one label, or one per stacked layer


def _grouping(params: PyTree, group_by: GroupBy, stacked: str | None) -> Grouping:
    """Label of each leaf; a leaf under the top-level key `stacked` (layers stacked on axis 0,
    as in scanned models) gets one label per layer index, suffixed "[i]"."""
    out: Grouping = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if group_by == "leaf":
            lab = jax.tree_util.keystr(path)
        elif group_by == "top":
            lab = jax.tree_util.keystr(path[:1])
        elif callable(group_by):
            lab = str(group_by(path))
        else:
            raise HessianError(f"group_by must be 'leaf', 'top' or a callable, got {group_by!r}")
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        if stacked is not None and top == stacked:
            if jnp.ndim(leaf) < 1:
                raise HessianError(
                    f"leaf {jax.tree_util.keystr(path)} under stacked={stacked!r} is a scalar; "
                    "stacked leaves need a leading layer axis"
                )
            out.append(tuple(f"{lab}[{i}]" for i in range(jnp.shape(leaf)[0])))
        else:
            out.append(lab)
    return out


def _group_dots(a: PyTree, b: PyTree, grouping: Grouping) -> dict[str, jax.Array]:
    """Σ over each group's entries of a * b (per layer index for stacked leaves)."""
    out: dict[str, jax.Array] = {}

    def add(lab: str, val: jax.Array) -> None:
        out[lab] = out[lab] + val if lab in out else val

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    for x, y, lab in zip(leaves_a, leaves_b, grouping, strict=True):
        if isinstance(lab, tuple):
            per_layer = jnp.sum(x * y, axis=tuple(range(1, x.ndim)))
            for i, sub in enumerate(lab):
                add(sub, per_layer[i])
        else:
            add(lab, jnp.vdot(x, y))
    return out


def _mask_group(v: PyTree, grouping: Grouping, group: str) -> PyTree:
    """v restricted to one group (zeros elsewhere)."""
    leaves, tree = jax.tree.flatten(v)
    masked = []
    for x, lab in zip(leaves, grouping, strict=True):
        if isinstance(lab, tuple):
            keep = jnp.asarray([sub == group for sub in lab], x.dtype)
            masked.append(x * keep.reshape(-1, *([1] * (x.ndim - 1))))
        else:
            masked.append(x if lab == group else jnp.zeros_like(x))
    return jax.tree.unflatten(tree, masked)


def _mean_se(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and standard error over the probe axis 0."""
    n = samples.shape[0]
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(n)


@jax.jit
def _summaries(samples: dict) -> tuple[dict, jax.Array, tuple[jax.Array, jax.Array]]:
    """Per-group (mean, stderr), the total samples and their (mean, stderr), in one program
    (eager, each reduction compiled a program of its own)."""
    total = functools.reduce(operator.add, samples.values())
    return {g: _mean_se(s) for g, s in samples.items()}, total, _mean_se(total)
