"""Arms in which the NTK spectrum can matter, to test whether it earns its place in the law
(issue 9). Each is a selection method ``method(table, budget, target) -> Selection``
registered in `selection.registry`; A and B are the existing ``LensLLM`` / ``LensLLM-law``
and ``LensLLM-NTK``.

C  ``LensLLM-cap``     L(D) = B/(F + D^β) + E with F = ‖r‖²·u/(1+u) ∈ (0, ‖r‖²), u fitted: the
                       cap alone, no spectrum. With t free, B's F(t) = Σ_k e^{−2ηλ_k t} c_k²
                       sweeps (F(∞), ‖r‖²] monotonically, so B = C up to the optimiser
                       whenever F(∞) = 0 (a full-rank kernel; tested).
D  ``LensLLM-NTK-steps``
                       L(D) = B/(F(Θ, τ(D)) + D^β) + E, F evaluated per curve point at the
                       steps the recipe actually takes at D: F(Θ, τ) = Σ_k e^{−2ηλ_k τ} c_k²,
                       τ(D) = Σ_s lr_s/lr over the N(D) = max(epochs·⌈D/B⌉, min_steps) steps
                       (`core.laws._steps_time`), η the SGD-equivalent learning rate of the
                       recipe's AdamW (``sgd_eta``: lr·‖u₁‖/‖g₀‖, the SGD step size that
                       moves the weights as far as Adam's first step; AdamW's
                       per-coordinate preconditioning is folded into that scalar, Θ stays
                       the Euclidean NTK). B, β, E fitted; F(Θ, 0) = ‖r‖² held.
   ``LensLLM-NTK-steps-F0``
                       the same with F = F0·φ(D), φ(D) = F(Θ, τ(D))/‖r‖², F0 fitted: the
                       spectrum sets only the shape of F's decay along the curve, not its
                       units ((nats/byte)² x probes, arbitrary against D^β).
E  ``…-shuffled``      D (and D-F0) with each candidate's kernel (λ, ĉ = c/‖c‖, η) taken from
                       another candidate (a seeded derangement), its own ‖r‖² kept: the
                       control that keeps everything but the match of spectrum to model.
   ``LensLLM-NTK-steps-lr``
                       D with η = the recipe's learning rate (AdamW read as plain SGD).
   ``LensLLM-NTK-steps-rate``
                       D with F(0) = ‖r‖² held and η scaled by a fitted k: the freedom of B's
                       fitted t, but the recipe's ratios of steps between sizes kept, so the
                       spectrum's shape enters (not in the issue's list: "anything better").
F  ``LensLLM-kernel``  LensLLM with the kernel's summaries as covariates of its
                       empirical-Bayes slope trend beside log(model size): s_m ~ N(θ_m, v_m),
                       θ_m ~ N(x_mᵀγ, τ²), x_m = (1, log n_m, log λ_max, log tr Θ/N,
                       log r_eff, log a) (`kernel_summaries`); ``LensLLM-kernel-shuffled``
                       its control (the summaries deranged across candidates).

Every arm sees only the curve points <= budget, the zero-shot losses, the parameter counts
and the table's spectra (`CurveTable.ntk`; the steps arms also need the spectra's extras
``sgd_eta`` and the schedule columns, `data.spectra.EXTRA_COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lensllm_jax.data.curves import CurveTable, NTKSpectra
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection._fusion import _calibration, _fay_herriot, _lines
from lensllm_jax.selection.base import Selection, fit_predict, from_predictions, visible_curves
from lensllm_jax.selection.lensllm import _with_zero_shot

__all__ = [
    "SCHEDULE_COLUMNS",
    "SUMMARY_NAMES",
    "derangement",
    "kernel_summaries",
    "kernel_trend",
    "kernel_trend_shuffled",
    "lensllm_cap",
    "lensllm_law",
    "ntk_steps",
    "ntk_steps_f0",
    "ntk_steps_f0_shuffled",
    "ntk_steps_lr",
    "ntk_steps_lr_shuffled",
    "ntk_steps_rate",
    "ntk_steps_rate_shuffled",
    "ntk_steps_shuffled",
    "residual_decay",
    "summary_matrix",
]

SCHEDULE_COLUMNS = ("batch_size", "epochs", "min_steps", "max_steps", "time_slope", "time_offset")
SUMMARY_NAMES = ("lambda_max", "trace_per_n", "effective_rank", "alignment")
SHUFFLE_SEED = 0


def kernel_summaries(eigenvalues: Any, projected_residual: Any) -> dict[str, float]:
    """Summary statistics of one kernel Θ = U diag(λ) Uᵀ with c = Uᵀr (N probes):

      lambda_max      max_k λ_k
      trace_per_n     tr Θ / N = Σ λ_k / N        (the mean squared gradient norm)
      effective_rank  (Σ λ_k)² / Σ λ_k²           (participation ratio, 1 … N)
      alignment       rᵀΘr / (‖r‖² · tr Θ/N) = Σ λ_k c_k² / (Σ c_k² · Σ λ_k / N)
                      (> 1: the residual lies along the kernel's large directions)
      residual_norm2  ‖r‖² = Σ c_k²

    Cost O(N)."""
    lam = np.clip(np.asarray(eigenvalues, np.float64), 0.0, None)
    c2 = np.asarray(projected_residual, np.float64) ** 2
    n = lam.size
    tr = float(lam.sum())
    return {
        "lambda_max": float(lam.max()) if n else float("nan"),
        "trace_per_n": tr / max(n, 1),
        "effective_rank": tr**2 / float(np.sum(lam**2)) if tr > 0 else float("nan"),
        "alignment": float(lam @ c2) / (float(c2.sum()) * tr / n) if tr > 0 else float("nan"),
        "residual_norm2": float(c2.sum()),
    }


def summary_matrix(spectra: NTKSpectra) -> np.ndarray:
    """(M, 4) log of `SUMMARY_NAMES` per candidate (NaN where a spectrum is missing)."""
    out = np.full((len(spectra.available), len(SUMMARY_NAMES)), np.nan)
    for i, have in enumerate(np.asarray(spectra.available, bool)):
        if have:
            s = kernel_summaries(spectra.eigenvalues[i], spectra.projected_residual[i])
            with np.errstate(divide="ignore", invalid="ignore"):
                out[i] = np.log([s[k] for k in SUMMARY_NAMES])
    return out


def derangement(m: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """A seeded permutation of range(m) with no fixed point (m >= 2): the shuffled controls
    give every candidate another candidate's kernel. Rejection sampling (~e draws)."""
    if m < 2:
        return np.arange(m)
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(m)
        if not np.any(p == np.arange(m)):
            return p


def _spectra(table: CurveTable, method: str) -> NTKSpectra:
    if table.ntk is None:
        raise LensLLMInputError(
            f"{method} needs each candidate's NTK spectrum",
            file=table.source or table.name,
            hint="give lensllm select --ntk FILE (ntk_features.csv), or drop the method",
        )
    return table.ntk


def lensllm_law(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm A (the law alone): L(D) = B/(F + D^β) + E, F fitted, on the zero-shot point and
    every size <= budget; score L(target). LensLLM without the AtS fusion and the pooling.
    Cost: one batched fit (M x 16 starts)."""
    _, d, l_all = _with_zero_shot(table, budget_size)
    pred, ok, _ = fit_predict("lensllm", d, l_all, target)
    return from_predictions(pred, ok, visible_curves(table, budget_size)[0], "LensLLM-law")


def lensllm_cap(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm C: L(D) = B/(F + D^β) + E with F = ‖r‖²·u/(1 + u), u > 0 fitted (``lensllm_cap``
    law): the curve-only law with F capped at the probe residual's ‖r‖², no spectrum.
    Cost: one batched fit (M x 16 starts, forward-mode Jacobian)."""
    spectra = _spectra(table, "LensLLM-cap")
    sizes, d, l_all = _with_zero_shot(table, budget_size)
    have = np.asarray(spectra.available, bool)
    r2 = np.sum(np.asarray(spectra.projected_residual, np.float64) ** 2, axis=1)
    have &= r2 > 0
    pred = np.full(table.num_models, np.nan)
    ok = np.zeros(table.num_models, bool)
    if have.any():
        pred[have], ok[have], _ = fit_predict("lensllm_cap", d, l_all[have], target, aux=r2[have])
    return from_predictions(pred, ok, sizes, "LensLLM-cap")


def _steps_aux(spectra: NTKSpectra, method: str, source: str) -> tuple[np.ndarray, ...]:
    """(eigenvalues, projections, η, schedule (M, 6)) for the `lensllm_ntk_steps` law; η is
    ``sgd_eta`` where given, else the spectra's η (the recipe read as plain SGD)."""
    missing = [c for c in SCHEDULE_COLUMNS if c not in spectra.extras]
    if missing:
        raise LensLLMInputError(
            f"{method} needs the fine-tuning schedule beside the NTK spectra "
            f"(no {missing[0]!r} column)",
            file=source,
            hint="the zoo (benchmarks/zoo/build.py) writes the schedule columns "
            "batch_size, epochs, min_steps, max_steps, time_slope, time_offset",
        )
    schedule = np.column_stack(
        [np.asarray(spectra.extras[c], np.float64) for c in SCHEDULE_COLUMNS]
    )
    eta = np.asarray(spectra.eta, np.float64)
    if "sgd_eta" in spectra.extras:
        sgd = np.asarray(spectra.extras["sgd_eta"], np.float64)
        eta = np.where(np.isfinite(sgd), sgd, eta)
    return (
        np.asarray(spectra.eigenvalues, np.float64),
        np.asarray(spectra.projected_residual, np.float64),
        eta,
        schedule,
    )


def residual_decay(table: CurveTable, sizes: Any, *, plain_lr: bool = False) -> np.ndarray:
    """φ(D) = F(Θ, τ(D)) / ‖r‖² per candidate at `sizes` (S,): the share of the probe
    residual the linearised dynamics leave after the recipe's steps at D (arm D's term;
    1 at D = 0), with η = ``sgd_eta`` (or the recipe's lr with `plain_lr`).
    (M, S) float64. Cost O(M·S·N)."""
    import jax

    from lensllm_jax.core import laws

    spectra = _spectra(table, "residual_decay")
    aux = _steps_aux(spectra, "residual_decay", table.source or table.name)
    if plain_lr:
        aux = (aux[0], aux[1], np.asarray(spectra.eta, np.float64), aux[3])
    with jax.enable_x64(True), np.errstate(divide="ignore"):
        log_d = jax.numpy.log(jax.numpy.asarray(sizes, jax.numpy.float64).reshape(-1))
        one = jax.vmap(laws._ntk_steps_log_phi, in_axes=(None, 0))
        return np.exp(np.asarray(one(log_d, aux)))


def ntk_steps(
    table: CurveTable,
    budget_size: float,
    target: float,
    *,
    fit_f0: bool = False,
    fit_rate: bool = False,
    plain_lr: bool = False,
    permutation: Sequence[int] | np.ndarray | None = None,
    name: str = "LensLLM-NTK-steps",
) -> Selection:
    """Arm D: fit L(D) = B/(F0·φ(D) + D^β) + E (``lensllm_ntk_steps`` law) to the zero-shot
    point and every size <= budget, score L(target):

        φ(D) = Σ_k e^{−2ηλ_k τ(D)} c_k² / ‖c‖²,   τ(D) = Σ_{s < N(D)} lr_s / lr,

    with N(D) the steps the recipe takes at D (the spectra's schedule columns), η the
    SGD-equivalent rate ``sgd_eta`` (else the spectra's η), F0 = ‖r‖² held (the paper's
    F(Θ, t) = ‖exp(−ηΘt) r‖², per point) or fitted (`fit_f0`: the spectrum then sets only
    the shape of the decay); or, with `fit_rate`, F0 = ‖r‖² held and η scaled by a fitted
    k > 0 (``lensllm_ntk_steps_rate``: AdamW's effective rate left to the curve, the ratios
    τ(D)/τ(D') of the recipe kept). `plain_lr` takes η = the spectra's η (the recipe's
    learning rate, AdamW read as plain SGD) instead of ``sgd_eta``: a rate 60-350x smaller
    on the zoo, under which F decays over the visible sizes instead of within one step.
    `permutation` p gives candidate i the kernel (λ, ĉ, η) of
    candidate p[i] and keeps its own ‖r‖² (arm E, the control). A candidate without a
    spectrum, or whose fit fails, is "failed" (NaN, ranks last).
    Cost: one batched fit (M x 16 starts, S_b + 1 points, O(N) per point).
    """
    spectra = _spectra(table, name)
    eig, proj, eta, schedule = _steps_aux(spectra, name, table.source or table.name)
    if plain_lr:
        eta = np.asarray(spectra.eta, np.float64)
    have = np.asarray(spectra.available, bool) & np.all(np.isfinite(schedule), axis=1)
    r2 = np.sum(proj**2, axis=1)
    if permutation is not None:
        p = np.asarray(permutation, np.int64)
        eig, proj, eta, have = eig[p], proj[p], eta[p], have & have[p]
    have &= (r2 > 0) & np.isfinite(eta) & (eta > 0)
    sizes, d, l_all = _with_zero_shot(table, budget_size)
    pred = np.full(table.num_models, np.nan)
    ok = np.zeros(table.num_models, bool)
    if have.any():
        if permutation is not None:  # the deranged shape, scaled to the candidate's own ‖r‖²
            proj = proj * np.sqrt(r2 / np.maximum(np.sum(proj**2, axis=1), 1e-300))[:, None]
        aux = (eig[have], proj[have], eta[have], schedule[have])
        if fit_rate:
            law, fixed = "lensllm_ntk_steps_rate", None
        else:
            law, fixed = "lensllm_ntk_steps", (None if fit_f0 else {"F0": r2[have]})
        pred[have], ok[have], _ = fit_predict(law, d, l_all[have], target, aux=aux, fixed=fixed)
    return from_predictions(pred, ok, sizes, name)


def ntk_steps_f0(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm D with F0 fitted (`ntk_steps(fit_f0=True)`)."""
    return ntk_steps(table, budget_size, target, fit_f0=True, name="LensLLM-NTK-steps-F0")


def ntk_steps_lr(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm D with η = the recipe's learning rate (`ntk_steps(plain_lr=True)`)."""
    return ntk_steps(table, budget_size, target, plain_lr=True, name="LensLLM-NTK-steps-lr")


def ntk_steps_lr_shuffled(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm E for D-lr: kernels deranged across candidates (seed 0), own ‖r‖² kept."""
    p = derangement(table.num_models)
    return ntk_steps(
        table,
        budget_size,
        target,
        plain_lr=True,
        permutation=p,
        name="LensLLM-NTK-steps-lr-shuffled",
    )


def ntk_steps_rate(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm D with η's scale fitted (`ntk_steps(fit_rate=True)`)."""
    return ntk_steps(table, budget_size, target, fit_rate=True, name="LensLLM-NTK-steps-rate")


def ntk_steps_rate_shuffled(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm E for D-rate: kernels deranged across candidates (seed 0), own ‖r‖² kept."""
    p = derangement(table.num_models)
    return ntk_steps(
        table,
        budget_size,
        target,
        fit_rate=True,
        permutation=p,
        name="LensLLM-NTK-steps-rate-shuffled",
    )


def ntk_steps_shuffled(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm E: D with the kernels deranged across candidates (`derangement`, seed 0)."""
    p = derangement(table.num_models)
    return ntk_steps(table, budget_size, target, permutation=p, name="LensLLM-NTK-steps-shuffled")


def ntk_steps_f0_shuffled(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm E for D-F0: kernels deranged across candidates (seed 0)."""
    p = derangement(table.num_models)
    return ntk_steps(
        table, budget_size, target, fit_f0=True, permutation=p, name="LensLLM-NTK-steps-F0-shuffled"
    )


def kernel_trend(
    table: CurveTable,
    budget_size: float,
    target: float,
    *,
    summaries: Sequence[str] = SUMMARY_NAMES,
    with_size: bool = True,
    permutation: Sequence[int] | np.ndarray | None = None,
    name: str = "LensLLM-kernel",
) -> Selection:
    """Arm F: LensLLM (law tangent fused with AtS, `_fusion`) whose Fay–Herriot slope trend
    takes the kernel's summaries as covariates:

        s_m ~ N(θ_m, v_m),  θ_m ~ N(x_mᵀγ, τ²),
        x_m = (1, [log n_m], log of each of `summaries` (`kernel_summaries`)),

        log L̂(target) = ℓ_m + E[θ_m | s] · (log target − x_top).

    Same lines, calibration and fusion as `lensllm.lensllm` (calls `_fusion`'s pieces); only
    the pooling's covariates differ. `permutation` derangs the summaries across candidates
    (the control). A candidate without a spectrum is "failed" (NaN, ranks last).
    Cost: LensLLM's (two batched law fits, M Laplace covariances) + O(M·p²).
    """
    spectra = _spectra(table, name)
    sizes, _ = visible_curves(table, budget_size)
    lines = _lines(table, budget_size)
    k_law, k_ats = _calibration(table, budget_size)
    cov_t, cov_a = lines.law_cov * k_law, lines.ats_cov * k_ats
    with np.errstate(all="ignore"):
        vs_t, vs_a = cov_t[:, 1, 1], cov_a[:, 1, 1]
        vl_t, vl_a = cov_t[:, 0, 0], cov_a[:, 0, 0]
        slope = (lines.law_slope / vs_t + lines.ats_slope / vs_a) / (1 / vs_t + 1 / vs_a)
        v_slope = 1 / (1 / vs_t + 1 / vs_a)
        level = (lines.law_level / vl_t + lines.ats_level / vl_a) / (1 / vl_t + 1 / vl_a)
    cols_all = summary_matrix(spectra)[:, [SUMMARY_NAMES.index(s) for s in summaries]]
    if permutation is not None:
        cols_all = cols_all[np.asarray(permutation, np.int64)]
    ok = lines.ok & np.isfinite(slope) & np.isfinite(level) & (v_slope > 0)
    ok &= np.all(np.isfinite(cols_all), axis=1)
    pooled = slope.copy()
    if ok.any():
        cols = [np.ones(ok.sum())]
        if with_size:
            cols.append(np.log(np.asarray(table.n_params, np.float64)[ok]))
        cols += list(cols_all[ok].T)
        pooled[ok], _ = _fay_herriot(slope[ok], v_slope[ok], np.column_stack(cols))
    with np.errstate(all="ignore"):
        pred = np.exp(level + pooled * (np.log(target) - lines.x_top))
    return from_predictions(pred, ok, sizes, name)


def kernel_trend_shuffled(table: CurveTable, budget_size: float, target: float) -> Selection:
    """Arm F's control: the kernel summaries deranged across candidates (seed 0)."""
    p = derangement(table.num_models)
    return kernel_trend(table, budget_size, target, permutation=p, name="LensLLM-kernel-shuffled")
