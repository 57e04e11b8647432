"""How the NTK is computed within a memory budget: the budget, the chunk of examples whose
Jacobians it allows (`chunk_size="auto"`), and the route (`implementation="auto"` of
`ntk.empirical_ntk_fn`): Jacobian blocks, matrix-free NTK-vector products, or a sketch.

Costs are counted in per-example gradient passes: one "pass" computes every example's gradient
once, about one batched gradient of the batch in FLOPs (the floor of any exact method)."""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.errors import NTKError

PyTree = Any

HOST_MEMORY_BUDGET = 2 * 1024**3  # when nothing is passed and the device reports no memory
DEVICE_MEMORY_FRACTION = 0.5  # of the device's free memory; the rest is for activations
JVP_COST = 2.0 / 3.0  # one example's tangent (jvp) relative to its gradient, in FLOPs
FORWARD_COST = 1.0 / 3.0  # one example's forward pass relative to its gradient
MAX_EXACT_PASSES = 4.0  # above this many passes an allowed sketch replaces the exact kernel
SKETCH_DIM = 8192  # buckets of the count sketch: relative error ≈ sqrt(2 / k) ≈ 1.6 %
ROUTES = ("jacobian_contraction", "ntk_vector_products", "sketch")
SKETCH_MEMORY_FACTOR = 3  # a chunk's gradients + the signed and squared folds' first halves

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
    """Bytes an NTK route's buffers may take (the per-example gradients of `plan_ntk`).

    The first rule that applies:
      1. `memory_budget_bytes` when given (`lensllm run` passes $LENSLLM_NTK_MEMORY, or on a
         CPU a quarter of the host memory available now, measured outside the core);
      2. `fraction` (default 0.5) of the device's free memory, bytes_limit − bytes_in_use of
         `device.memory_stats()` (GPU / TPU; default device `jax.devices()[0]`): the other half
         is left for the activations of a chunk, the Gram and XLA's temporaries;
      3. HOST_MEMORY_BUDGET (2 GiB) when nothing is passed and the device reports no memory
         statistics (CPU): the core reads no environment, so a caller that knows the host's
         memory should pass it.
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


class NtkPlan(NamedTuple):
    """How a kernel will be computed, and what it costs (`plan_ntk`).

    route: "jacobian_contraction" (blocks), "ntk_vector_products" (matrix-free) or "sketch".
    chunk: examples per Jacobian block / x2 examples per batched jvp / examples per sketch step.
    gradient_passes: per-example gradients computed, over the minimum (N, or N1 + N2).
    jvp_passes: per-example tangent evaluations (matrix-free), over the same minimum.
    cost_passes: gradient_passes + JVP_COST · jvp_passes (+ the matrix-free primal forwards):
      the modeled time in units of one batched gradient of the batch.
    memory_bytes: the parameter-sized buffers the route keeps alive at once (modeled).
    exact: False for the sketch (an unbiased estimate with a stated error bound).
    """

    route: str
    chunk: int
    gradient_passes: float
    jvp_passes: float
    cost_passes: float
    memory_bytes: int
    budget_bytes: int
    exact: bool
    sketch_dim: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a JSON report."""
        return dict(self._asdict())

    def describe(self) -> str:
        """One line for a progress log."""
        what = "exact" if self.exact else f"sketch, k = {self.sketch_dim}, approximate"
        return (
            f"{self.route} ({what}), chunk {self.chunk}, {self.gradient_passes:.3g} gradient "
            f"passes, ~{self.cost_passes:.3g}x one batched gradient, "
            f"{self.memory_bytes / 2**30:.2f} of {self.budget_bytes / 2**30:.2f} GiB"
        )


