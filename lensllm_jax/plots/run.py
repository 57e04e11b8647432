"""Pictures of what `lensllm run` measured: the NTK spectra and F(Θ, t), the Hessian's two
phases, the linearised dynamics against measured training, and the ``plots/`` folder.

`ntk_figure`: per candidate, the eigenvalues λ_k of the probe-set NTK Θ (largest first)
and F(Θ, t) = ‖exp(−ηΘt) r‖² = Σ_k exp(−2ηλ_k t) (u_kᵀ r)² against t, with the t that
LensLLM-NTK fitted marked. `hessian_figure`: per candidate, the Hutchinson trace of the
probe loss's Hessian ± s.e. and vᵀHv (v = θ_D − θ_0) against D, with AtS's pre-power /
power boundary. `linearised_figure`: measured ‖ℓ(θ_t)‖² during gradient descent on
½‖ℓ‖² against the linearised prediction, continuous exp(−ηΘt) and discrete (I − ηΘ)^t.
`write_run_plots` writes them, with `curves.figure`s, into a run's ``plots/`` folder.

Every data artist has a gid ("spectrum:<name>", "F:<name>", "t_fit:<name>", "trace",
"trace0", "vHv", "boundary", "measured", "F:continuous", "F:discrete") to read it back.
Cost: O(M · N · grid) numpy for F; drawing is O(points).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lensllm_jax.plots._base import candidate_color, new_figure, save, short_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lensllm_jax.runner.result import CandidateResult

__all__ = [
    "f_of_t",
    "hessian_figure",
    "linearised_figure",
    "ntk_figure",
    "t_grid",
    "write_run_plots",
]

Spectrum = tuple[np.ndarray, np.ndarray, float]  # (eigenvalues, u_kᵀ r, eta)


def f_of_t(spectrum: Spectrum, t: Any) -> np.ndarray:
    """F(Θ, t) = Σ_k exp(−2ηλ_k t) c_k² at each t (float64 numpy). Cost O(N · len(t))."""
    lam, c, eta = (np.asarray(spectrum[0], np.float64), np.asarray(spectrum[1], np.float64),
                   float(spectrum[2]))  # fmt: skip
    t = np.asarray(t, np.float64)
    return np.sum(np.exp(-2.0 * eta * lam[:, None] * t.ravel()[None, :]) * (c**2)[:, None], 0)


def t_grid(spectra: Mapping[str, Spectrum], n: int = 160) -> np.ndarray:
    """Steps t spanning every candidate's time scales 1/(2ηλ): from 1 % of the fastest
    mode's to 100x the slowest (non-zero) mode's, at most 12 decades."""
    fast, slow = [], []
    for lam, _, eta in spectra.values():
        lam = np.asarray(lam, np.float64)
        pos = lam[lam > 1e-12 * max(float(lam.max(initial=0.0)), 1e-300)]
        if pos.size and eta > 0:
            fast.append(1.0 / (2 * eta * pos.max()))
            slow.append(1.0 / (2 * eta * pos.min()))
    if not fast:
        return np.geomspace(1e-2, 1e4, n)
    lo, hi = 1e-2 * min(fast), 1e2 * max(slow)
    return np.geomspace(lo, min(hi, lo * 1e12), n)


def ntk_figure(
    spectra: Mapping[str, Spectrum], fitted_t: Mapping[str, float | None] | None = None
) -> Figure:
    """Eigenvalues (largest first, log scale) and F(Θ, t) of each candidate; the step t
    that LensLLM-NTK fitted (`fitted_t`, name -> t) marked on its F curve."""
    fig = new_figure(10.0, 3.8)
    ax_l, ax_f = fig.subplots(1, 2)
    t = t_grid(spectra)
    f0 = 0.0  # the largest F(Θ, 0) = ‖r‖²: the y range spans 6 decades below it
    for i, (name, spec) in enumerate(spectra.items()):
        color = candidate_color(i)
        lam = np.sort(np.asarray(spec[0], np.float64))[::-1]
        k = np.arange(1, lam.size + 1)
        shown = lam > 0
        (ln,) = ax_l.plot(k[shown], lam[shown], "o-", ms=3, lw=1, color=color,
                          label=short_name(name))  # fmt: skip
        ln.set_gid(f"spectrum:{name}")
        (fl,) = ax_f.plot(t, f_of_t(spec, t), lw=1.4, color=color, label=short_name(name))
        fl.set_gid(f"F:{name}")
        f0 = max(f0, float(f_of_t(spec, [0.0])[0]))
        t_fit = (fitted_t or {}).get(name)
        if t_fit is not None and np.isfinite(t_fit) and t_fit > 0:
            # A fitted t left of the grid (t -> 0: F = ‖r‖²) is drawn at the edge, as "<".
            edge = t_fit < t[0]
            x = t[0] if edge else t_fit
            (pt,) = ax_f.plot([x], f_of_t(spec, [t_fit]), "<" if edge else "D", ms=5,
                              color=color)  # fmt: skip
            pt.set_gid(f"t_fit:{name}")
    ax_l.set_yscale("log")
    ax_l.xaxis.get_major_locator().set_params(integer=True)
    ax_l.set_xlabel("k (eigenvalues, largest first)", fontsize=8)
    ax_l.set_ylabel("λ_k of the probe-set NTK Θ", fontsize=8)
    ax_l.set_title("NTK spectrum", fontsize=9)
    ax_f.set_xscale("log")
    ax_f.set_yscale("log")
    if f0 > 0:
        ax_f.set_ylim(1e-6 * f0, 2 * f0)
    ax_f.set_xlabel("steps t", fontsize=8)
    ax_f.set_ylabel("F(Θ, t) = ‖exp(−ηΘt) r‖²", fontsize=8)
    title = "linearised test loss F(Θ, t)"
    mark = "\n◆ t fitted by LensLLM-NTK (◀: t below the axis, F = ‖r‖²)" if fitted_t else ""
    ax_f.set_title(title + mark, fontsize=9)
    for ax in (ax_l, ax_f):
        ax.tick_params(labelsize=7)
        ax.grid(lw=0.3, alpha=0.5)
    ax_f.legend(fontsize=7, frameon=False)
    return fig


def hessian_figure(results: Sequence[CandidateResult]) -> Figure:
    """Per candidate (a column): the Hessian trace ± s.e. after fine-tuning on each D (the
    pretrained trace dashed) and vᵀHv, v = θ_D − θ_0 (zero dotted: below it the Hessian
    curves down along v), with AtS's pre-power / power boundary (shaded: pre-power;
    no boundary when AtS could test no size). Only candidates with a measured trace."""
    from lensllm_jax.runner.report import ats_phase

    measured = [r for r in results if np.isfinite(r.ft_hessian_trace).any()]
    if not measured:
        raise ValueError("no candidate has Hessian traces after fine-tuning (run --hessian)")
    fig = new_figure(max(3.3 * len(measured) + 0.4, 6.5), 5.2)
    axes = fig.subplots(2, len(measured), squeeze=False, sharex="col")
    for j, r in enumerate(measured):
        top, bottom = axes[0, j], axes[1, j]
        d = np.asarray(r.sizes, np.float64)
        eb = top.errorbar(d, r.ft_hessian_trace, yerr=r.ft_hessian_stderr, fmt="o-", ms=3.5,
                          capsize=2, lw=1, color="tab:blue", label="after fine-tuning")  # fmt: skip
        eb.lines[0].set_gid("trace")
        if np.isfinite(r.hessian_trace):
            h0 = top.axhline(r.hessian_trace, color="0.4", ls="--", lw=0.9, label="pretrained")
            h0.set_gid("trace0")
        (vh,) = bottom.plot(d, r.ft_hessian_distance, "s-", ms=3.5, lw=1, color="tab:purple")
        vh.set_gid("vHv")
        bottom.axhline(0.0, color="0.3", lw=0.6, ls=":")
        first, tested = ats_phase(r)
        for ax in (top, bottom):
            ax.set_xscale("log")
            if d.size <= 8:  # few sizes: label each one, not log decades
                ax.set_xticks(d, [f"{x:,.0f}" for x in d])
                ax.minorticks_off()
            ax.tick_params(labelsize=7)
            ax.grid(lw=0.3, alpha=0.5)
            if first is not None and tested and first > 0:
                edge = float(np.sqrt(d[first - 1] * d[first]))
                ax.axvspan(d[0] / 1.5, edge, color="0.85", lw=0, zorder=0)
                line = ax.axvline(edge, color="0.3", lw=1)
                line.set_gid("boundary")
        phase = "AtS: all tested sizes in the power phase" if first == 0 else "shaded: pre-power"
        if not tested:
            phase = "too few sizes for AtS to test one"
        top.set_title(f"{short_name(r.name)}\n{phase}", fontsize=8)
        top.set_ylabel("tr H of the probe loss", fontsize=8)
        bottom.set_ylabel("vᵀHv, v = θ_D − θ_0", fontsize=8)
        bottom.set_xlabel("fine-tuning samples D", fontsize=8)
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle("Hessian of the probe loss after fine-tuning on D samples", fontsize=10)
    return fig


def linearised_figure(
    steps: Any, measured: Any, spectrum: Spectrum, *, title: str | None = None
) -> Figure:
    """Measured ‖ℓ(X; θ_t)‖² of gradient descent on ½‖ℓ(X)‖² (step size η) against the
    linearised dynamics: F(Θ, t) = ‖exp(−ηΘt) r‖² (continuous) and ‖(I − ηΘ)^t r‖²
    (the same discrete steps), both from Θ and r at θ_0."""
    steps = np.asarray(steps, np.float64)
    lam, c = np.asarray(spectrum[0], np.float64), np.asarray(spectrum[1], np.float64)
    eta = float(spectrum[2])
    t = np.linspace(0.0, float(steps.max()), 200)
    fig = new_figure(5.6, 3.8)
    ax = fig.subplots()
    (cont,) = ax.plot(t, f_of_t(spectrum, t), lw=1.5, color="tab:red", label="F(Θ, t), exp(−ηΘt)")
    cont.set_gid("F:continuous")
    disc = np.sum(((1.0 - eta * lam)[:, None] ** (2 * steps[None, :])) * (c**2)[:, None], axis=0)
    (dl,) = ax.plot(steps, disc, "--", lw=1, color="tab:orange", label="(I − ηΘ)^t, discrete")
    dl.set_gid("F:discrete")
    (ms,) = ax.plot(steps, measured, "o", ms=4, color="k", label="measured ‖ℓ(θ_t)‖²")
    ms.set_gid("measured")
    ax.set_xlabel("gradient-descent steps t (step size η)", fontsize=8)
    ax.set_ylabel("‖ℓ(X; θ_t)‖² on the probe set", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title or "linearised (NTK) dynamics against training", fontsize=9)
    return fig


def _fitted_t(rows: Sequence[Any]) -> dict[str, float | None]:
    return {r.model: (r.details or {}).get("t") for r in rows if r.method == "LensLLM-NTK"}


def write_run_plots(result: Any, folder: str | os.PathLike[str]) -> list[Path]:
    """A run's pictures as PNG files in `folder` (created): curves.png and ranking.png
    (`curves.curves_figure`, `curves.ranking_figure`), ntk.png when the NTK was measured,
    hessian.png with ``--hessian``. `result`: a `RunResult`. Returns the paths written."""
    from lensllm_jax.plots.curves import curves_figure, ranking_figure

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        save(curves_figure(result.table, result.rows, result.target), out / "curves.png"),
        save(ranking_figure(result.rows, result.target), out / "ranking.png"),
    ]
    diag = list(result.diagnostics.values())
    spectra = {r.name: (r.eigenvalues, r.projected_residual, r.eta) for r in diag if r.has_ntk}
    if spectra:
        fig = ntk_figure(spectra, _fitted_t(result.rows))
        written.append(save(fig, out / "ntk.png"))
    if any(np.isfinite(r.ft_hessian_trace).any() for r in diag):
        written.append(save(hessian_figure(diag), out / "hessian.png"))
    return written
