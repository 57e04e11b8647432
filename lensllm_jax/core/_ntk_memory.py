"""How many examples' Jacobians the NTK may hold at once: a memory budget and the chunk it
allows (`chunk_size="auto"` of `ntk.empirical_ntk_fn`)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.errors import NTKError

PyTree = Any

HOST_MEMORY_BUDGET = 2 * 1024**3  # when the device reports no memory (CPU): 2 GiB
DEVICE_MEMORY_FRACTION = 0.5  # of the device's free memory; the rest is for activations

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_bytes(text: str, what: str) -> int:
    """A byte count from text: "8GiB", "500MB", "2e9" (units k/M/G/T decimal, KiB/MiB/GiB/TiB
    binary). Raises `NTKError` naming `what` for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and _BYTE_UNITS.get(m.group(2).lower())
    if not m or unit is None or float(m.group(1)) * unit < 1:
        raise NTKError(
            f"{what} = {text!r} is not a positive byte count; use e.g. 8GiB, 500MB or 2e9"
        )
    return int(float(m.group(1)) * unit)


def memory_budget(
    memory_budget_bytes: int | None = None,
    *,
    device: Any = None,
    fraction: float = DEVICE_MEMORY_FRACTION,
) -> int:
    """Bytes the two live Jacobian blocks of JACOBIAN_CONTRACTION may take (`chunk_size="auto"`).

    The first rule that applies:
      1. `memory_budget_bytes` when given (`lensllm run` passes $LENSLLM_NTK_MEMORY here);
      2. `fraction` (default 0.5) of the device's free memory, bytes_limit − bytes_in_use of
         `device.memory_stats()` (GPU / TPU; default device `jax.devices()[0]`): the other half
         is left for the activations of a chunk, the Gram and XLA's temporaries;
      3. HOST_MEMORY_BUDGET (2 GiB) when the device reports no memory statistics (CPU).
    Cost: one `memory_stats()` query (no device work).
    """
    if memory_budget_bytes is not None:
        if not isinstance(memory_budget_bytes, int | np.integer) or memory_budget_bytes < 1:
            raise NTKError(
                f"memory_budget_bytes must be a positive int (bytes), got {memory_budget_bytes!r}"
            )
        return int(memory_budget_bytes)
    dev = device if device is not None else jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # backends without allocator statistics raise or return None
        stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return max(1, int(fraction * free))
    return HOST_MEMORY_BUDGET


def jacobian_bytes_per_example(
    params: PyTree, n_outputs: int = 1, jacobian_dtype: Any = None
) -> int:
    """Bytes of one example's Jacobian: n_outputs (= A·C) x Σ_leaves size · itemsize, with the
    itemsize of `jacobian_dtype` when given, else of each leaf (gradients keep params' dtypes)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        dt = jnp.dtype(jacobian_dtype) if jacobian_dtype is not None else jnp.result_type(leaf)
        total += int(np.prod(np.shape(leaf), dtype=np.int64)) * dt.itemsize
    return int(n_outputs) * total


def auto_chunk_size(n: int, bytes_per_example: int, budget_bytes: int) -> int:
    """Examples per Jacobian block such that two blocks fit the budget: a pure function.

    c_max = max(1, ⌊budget / (2 · bytes_per_example)⌋) (the row and the column block of
    `_ntk_blocks`; a chunk of one is always allowed, even over budget). If c_max >= n, all n at
    once; otherwise the fewest blocks nb = ⌈n / c_max⌉, balanced as c = ⌈n / nb⌉ <= c_max so the
    last block wastes as little padding as possible (64 with c_max = 40: 2 blocks of 32, not 40 +
    24 padded to 40). Cost of the choice: a symmetric kernel computes 1 + nb (nb − 1) / 2 chunk
    Jacobians (nb when nb <= 2), i.e. (1 + nb (nb − 1) / 2) / nb per-example-gradient passes
    over the batch (1, 1, 4/3, 7/4 for nb = 1..4): a larger budget means fewer passes.
    """
    if n < 1 or bytes_per_example < 1 or budget_bytes < 1:
        raise NTKError(
            f"auto_chunk_size needs positive sizes, got n={n}, bytes_per_example="
            f"{bytes_per_example}, budget_bytes={budget_bytes}"
        )
    c_max = max(1, budget_bytes // (2 * bytes_per_example))
    if c_max >= n:
        return n
    nb = -(-n // c_max)
    return -(-n // nb)
