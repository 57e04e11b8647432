"""Keys of pytrees for caches of compiled programs (private)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def signature(tree: PyTree) -> tuple:
    """Hashable (structure, shapes, dtypes) of a pytree: the key of a compiled program."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(_dtype(x))) for x in leaves)


def _dtype(x: Any) -> np.dtype:
    """The dtype of an array, ShapeDtypeStruct or host value (asking a jax Array for
    `.dtype`, not handing the array to numpy as if it were a dtype)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
