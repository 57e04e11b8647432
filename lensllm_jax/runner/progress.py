"""How `lensllm run` says what it is doing and how long it will take.

Before any work, `estimate` prices the run: fine-tuning steps from the recipe
(Σ_D ⌈epochs · D / B⌉, at least min_steps, per candidate), FLOPs from the parameter count
(≈ 6·P·B·T per training step, 2·P·T per evaluated example, ≈ 6·P·T per probe example for
the NTK and ≈ 2 gradients per Hessian probe, 4 for vᵀHv), and a rough time from this machine's
measured speed on a float32 matrix product (an optimistic rate: real steps reach a
fraction of it, and compiling comes on top).

While it runs, a `Progress` takes the log lines and the fine-tuning steps:
`RichProgress` (a terminal) draws a bar with the steps done and the time left above which
the log lines scroll; `LineProgress` (a log file, a pipe) prints the same one-line logs as
before, with the share done and the time left appended once steps have been timed;
`Progress` itself says nothing (``-q``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "Estimate",
    "LineProgress",
    "Progress",
    "RichProgress",
    "estimate",
    "format_seconds",
    "log_estimate",
    "matmul_flops_per_second",
    "param_count",
]


def format_seconds(s: float) -> str:
    """'45 s', '12 min', '3.4 h', '2.1 days'."""
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


class Progress:
    """Says nothing (``-q``): the interface `run` reports through."""

    quiet = True  # nothing is shown: `run` skips pricing the work

    def log(self, line: str) -> None:
        """One line of what happened."""

    def start(self, total_steps: int) -> None:
        """The run's fine-tuning steps, all candidates together."""

    def advance(self, steps: int) -> None:
        """`steps` more fine-tuning steps are done."""

    def close(self) -> None:
        """The run is over (or was interrupted)."""


class LineProgress(Progress):
    """One-line logs through `write`, each with the share of steps done and the time left
    once at least one step has been timed (a log file's view of the bar)."""

    quiet = False

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self._write, self._clock = write, clock
        self._total = self._done = 0
        self._t0: float | None = None
        self._first = 0  # steps done when the clock started (the first batch pays compiling)

    def start(self, total_steps: int) -> None:
        self._total, self._done, self._t0 = int(total_steps), 0, None

    def advance(self, steps: int) -> None:
        if self._t0 is None:  # time from the first report on: compiling is not a step
            self._t0, self._first = self._clock(), self._done + steps
        self._done += steps

    def eta(self) -> float | None:
        """Seconds left at the pace of the steps timed so far (None before any)."""
        if self._t0 is None or self._done <= self._first or self._total <= 0:
            return None
        rate = (self._clock() - self._t0) / (self._done - self._first)
        return max(self._total - self._done, 0) * rate

    def log(self, line: str) -> None:
        left = self.eta()
        if left is not None and self._done < self._total:
            share = 100.0 * self._done / self._total
            line = f"{line} · {share:.0f} % of steps · ≈ {format_seconds(left)} left"
        self._write(line)


