"""One candidate's measurements for `lensllm run`: its fine-tuning curve, its NTK on the
probe set at the pretrained weights, and (optionally) Hessian traces, as a
`result.CandidateResult`.

At the pretrained parameters, on the probe set X (N examples):

    ℓ_i(θ)  = per-example loss in nats per byte (`models.lm_probe`)
    Θ       = J Jᵀ,  J = ∂ℓ(X)/∂θ  (N x N, `core.ntk.loss_gradient_kernel`, chunked)
    r       = f0(X) − y = ℓ(X; θ0)  (the target of a loss is 0)
    F(Θ, t) = ‖exp(−ηΘt) r‖² = Σ_k exp(−2ηλ_k t) (u_kᵀ r)²,  η = the learning rate

Cost per candidate: the fine-tunes (Σ sizes x epochs examples, forward + backward), one
evaluation of the test set per size, about one per-example-gradient pass over the probe
set for Θ (+ 2N²P for the Gram), O(N³) for its eigendecomposition, and 2-3 gradients per
Hessian probe.

With a `mesh` (a `jax.sharding.Mesh` from `lensllm_jax.parallel`), the same quantities come
from the sharded programs: loading into shards, FSDP + data-parallel fine-tuning and
evaluation, the NTK with per-example gradients spread over devices, Hutchinson probes
spread over devices (`parallel.programs`, `parallel.ntk`, `parallel.hessian`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lensllm_jax.errors import (
    CurveFitWarning,
    HessianError,
    LensLLMInputError,
    ModelLoadError,
    NTKError,
)
from lensllm_jax.models.lm_probe import mean_probe_loss_fn, probe_batch, probe_loss_fn
from lensllm_jax.runner.checks import NTK_METHOD, first_line
from lensllm_jax.runner.result import Candidate, CandidateResult, NTKStep
from lensllm_jax.runner.store import LOSS_UNIT

__all__ = [
    "HESSIAN_TOKENS",
    "HOST_MEMORY_FRACTION",
    "MEMORY_ENV",
    "ROUTE_ENV",
    "activation_bytes",
    "hessian_chunk",
    "hessian_distance_step",
    "hessian_step",
    "host_available_bytes",
    "measure_candidate",
    "ntk_memory_budget",
    "ntk_plan",
    "ntk_route",
    "ntk_step",
]

MEMORY_ENV = "LENSLLM_NTK_MEMORY"  # bytes for the NTK's Jacobian blocks, e.g. "8GiB" or "5e8"
ROUTE_ENV = "LENSLLM_NTK_ROUTE"  # auto (default), exact, sketch, jacobian_contraction, ...
ROUTES = ("auto", "exact", "sketch", "jacobian_contraction", "ntk_vector_products")
# Of the host memory available now. A quarter, not more: the rest of a run (model, optimizer
# state, Hessian micro-batches) and other jobs share the host, and running out kills the run
# while fewer blocks only cost gradient passes; $LENSLLM_NTK_MEMORY spends more.
HOST_MEMORY_FRACTION = 0.25
HESSIAN_TOKENS = 512  # tokens per Hessian-vector-product micro-batch (memory ∝ this, not N·T)


def host_available_bytes() -> int | None:
    """Memory the host can give now: MemAvailable of /proc/meminfo (free + reclaimable page
    cache, Linux), else free physical pages x page size (`os.sysconf`), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def ntk_memory_budget() -> int | None:
    """Bytes the NTK's per-example gradients may take: $LENSLLM_NTK_MEMORY as a byte count
    (e.g. "8GiB", "500MB", "2e9"); else, when JAX computes in host memory (CPU),
    HOST_MEMORY_FRACTION of the memory available now (`host_available_bytes`); else None (the
    kernel then asks the accelerator, `core.ntk.memory_budget`). Raises `NTKError` for a value
    that is not a positive byte count."""
    import jax

    from lensllm_jax.core.ntk import parse_bytes

    text = os.environ.get(MEMORY_ENV)
    if text:
        return parse_bytes(text, MEMORY_ENV)
    if jax.default_backend() != "cpu":
        return None
    available = host_available_bytes()
    return max(1, int(HOST_MEMORY_FRACTION * available)) if available else None


def ntk_route() -> str:
    """$LENSLLM_NTK_ROUTE: "auto" (default: the exact route the memory allows, the sketch only
    when exact would cost more than `core.ntk.MAX_EXACT_PASSES` gradient passes, reported),
    "exact" (never the sketch), "sketch", or an exact route by name."""
    route = os.environ.get(ROUTE_ENV, "auto").strip().lower() or "auto"
    if route not in ROUTES:
        raise NTKError(f"{ROUTE_ENV} = {route!r} is not a route; use one of {', '.join(ROUTES)}")
    return route


