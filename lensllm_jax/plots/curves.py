"""Pictures of a ranking: each candidate's curve with the laws that scored it, and the
ranking with how sure it is.

`curves_figure`: one panel per candidate (rank order): the measured test losses with their
standard errors (a table's ``se_<size>`` columns), the zero-shot loss, every method's curve
redrawn from its fitted parameters (`RankRow.details`) up to the target, and for LensLLM
the extrapolation from the largest fine-tuned size D_top with its 90 % band, the error
model of `selection.confidence` on log L at each D:

    σ_m(D)² = (c · log₂(D / D_top))² + v_m(D) + s_m²,

c the task's error per doubling (details "per_doubling"), v_m(D) = var_level +
2·dx·cov_level_slope + dx²·var_pooled_slope the candidate's fused-fit variance (dx =
log D − log D_top), s_m the relative standard error of its largest measured loss; the
interval drawn at the target is the one behind P(best) (details "sigma", from
`confidence.assess`, which counts at least one doubling).

`ranking_figure`: the predicted loss at the target per candidate with that interval, and
P(best) with the 90 % credible set. `selection_figure` puts both side by side (what
``lensllm select --plot`` writes).

Every artist that carries data has a gid ("measured", "zero-shot", "target",
"<method>:curve", "LensLLM:law", "LensLLM:band", "<method>:score", "p_best", "interval"),
so tests and users can read the drawn numbers back. Cost: O(M · methods · grid) numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lensllm_jax.plots._base import (
    LEVEL,
    Z_90,
    finite,
    log_grid,
    method_color,
    new_figure,
    short_name,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

    from lensllm_jax.data.curves import CurveTable

__all__ = [
    "band_sigma",
    "curve_from_details",
    "curves_figure",
    "ranking_figure",
    "selection_figure",
    "target_sigmas",
]

_LAWS = {  # method -> the law whose parameters its details carry
    "VanillaFit": "vanilla",
    "RectifiedFit": "rectified",
    "LensLLM-NTK": "ntk",
    "LensLLM": "lensllm",
}


def _get(details: Mapping[str, Any], *keys: str) -> list[float] | None:
    out = []
    for k in keys:
        v = details.get(k)
        if v is None or not finite(v):
            return None
        out.append(float(v))
    return out


def curve_from_details(
    method: str, details: Mapping[str, Any] | None, d: Any, *, part: str = "score"
) -> np.ndarray | None:
    """The curve a method scored with, redrawn at sizes `d` from one candidate's details
    (`RankRow.details`); None when the method has no curve or the fit failed.

      VanillaFit    B / D^β + E
      RectifiedFit  B / (D_l + D^β) + E
      LensLLM-NTK   B / (F + D^β) + E,   F = F(Θ, t) at the fitted t
      AtS           exp(intercept + slope · log D)   (fitted from D = power_from on)
      LensLLM       exp(level + pooled_slope · (log D − log d_top))   (part="score": the
                    fused extrapolation whose value at the target is the score), or
                    B / (F + D^β) + E (part="law": the LENSLLM law behind its tangent)

    Each curve evaluated at the target equals the method's score. Cost O(len(d)).
    """
    if details is None:
        return None
    d = np.asarray(d, np.float64)
    with np.errstate(all="ignore"):
        if method == "AtS":
            p = _get(details, "slope", "intercept")
            return None if p is None else np.exp(p[1] + p[0] * np.log(d))
        if method == "LensLLM" and part == "score":
            p = _get(details, "level", "pooled_slope", "d_top")
            return None if p is None else np.exp(p[0] + p[1] * (np.log(d) - math.log(p[2])))
        law = _LAWS.get(method)
        if law == "vanilla":
            p = _get(details, "B", "beta", "E")
            return None if p is None else p[0] / d ** p[1] + p[2]
        curvature = {"rectified": "D_l", "ntk": "F", "lensllm": "F"}.get(law or "")
        if curvature is None:
            return None
        p = _get(details, "B", "beta", "E", curvature)
        return None if p is None else p[0] / (p[3] + d ** p[1]) + p[2]


def target_sigmas(table: CurveTable, scores: np.ndarray, target: float) -> np.ndarray:
    """(M,) σ on log L at the target for LensLLM's scores (table order): the σ behind
    P(best) (`confidence.assess`: the task's scale, each fit's variance, the largest size's
    relative standard error). Rows of `ranking.rank` carry it as details "sigma"."""
    from lensllm_jax.selection.confidence import assess

    return assess(table, float(target), np.asarray(scores, np.float64)).sigmas


def band_sigma(details: Mapping[str, Any], d: Any, rel_se: float = 0.0) -> np.ndarray | None:
    """σ on log L of LensLLM's extrapolation at sizes `d` >= d_top (module docstring), from
    a row's details; None without the error model's details (an uncalibrated row)."""
    p = _get(details, "per_doubling", "d_top")
    if p is None:
        return None
    c, d_top = p
    dx = np.log(np.asarray(d, np.float64)) - math.log(d_top)
    var = _get(details, "var_level", "cov_level_slope", "var_pooled_slope")
    v = 0.0 if var is None else var[0] + 2 * dx * var[1] + dx * dx * var[2]
    return np.sqrt((c * dx / math.log(2)) ** 2 + np.maximum(v, 0.0) + rel_se**2)


def _by_method(rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r.method, {})[r.model] = r
    return out


def _primary(rows: Sequence[Any], method: str | None) -> str:
    """The method a figure is about: the one asked, else the first with P(best), else the
    first."""
    if method is not None:
        return method
    for r in rows:
        if finite(r.p_best):
            return r.method
    return rows[0].method


def curves_figure(
    table: CurveTable,
    rows: Sequence[Any],
    target: float,
    *,
    methods: Sequence[str] | None = None,
    max_panels: int = 30,
    ncols: int | None = None,
    truth: CurveTable | None = None,
) -> Figure:
    """One panel per candidate, in the order of the first calibrated method's ranking (at
    most `max_panels`): measured points ± s.e., the zero-shot loss, each method's curve to
    the target, LensLLM's 90 % band, the target. `rows`: `selection.ranking.rank`'s rows
    (with details). `truth`: a table of the same candidates with larger sizes (a backtest:
    `table` is `truth.up_to(budget)`); its points beyond `table`'s are drawn hollow, "held
    out". Cost: see the module docstring."""
    n = min(table.num_models, max_panels)
    cols = ncols or min(n, 5)
    nrows = -(-n // cols)
    fig = new_figure(max(2.9 * cols + 0.3, 7.0), 2.4 * nrows + 0.9)
    draw_curves(
        fig, table, rows, target, methods=methods, max_panels=max_panels, ncols=cols, truth=truth
    )
    return fig


def draw_curves(
    fig: Figure | SubFigure,
    table: CurveTable,
    rows: Sequence[Any],
    target: float,
    *,
    methods: Sequence[str] | None = None,
    max_panels: int = 30,
    ncols: int = 5,
    truth: CurveTable | None = None,
) -> None:
    """`curves_figure`'s panels, drawn into `fig` (a figure or a subfigure)."""
    by = _by_method(rows)
    chosen = [m for m in by if methods is None or m in methods]
    primary = _primary(rows, None)
    order = [r.model for r in rows if r.method == primary]
    order += [m for m in table.models if m not in order]
    index = {m: i for i, m in enumerate(table.models)}
    shown = [m for m in order if m in index][:max_panels]
    nrows = -(-len(shown) // ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(shown):
            ax.set_visible(False)
            if k >= ncols:  # the panel above is the last of its column: label its x axis
                axes.flat[k - ncols].tick_params(labelbottom=True)
                axes.flat[k - ncols].set_xlabel("fine-tuning samples D", fontsize=8)
    for ax, model in zip(axes.flat, shown, strict=False):
        _panel(ax, table, index[model], by, chosen, target)
        if truth is not None and model in truth.models:
            _held_out(ax, truth, truth.models.index(model), float(table.sizes[-1]))
        row = by.get(primary, {}).get(model)
        title = short_name(model)
        if row is not None:
            title = f"{row.rank}. {title}"
            if finite(row.p_best):
                title += f" · P(best) {row.p_best:.2f}"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("test loss", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("fine-tuning samples D", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=7, frameon=False)
    more = "" if len(shown) == table.num_models else f" (first {len(shown)} of {table.num_models})"
    fig.suptitle(
        f"{table.name}: measured curves and fitted laws, extrapolated to D = {target:,.0f}{more}",
        fontsize=10,
    )


def _panel(
    ax: Any,
    table: CurveTable,
    i: int,
    by: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    target: float,
) -> None:
    sizes, losses = table.sizes, table.losses[i]
    se = None if table.loss_se is None else np.nan_to_num(table.loss_se[i], nan=0.0)
    d_top = float(sizes[-1])
    ax.set_xscale("log")
    bars = ax.errorbar(
        sizes, losses, yerr=se, fmt="o", ms=3.5, color="k", capsize=2, lw=0.8, zorder=5,
        label="measured ± s.e." if se is not None else "measured",
    )  # fmt: skip
    bars.lines[0].set_gid("measured")
    lo, hi = float(np.min(losses - (0 if se is None else se))), float(np.max(losses))
    for method in methods:
        row = by[method].get(table.models[i])
        if row is None or row.details is None:
            continue
        color = method_color(method)
        start = float(sizes[0])
        if method == "AtS" and row.details.get("power_from") is not None:
            start = float(row.details["power_from"])
        if method == "LensLLM":
            d_law = log_grid(float(sizes[0]), d_top, 60)
            law = curve_from_details(method, row.details, d_law, part="law")
            if law is not None:
                (ln,) = ax.plot(d_law, law, color=color, lw=1, ls="--", label="LENSLLM law")
                ln.set_gid("LensLLM:law")
            start = d_top
        d = log_grid(start, float(target))
        y = curve_from_details(method, row.details, d)
        if y is None:
            continue
        (ln,) = ax.plot(d, y, color=color, lw=1.4, label=method)
        ln.set_gid(f"{method}:curve")
        rel = 0.0 if se is None else float(se[-1] / losses[-1])
        s = band_sigma(row.details, d, rel) if method == "LensLLM" else None
        sigma = row.details.get("sigma") if s is not None else None
        if s is not None and sigma is not None:
            band = ax.fill_between(
                d, y * np.exp(-Z_90 * s), y * np.exp(Z_90 * s), color=color, alpha=0.18,
                lw=0, label=f"LensLLM {LEVEL:.0%} band",
            )  # fmt: skip
            band.set_gid("LensLLM:band")
            lo = min(lo, float(y[-1] * math.exp(-Z_90 * sigma)))
            hi = max(hi, float(y[-1] * math.exp(Z_90 * sigma)))
        if finite(row.score):
            yerr = None
            if s is not None and sigma is not None:  # the interval behind P(best)
                yerr = [
                    [row.score * (1 - math.exp(-Z_90 * sigma))],
                    [row.score * (math.exp(Z_90 * sigma) - 1)],
                ]
            mark = ax.errorbar([target], [row.score], yerr=yerr, fmt="D", ms=4, color=color,
                               capsize=2, lw=1, zorder=6)  # fmt: skip
            mark.lines[0].set_gid(f"{method}:score")
            lo = min(lo, float(row.score))
    vline = ax.axvline(target, color="0.4", lw=0.8, ls=":", label="target")
    vline.set_gid("target")
    _zero_shot(ax, float(table.zero_shot[i]), float(sizes[0]) / 2, lo, hi)


def _held_out(ax: Any, truth: CurveTable, j: int, d_top: float) -> None:
    """The points of a backtest's full curve beyond the sizes the methods saw: hollow."""
    beyond = truth.sizes > d_top * (1 + 1e-12)
    if beyond.any():
        (pts,) = ax.plot(truth.sizes[beyond], truth.losses[j, beyond], "o", ms=3.5, mfc="none",
                         color="k", lw=0, label="held out")  # fmt: skip
        pts.set_gid("held-out")
        lo, hi = ax.get_ylim()
        vals = truth.losses[j, beyond]
        ax.set_ylim(min(lo, float(vals.min()) - 0.03 * (hi - lo)), max(hi, float(vals.max())))


def _zero_shot(ax: Any, z: float, x: float, lo: float, hi: float) -> None:
    """The zero-shot loss (D = 0) at the left edge; off the scale it is written instead."""
    span = max(hi - lo, 1e-3 * abs(hi))
    if z <= hi + 1.5 * span:
        (pt,) = ax.plot([x], [z], "x", color="0.35", ms=5, label="zero-shot (D = 0, at left)")
        pt.set_gid("zero-shot")
        top = max(hi, z)
    else:
        ax.annotate(
            f"zero-shot {z:.3g} ↑", (0.03, 0.95), xycoords="axes fraction", fontsize=6,
            va="top", color="0.35", gid="zero-shot",
        )  # fmt: skip
        top = hi
    pad = 0.08 * max(top - lo, 1e-3 * abs(top))
    ax.set_ylim(lo - pad, top + pad)


def ranking_figure(rows: Sequence[Any], target: float, *, method: str | None = None) -> Figure:
    """The ranking of one method (default: the first with P(best)): predicted loss at the
    target per candidate, rank 1 on top, with the 90 % interval exp(log L̂ ± 1.645 σ) when
    the rows carry σ (details "sigma": LensLLM); and P(best), the credible set filled.
    Cost O(M)."""
    mine = [r for r in rows if r.method == _primary(rows, method)]
    fig = new_figure(7.5, max(2.2, 1.2 + 0.24 * len(mine)))
    draw_ranking(fig, rows, target, method=method)
    return fig


def draw_ranking(
    fig: Figure | SubFigure, rows: Sequence[Any], target: float, *, method: str | None = None
) -> None:
    """`ranking_figure`, drawn into `fig` (a figure or a subfigure)."""
    from lensllm_jax.selection.confidence import credible_set

    name = _primary(rows, method)
    mine = [r for r in rows if r.method == name]
    p = np.array([r.p_best for r in mine], np.float64)
    sure = bool(np.isfinite(p).any())
    axes = fig.subplots(1, 2 if sure else 1, squeeze=False, sharey=True)[0]
    y = np.arange(len(mine))
    scores = np.array([r.score for r in mine], np.float64)
    ax = axes[0]
    xerr = None
    s = np.array([(r.details or {}).get("sigma") or np.nan for r in mine], np.float64)
    if sure and np.isfinite(s).any():  # the σ behind P(best), from each row's details
        xerr = np.vstack([scores * (1 - np.exp(-Z_90 * s)), scores * (np.exp(Z_90 * s) - 1)])
    color = method_color(name)
    eb = ax.errorbar(scores, y, xerr=xerr, fmt="o", color=color, ms=4, capsize=2, lw=1)
    eb.lines[0].set_gid("interval")
    ax.set_yticks(y, [f"{r.rank}. {short_name(r.model, 34)}" for r in mine], fontsize=7)
    ax.set_ylim(len(mine) - 0.5, -0.5)  # rank 1 on top
    band = f" ± {LEVEL:.0%} interval" if xerr is not None else ""
    ax.set_xlabel(f"predicted loss{band}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", lw=0.3, alpha=0.5)
    if sure:
        keep = credible_set(p, LEVEL)
        colors = [color if k else "white" for k in keep]
        bars = axes[1].barh(y, np.nan_to_num(p), height=0.6, color=colors, edgecolor=color,
                            lw=0.8)  # fmt: skip
        for yi, pi in zip(y, p, strict=True):
            if np.isfinite(pi):
                axes[1].text(min(pi, 0.82) + 0.02, yi, f"{pi:.2f}", va="center", fontsize=6)
        for patch in bars.patches:
            patch.set_gid("p_best")
        axes[1].set_xlim(0, 1)
        axes[1].set_xlabel("P(best)", fontsize=8)
        axes[1].set_title(f"filled: the {LEVEL:.0%} credible set", fontsize=8)
        axes[1].tick_params(labelsize=7)
        axes[1].grid(axis="x", lw=0.3, alpha=0.5)
    fig.suptitle(f"{name}: predicted test loss at D = {target:,.0f}", fontsize=10)


def selection_figure(
    table: CurveTable,
    rows: Sequence[Any],
    target: float,
    *,
    methods: Sequence[str] | None = None,
    max_panels: int = 30,
) -> Figure:
    """The ranking (left) beside every candidate's curve (right): what
    ``lensllm select --plot FILE`` writes."""
    n = min(table.num_models, max_panels)
    cols = min(n, 4)
    nrows = -(-n // cols)
    mine = [r for r in rows if r.method == _primary(rows, None)]
    height = max(2.4 * nrows + 0.9, 1.6 + 0.24 * len(mine))
    fig = new_figure(6.0 + 2.7 * cols, height)
    subs: Any = fig.subfigures(1, 2, width_ratios=[6.0, 2.7 * cols])
    left, right = subs[0], subs[1]
    draw_ranking(left, rows, target)
    draw_curves(right, table, rows, target, methods=methods, max_panels=max_panels, ncols=cols)
    return fig