class RichProgress(Progress):
    """A rich progress bar on a terminal (stderr): steps done, time spent, time left; the
    log lines print above it."""

    quiet = False

    def __init__(self, prefix: str = "lensllm", console: Any = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._prefix = prefix
        self._bar = Bar(
            TextColumn("[bold]fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps ·"),
            TimeElapsedColumn(),
            TextColumn("· left"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task: Any = None

    def start(self, total_steps: int) -> None:
        if total_steps <= 0:
            return  # nothing to fine-tune (every candidate read back): no bar
        self._bar.start()
        self._task = self._bar.add_task("fine-tuning", total=max(int(total_steps), 1))

    def advance(self, steps: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, steps)

    def log(self, line: str) -> None:
        self._bar.console.print(f"{self._prefix}: {line}", markup=False, highlight=False)

    def close(self) -> None:
        self._bar.stop()


class Estimate(NamedTuple):
    """What a run will cost, before it starts (candidates still to measure)."""

    steps: int  # fine-tuning steps, all candidates and sizes
    flops: float  # fine-tuning + evaluation + NTK + Hessian, ≈
    params: tuple[int, ...]  # per candidate
    flops_per_second: float  # this machine's measured float32 matmul rate
    seconds: float  # flops / flops_per_second: optimistic

    def line(self, num_candidates: int, sizes: Sequence[int]) -> str:
        plural = "" if num_candidates == 1 else "s"
        biggest = max(self.params, default=0)
        return (
            f"estimate: {num_candidates} candidate{plural} (up to {biggest:,} parameters) x "
            f"{len(sizes)} sizes: {self.steps:,} fine-tuning steps, ≈ {self.flops:.2g} FLOPs; "
            f"at this machine's {self.flops_per_second / 1e9:.0f} GFLOP/s (a matrix product) "
            f"≈ {format_seconds(self.seconds)} at best, plus compiling"
        )


def param_count(location: str) -> int:
    """Parameters of a checkpoint from its config alone (shapes of the zoo's init, no
    weights read or allocated). Cost: tracing the init."""
    import jax
    import numpy as np

    from lensllm_jax import models
    from lensllm_jax.models.loading import family_module

    cfg = models.inspect(location).config
    init = family_module(cfg).init_params
    shapes = jax.eval_shape(lambda k: init(cfg, k), jax.random.key(0))
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)))


def matmul_flops_per_second(n: int = 512, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 (n, n) @ (n, n) on the default device, best of
    `repeats` after one warm-up. Cost: ≈ 0.1 s on a CPU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / max(best, 1e-9)


def estimate(
    params: Sequence[int],
    lengths: Sequence[int],
    sizes: Sequence[int],
    config: Any,
    *,
    test_size: int,
    probe_size: int,
    ntk: bool,
    hessian_probes: int,
    flops_per_second: float | None = None,
) -> Estimate:
    """The cost of measuring candidates with `params` parameters and padded token lengths
    `lengths` (one each): fine-tuning steps (`finetune.num_train_steps`) and FLOPs as in the
    module docstring; time at `flops_per_second` (default: measured now)."""
    from lensllm_jax.runner.finetune import num_train_steps

    steps_one = sum(num_train_steps(int(d), config) for d in sizes)
    flops = 0.0
    for p, t in zip(params, lengths, strict=True):
        flops += 6.0 * p * int(config.batch_size) * t * steps_one  # fine-tuning
        flops += 2.0 * p * t * test_size * (len(sizes) + 1)  # evaluations
        if ntk:
            flops += 6.0 * p * t * probe_size + 2.0 * probe_size**2 * p  # Jacobian + Gram
        if hessian_probes:  # per probe an HVP ≈ 2 gradients; vᵀHv 2 HVPs; every size + θ0
            per = (2 * hessian_probes + 4) * 6.0 * p * t * probe_size
            flops += per * (len(sizes) + 1)
    rate = matmul_flops_per_second() if flops_per_second is None else flops_per_second
    return Estimate(steps_one * len(params), flops, tuple(params), rate, flops / rate)


def log_estimate(p: Any, todo: Sequence[int], log: Callable[[str], None]) -> None:
    """One line pricing the candidates `todo` of the run plan `p` (`job.RunPlan`) still to
    measure (`estimate`), and advice when that exceeds an hour."""
    from lensllm_jax.runner.checks import first_line

    try:
        counts = [param_count(p.candidates[i].location) for i in todo]
    except Exception as err:  # an estimate is advice: never fail the run over it
        log(f"no estimate ({type(err).__name__}: {first_line(err)})")
        return
    est = estimate(
        counts,
        [int(p.token_data[i].tokens.shape[1]) for i in todo],
        p.sizes,
        p.config,
        test_size=len(p.split.test),
        probe_size=len(p.split.probe),
        ntk=p.ntk,
        hessian_probes=p.hessian_probes,
    )
    log(est.line(len(todo), p.sizes))
    if est.seconds > 3600:
        log(
            "that is long: fewer or smaller --sizes, fewer --epochs or --min-steps, a shorter "
            "--max-length, or an accelerator (pip install 'lensllm-jax[cuda12]') cut it"
        )