def activation_bytes(config: Any, tokens: int) -> int:
    """Rough f32 bytes of one example's forward + backward temporaries in a causal LM of
    `config` (a `models.LMConfig`) on `tokens` tokens: per token about 6 logits-sized vectors
    (logits, log-softmax, their cotangents) and 24 hidden-sized vectors per layer."""
    per_token = 6 * int(config.vocab_size) + 24 * int(config.num_layers) * int(config.hidden_size)
    return 4 * int(tokens) * per_token


def ntk_plan(
    params: Any, n: int, chunk_size: int | str | None = "auto", activation: int = 0
) -> Any:
    """The `core.ntk.NtkPlan` of `ntk_step` on n probe examples: route and chunk from the
    memory budget (`ntk_memory_budget`), the activations of one example (`activation` bytes)
    and $LENSLLM_NTK_ROUTE (`ntk_route`)."""
    from lensllm_jax.core import ntk

    route = ntk_route()
    budget = ntk.memory_budget(ntk_memory_budget())
    chunk = n if chunk_size is None else None if chunk_size == "auto" else int(chunk_size)
    return ntk.plan_ntk(
        n,
        n,
        ntk.jacobian_bytes_per_example(params),
        budget,
        route="auto" if route == "exact" else route,
        chunk=chunk,
        allow_sketch=route == "auto",
        activation_bytes=activation,
    )


def ntk_step(
    apply: Callable[..., Any],
    params: Any,
    batch: Mapping[str, np.ndarray],
    *,
    chunk_size: int | str | None = "auto",
    name: str | None = None,
    log: Callable[[str], None] | None = None,
    activation: int = 0,
    mesh: Any = None,
) -> NTKStep:
    """Θ = J Jᵀ of the per-example probe loss ℓ(X) (`probe_loss_fn`), r = ℓ(X; θ0), and
    F's features (`core.ntk.checked_features`: eigh of Θ, Uᵀr, how much was symmetrised/clipped).

    The route (`ntk_plan`; `activation`: bytes of one example's activations, see
    `activation_bytes`): exact Jacobian blocks when the host's memory allows few passes,
    else the matrix-free route, or the count sketch when exact would cost more than
    `core.ntk.MAX_EXACT_PASSES` (a warning and `log` say so, with its error bound).
    Cost: one per-example-gradient pass over the N probe examples when all N gradients fit
    (memory N·P entries), ≈ nb/2 passes for nb blocks, 2N²P for the Gram, O(N³) for eigh.
    Raises `NTKError` for a non-finite kernel or residual.
    """
    import jax

    from lensllm_jax.core import ntk

    loss = probe_loss_fn(apply)
    if mesh is not None:
        from lensllm_jax.parallel import ntk as sharded

        theta = sharded.loss_gradient_kernel(
            loss,
            params,
            batch,
            mesh,
            chunk_size=chunk_size,
            memory_budget_bytes=ntk_memory_budget(),
            name=name,
        )
        residual = sharded.per_example_values(loss, params, batch, mesh)
        feats, diag = ntk.checked_features(theta, residual, name=name)
        return NTKStep(np.asarray(theta), residual, feats, diag)
    n = int(np.shape(batch["tokens"])[0])
    plan = ntk_plan(params, n, chunk_size, activation)
    budget = plan.budget_bytes
    if log is not None:
        log(f"NTK route: {plan.describe()}")
    if plan.route == "sketch":
        sk = ntk.sketched_ntk(
            loss, params, batch, chunk_size=plan.chunk, memory_budget_bytes=budget, name=name
        )
        theta = sk.theta
        rel = sk.frobenius_error_bound() / max(float(np.linalg.norm(np.asarray(theta))), 1e-300)
        msg = (
            f"{name}: the NTK is a sketch (k = {plan.sketch_dim}, an exact kernel would cost "
            f"more than {ntk.MAX_EXACT_PASSES:g} gradient passes); relative Frobenius error "
            f"bound {rel:.2g}; set {ROUTE_ENV}=exact for the exact kernel"
        )
        warnings.warn(msg, stacklevel=2)
        if log is not None:
            log(msg)
    else:
        theta = ntk.loss_gradient_kernel(
            loss,
            params,
            batch,
            implementation=plan.route,
            chunk_size=plan.chunk,
            memory_budget_bytes=budget,
            name=name,
        )
    residual = np.asarray(jax.jit(loss)(params, batch))
    feats, diag = ntk.checked_features(theta, residual, name=name)
    return NTKStep(np.asarray(theta), residual, feats, diag)


