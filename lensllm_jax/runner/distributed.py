"""Multi-process runs on JAX's own distributed runtime: `lensllm run --distributed`.

Every process runs the same program (SPMD, one controller per host): each reads the inputs,
builds the same mesh over the devices of all processes and takes part in every sharded
program. Only process 0 writes files and prints; the others compute alongside it.

    cluster = Cluster("10.0.0.1:1234", num_processes=2, process_id=0)  # or Cluster() to detect
    initialize(cluster)        # jax.distributed.initialize, once, before any device is used

With no values, `jax.distributed.initialize()` detects them where JAX can (Slurm, Open MPI,
TPU pods, or the environment variable ``JAX_COORDINATOR_ADDRESS`` with JAX's process count
and id variables). The helpers below keep the processes in agreement: a decision taken by
process 0 (an input error, which candidates an earlier run finished) is broadcast, so no
process waits forever in a collective the others never reach.

Cost: one small all-gather or broadcast per agreement (a few bytes; a finished candidate's
result file when resuming).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np

from lensllm_jax.errors import LensLLMError, LensLLMInputError

__all__ = [
    "Cluster",
    "agree",
    "broadcast_bytes",
    "broadcast_flags",
    "initialize",
    "is_writer",
    "process_count",
]

T = TypeVar("T")


class Cluster(NamedTuple):
    """Where the coordinator listens and who this process is; None = let JAX detect it."""

    coordinator: str | None = None  # "HOST:PORT" of process 0's coordinator service
    num_processes: int | None = None
    process_id: int | None = None


def initialize(cluster: Cluster) -> None:
    """`jax.distributed.initialize` with the cluster's values (those left None are detected
    by JAX). Does nothing if this process is already initialized. Raises
    `LensLLMInputError` (one line) for incomplete or inconsistent values or when the
    coordinator cannot be reached."""
    import jax

    if jax.distributed.is_initialized():
        return
    given = [cluster.num_processes is not None, cluster.process_id is not None]
    if any(given) and not all(given):
        raise LensLLMInputError(
            "--num-processes and --process-id go together",
            hint="give both (and --coordinator), or neither to let JAX detect them",
        )
    if cluster.num_processes is not None and cluster.process_id is not None:
        if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
            raise LensLLMInputError(
                f"process id {cluster.process_id} is not in 0..{cluster.num_processes - 1}",
                hint="number the processes 0, 1, ..., N-1",
            )
    if cluster.coordinator is not None and ":" not in cluster.coordinator:
        raise LensLLMInputError(
            f"coordinator {cluster.coordinator!r} is not HOST:PORT", hint="e.g. 10.0.0.1:1234"
        )
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
        )
    except (RuntimeError, ValueError) as err:
        text = " ".join(str(err).split())[:300]
        raise LensLLMInputError(
            f"cannot start JAX's distributed runtime ({text})",
            hint="check --coordinator, --num-processes and --process-id, or the cluster's "
            "environment",
        ) from None


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """True in the one process that writes files and prints (process 0)."""
    import jax

    return jax.process_index() == 0


def agree(step: Callable[[], T]) -> T:
    """Run `step` in every process; if it raised a `LensLLMError` in any of them, raise in
    all (the original error where it happened, a one-line pointer to it elsewhere), so that
    no process goes on alone into a collective. One process: just `step()`."""
    if process_count() == 1:
        return step()
    from jax.experimental import multihost_utils

    err: LensLLMError | None = None
    out: Any = None
    try:
        out = step()
    except LensLLMError as e:
        err = e
    failed = np.asarray(multihost_utils.process_allgather(np.int32(err is not None)))
    if err is not None:
        raise err
    if failed.any():
        first = int(np.flatnonzero(failed.reshape(-1))[0])
        raise LensLLMInputError(
            f"process {first} stopped on an error", hint="see that process's message"
        )
    return out


def broadcast_flags(flags: np.ndarray) -> np.ndarray:
    """Process 0's boolean array (same shape everywhere) in every process."""
    if process_count() == 1:
        return np.asarray(flags, bool)
    from jax.experimental import multihost_utils

    got = multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))
    return np.asarray(got).astype(bool)


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's bytes in every process (the others pass None)."""
    if process_count() == 1:
        return data or b""
    from jax.experimental import multihost_utils

    size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int64(len(data or b"")))))
    buf = np.zeros(size, np.uint8)
    if data:
        buf[:] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive in memory (what `broadcast_bytes` carries for a saved result)."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()
