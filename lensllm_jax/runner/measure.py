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
    "MEMORY_ENV",
    "hessian_distance_step",
    "hessian_step",
    "measure_candidate",
    "ntk_memory_budget",
    "ntk_step",
]

MEMORY_ENV = "LENSLLM_NTK_MEMORY"  # bytes for the NTK's Jacobian blocks, e.g. "8GiB" or "5e8"


def ntk_memory_budget() -> int | None:
    """$LENSLLM_NTK_MEMORY as a byte count (e.g. "8GiB", "500MB", "2e9"), or None when unset
    (the kernel then sizes its chunks from the device, `core.ntk.memory_budget`). Raises
    `NTKError` for a value that is not a positive byte count."""
    from lensllm_jax.core.ntk import parse_bytes

    text = os.environ.get(MEMORY_ENV)
    return parse_bytes(text, MEMORY_ENV) if text else None


def ntk_step(
    apply: Callable[..., Any],
    params: Any,
    batch: Mapping[str, np.ndarray],
    *,
    chunk_size: int | str | None = "auto",
    name: str | None = None,
    mesh: Any = None,
) -> NTKStep:
    """Θ = J Jᵀ of the per-example probe loss ℓ(X) (`probe_loss_fn`), r = ℓ(X; θ0), and
    F's features (`core.ntk.checked_features`: eigh of Θ, Uᵀr, how much was symmetrised/clipped).

    Cost: about one per-example-gradient pass over the N probe examples, `chunk_size` at a
    time ("auto": as many as a memory budget allows; memory ≈ 2·chunk·P gradient entries),
    2N²P for the Gram, O(N³) for eigh.
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
    theta = ntk.loss_gradient_kernel(
        loss,
        params,
        batch,
        chunk_size=chunk_size,
        memory_budget_bytes=ntk_memory_budget(),
        name=name,
    )
    residual = np.asarray(jax.jit(loss)(params, batch))
    feats, diag = ntk.checked_features(theta, residual, name=name)
    return NTKStep(np.asarray(theta), residual, feats, diag)


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
    Cost: num_probes Hessian-vector products (≈ 1 + num_probes gradients, linearized)."""
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
    PAC-Bayes bounds for fine-tuning. Cost: 2 Hessian-vector products."""
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
        step = ntk_step(m.apply, m.params, probe, chunk_size=chunk, name=name, mesh=mesh)
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