def _blocks(
    n1: int, n2: int, symmetric: bool, bpe: int, act: int, chunk: int, budget: int
) -> NtkPlan:
    if symmetric:
        nb = -(-n1 // chunk)
        grads = chunk * (1 + nb * (nb - 1) // 2)
        mem = (1 if nb == 1 else 2) * chunk * bpe + chunk * act
        base = n1
    else:
        nb1, nb2 = -(-n1 // chunk), -(-n2 // chunk)
        grads = chunk * (nb1 + nb1 * nb2)
        mem = 2 * chunk * bpe + chunk * act
        base = n1 + n2
    passes = grads / base
    return NtkPlan(ROUTES[0], chunk, passes, 0.0, passes, mem, budget, True)


def _matrix_free(
    n1: int, n2: int, symmetric: bool, bpe: int, act: int, chunk: int, budget: int
) -> NtkPlan:
    base = n1 if symmetric else n1 + n2
    grads = n2 / base
    jvps = n1 * n2 / base
    forwards = n1 * -(-n2 // chunk) / base  # the primal of each batched jvp
    cost = grads + JVP_COST * jvps + FORWARD_COST * forwards
    # the k gradients (the tangents), then a jvp of all N1 examples carrying k tangents: forward
    # mode keeps no residuals, so about half an example's backward activations each
    mem = chunk * bpe + chunk * act + (chunk + 1) * n1 * act // 2
    return NtkPlan(ROUTES[1], chunk, grads, jvps, cost, mem, budget, True)


def _sketch(n: int, bpe: int, act: int, chunk: int, budget: int, sketch_dim: int) -> NtkPlan:
    mem = SKETCH_MEMORY_FACTOR * chunk * bpe + chunk * act
    return NtkPlan(ROUTES[2], chunk, 1.0, 0.0, 1.0, mem, budget, False, sketch_dim)


def _balanced(n: int, c_max: int) -> int:
    """The chunk of the fewest steps of at most c_max (>= 1) examples, balanced: ⌈n / nb⌉."""
    c_max = max(1, min(n, c_max))
    return -(-n // -(-n // c_max))


def plan_ntk(
    n1: int,
    n2: int,
    bytes_per_example: int,
    budget_bytes: int,
    *,
    symmetric: bool = True,
    route: str = "auto",
    chunk: int | None = None,
    allow_sketch: bool = False,
    max_exact_passes: float = MAX_EXACT_PASSES,
    sketch_dim: int = SKETCH_DIM,
    activation_bytes: int = 0,
) -> NtkPlan:
    """The route and chunk of an NTK within `budget_bytes`: a pure function of sizes.

    `activation_bytes`: memory of one example's forward + backward temporaries (activations,
    logits), counted per example of a chunk (0: only the parameter-sized buffers count).

    Per-example gradient passes and memory (bpe = bytes of one example's Jacobian):
      blocks, chunk c, nb = ⌈N/c⌉ blocks: 1 + nb (nb − 1)/2 chunk Jacobians (symmetric), i.e.
        ≈ nb/2 passes; c·bpe alive when nb = 1, else 2·c·bpe. Exact.
      matrix-free (Θ e_j = J (Jᵀ e_j): a vjp of example j, a jvp of the batch): 1 gradient
        pass, N tangent passes (≈ JVP_COST each) and one primal forward per k columns;
        k·bpe alive (the k gradients are the tangents). Exact; linear in gradient passes,
        quadratic in tangents (N1·N2 example tangents).
      sketch: 1 gradient pass, 3·c·bpe alive (gradients and their folds); unbiased,
        relative error ≈ sqrt(2/k).
    `route="auto"`: the exact route of least cost among those that fit the budget (the least
    memory when none fits), blocks taking one block of all N when it fits; then, only when
    `allow_sketch` and that costs more than `max_exact_passes`, the sketch. An explicit
    `route` takes its chunk from the same rules (or `chunk`). The minimal chunk is always
    allowed, even over budget.
    """
    if n1 < 1 or n2 < 1 or bytes_per_example < 1 or budget_bytes < 1:
        raise NTKError(
            f"plan_ntk needs positive sizes, got n1={n1}, n2={n2}, bytes_per_example="
            f"{bytes_per_example}, budget_bytes={budget_bytes}"
        )
    if route != "auto" and route not in ROUTES:
        raise NTKError(f"unknown NTK route {route!r}; use 'auto' or one of {list(ROUTES)}")
    n, bpe, budget, act = max(n1, n2), bytes_per_example, budget_bytes, max(0, activation_bytes)
    if chunk is not None:
        c_blocks = c_mf = c_sketch = min(chunk, n)
    else:
        one_block = symmetric and n * (bpe + act) <= budget
        c_blocks = n if one_block else auto_chunk_size(n, bpe + -(-act // 2), budget)
        c_mf = _balanced(n2, (budget - n1 * act // 2) // (bpe + act + n1 * act // 2))
        c_sketch = _balanced(n, budget // (SKETCH_MEMORY_FACTOR * bpe + act))
    plans = {
        ROUTES[0]: _blocks(n1, n2, symmetric, bpe, act, c_blocks, budget),
        ROUTES[1]: _matrix_free(n1, n2, symmetric, bpe, act, c_mf, budget),
        ROUTES[2]: _sketch(n, bpe, act, c_sketch, budget, sketch_dim),
    }
    if route != "auto":
        return plans[route]
    if chunk is not None:  # a chunk asked for: Jacobian blocks of that size
        return plans[ROUTES[0]]
    exact = [plans[ROUTES[0]], plans[ROUTES[1]]]
    fits = [p for p in exact if p.memory_bytes <= budget]
    best = (
        min(fits, key=lambda p: p.cost_passes) if fits else min(exact, key=lambda p: p.memory_bytes)
    )
    if allow_sketch and best.cost_passes > max_exact_passes:
        return plans[ROUTES[2]]
    return best


def sketch_relative_error(sketch_dim: int) -> float:
    """sqrt(2 / k): the sketch's standard error on Θ_ij relative to ‖∇ℓ_i‖ ‖∇ℓ_j‖ when the
    gradients' mass spreads evenly over the k buckets (the bound in `_ntk_sketch`)."""
    return math.sqrt(2.0 / sketch_dim)