def hessian_chunk(batch: Mapping[str, np.ndarray]) -> int:
    """Probe examples per Hessian-vector-product micro-batch: ⌊HESSIAN_TOKENS / T⌋ (at least
    1) for probes of T tokens (`core.hessian` takes the largest divisor of N not above it)."""
    return max(1, HESSIAN_TOKENS // int(np.shape(batch["tokens"])[1]))


def hessian_step(
    apply: Callable[..., Any],
    params: Any,
    batch: Mapping[str, np.ndarray],
    *,
    num_probes: int,
    seed: int,
    name: str,
    mesh: Any = None,
) -> tuple[float, float]:
    """Hutchinson estimate of tr ∇²_θ (1/N Σ_i ℓ_i(θ)) at the pretrained params, with
    Rademacher probes seeded by `seed`: (mean, standard error of the mean over probes).
    A phase diagnostic (LENSLLM's PAC-Bayes account), not used by the ranking.
    Cost: num_probes Hessian-vector products (≈ 2-3 gradients each), one probe at a time, each
    over micro-batches of `hessian_chunk` examples: memory of one HVP on ≈ HESSIAN_TOKENS
    tokens, whatever the probe set's size."""
    import jax

    from lensllm_jax.core import hessian

    if mesh is not None:
        from lensllm_jax.parallel import hessian as sharded

        est = sharded.hutchinson_trace(
            mean_probe_loss_fn(apply),
            params,
            jax.random.PRNGKey(seed),
            num_probes,
            mesh,
            group_by="top",
            name=name,
            batch=batch,
        )
        return float(est.mean), float(est.stderr)
    est = hessian.hutchinson_trace(
        mean_probe_loss_fn(apply),
        params,
        jax.random.PRNGKey(seed),
        num_probes,
        group_by="top",
        name=name,
        batch=batch,
        example_chunk=hessian_chunk(batch),
    )
    return float(est.mean), float(est.stderr)


def hessian_distance_step(
    apply: Callable[..., Any],
    params_pretrained: Any,
    params_finetuned: Any,
    batch: Mapping[str, np.ndarray],
    *,
    name: str,
    mesh: Any = None,
) -> float:
    """vᵀHv with v = θ_finetuned − θ_pretrained and H the Hessian of the mean probe loss at
    the fine-tuned params (`hessian.hessian_distance`): the curvature term of Hessian-based
    PAC-Bayes bounds for fine-tuning. Cost: 1 Hessian-vector product, over micro-batches as in
    `hessian_step`."""
    from lensllm_jax.core import hessian

    if mesh is not None:
        from lensllm_jax.parallel import hessian as sharded

        return sharded.hessian_distance(
            mean_probe_loss_fn(apply),
            params_pretrained,
            params_finetuned,
            mesh,
            group_by="top",
            name=name,
            batch=batch,
        )
    dist = hessian.hessian_distance(
        mean_probe_loss_fn(apply),
        params_pretrained,
        params_finetuned,
        group_by="top",
        name=name,
        batch=batch,
        blocks=False,
        example_chunk=hessian_chunk(batch),
    )
    return float(dist.total)


def measure_candidate(
    cand: Candidate,
    token_data: Any,
    split: Any,
    sizes: Sequence[int],
    config: Any,
    *,
    seed: int,
    ntk: bool,
    ntk_chunk: int | str | None,
    hessian_probes: int,
    log: Callable[[str], None],
    prefix: str,
    on_step: Callable[[int], None] | None = None,
    mesh: Any = None,
) -> CandidateResult:
    """Load, fine-tune on every size, NTK step, Hessian trace: one candidate's results
    (on the sharded programs when a `mesh` is given). on_step(n): n more fine-tuning steps
    are done (progress)."""
    from lensllm_jax import models
    from lensllm_jax.runner import finetune

    start = time.perf_counter()
    try:
        m = models.load(cand.location, mesh=mesh)
    except ModelLoadError as err:  # broken weights
        raise LensLLMInputError(first_line(err), file=cand.path) from None
    n_params = int(m.num_params)
    log(f"{prefix}: loaded ({n_params:,} parameters, {m.config.model_type}); fine-tuning")

    def on_point(size: int, loss: float, status: str, steps: int) -> None:
        log(f"{prefix}: D = {size}: test loss {loss:.4f} nats/byte ({steps} steps, {status})")

    probe = probe_batch(token_data.take(split.probe))
    ft_hessian = np.full((3, len(sizes)), np.nan)  # trace, stderr, vᵀHv per size

    def on_params(size: int, params_ft: Any) -> None:
        j = list(sizes).index(size)
        got = _hessian_or_warn(
            lambda: (
                *hessian_step(
                    m.apply,
                    params_ft,
                    probe,
                    num_probes=hessian_probes,
                    seed=seed,
                    name=cand.name,
                    mesh=mesh,
                ),
                hessian_distance_step(
                    m.apply, m.params, params_ft, probe, name=cand.name, mesh=mesh
                ),
            ),
            f"{cand.name} at D = {size}",
        )
        if got is not None:
            ft_hessian[:, j] = got
            tr, se, dist = got
            log(f"{prefix}: D = {size}: Hessian trace {tr:.4g} ± {se:.2g}, vᵀHv {dist:.4g}")

    curve = finetune.loss_curve(
        m.apply,
        m.params,
        token_data.take(split.pool),
        token_data.take(split.test),
        list(sizes),
        config,
        seed=seed,
        loss_unit=LOSS_UNIT,
        on_point=on_point,
        on_params=on_params if hessian_probes else None,
        on_step=on_step,
        mesh=mesh,
    )
    log(f"{prefix}: zero-shot test loss {curve.zero_shot:.4f} nats/byte")
    if ntk:
        log(f"{prefix}: measuring the NTK on {len(split.probe)} probe examples")
    kernel = _probe_kernel(m, probe, cand.name, ntk_chunk, log, prefix, mesh) if ntk else None
    h_mean = h_se = math.nan
    if hessian_probes:
        got = _hessian_or_warn(
            lambda: hessian_step(
                m.apply,
                m.params,
                probe,
                num_probes=hessian_probes,
                seed=seed,
                name=cand.name,
                mesh=mesh,
            ),
            cand.name,
        )
        if got is not None:
            h_mean, h_se = got
            log(f"{prefix}: Hessian trace {h_mean:.4g} ± {h_se:.2g} (pretrained)")
    ntk_fields = {}
    if kernel is not None:
        ntk_fields = {
            "theta": kernel.theta.astype(np.float64),
            "residual": kernel.residual.astype(np.float64),
            "eigenvalues": np.asarray(kernel.features[0], np.float64),
            "projected_residual": np.asarray(kernel.features[1], np.float64),
            "kernel_diagnostics": np.asarray([float(x) for x in kernel.diagnostics]),
        }
    return CandidateResult(
        name=cand.name,
        path=cand.location,
        family=m.config.model_type,
        n_params=n_params,
        sizes=np.asarray(curve.sizes, np.float64),
        losses=np.asarray(curve.losses, np.float64),
        zero_shot=float(curve.zero_shot),
        num_steps=np.asarray(curve.num_steps, np.int64),
        status=tuple(str(s) for s in curve.status),
        loss_se=np.asarray(curve.loss_se, np.float64),
        eta=float(config.learning_rate),
        hessian_trace=h_mean,
        hessian_stderr=h_se,
        ft_hessian_trace=ft_hessian[0],
        ft_hessian_stderr=ft_hessian[1],
        ft_hessian_distance=ft_hessian[2],
        **ntk_fields,
        seconds=time.perf_counter() - start,
    )


def _hessian_or_warn(measure: Callable[[], Any], where: str) -> Any:
    """`measure()`, or None and a warning when the Hessian is unusable (NaN/inf)."""

    try:
        return measure()
    except HessianError as err:
        warnings.warn(f"{where}: no Hessian trace ({first_line(err)})", stacklevel=3)
        return None


def _probe_kernel(
    m: Any,
    probe: Mapping[str, np.ndarray],
    name: str,
    chunk: int | str | None,
    log: Callable[[str], None],
    prefix: str,
    mesh: Any = None,
) -> NTKStep | None:
    """`ntk_step` at the pretrained params; None (and a warning) if the kernel is unusable
    (NaN/inf, not PSD): LensLLM-NTK then ranks the candidate last."""
    try:
        step = ntk_step(
            m.apply,
            m.params,
            probe,
            chunk_size=chunk,
            name=name,
            mesh=mesh,
            log=lambda line: log(f"{prefix}: {line}"),
            activation=activation_bytes(m.config, np.shape(probe["tokens"])[1]),
        )
    except NTKError as err:
        warnings.warn(
            f"{name}: no NTK features ({first_line(err)}); {NTK_METHOD} ranks it last",
            CurveFitWarning,
            stacklevel=3,
        )
        return None
    eig = np.asarray(step.features.eigenvalues)
    log(
        f"{prefix}: NTK on {eig.size} probe examples: λ_max {eig.max():.4g}, "
        f"‖r‖² {float(step.residual @ step.residual):.4g}"
    )
    return step
