"""What the ``lensllm`` command prints: rich tables of rankings, benchmark results and a
run's candidates (plain text when not on a terminal). Pure functions of results -> text.

Every name that comes from the user (models, datasets, methods, paths) is escaped before
rich sees it (`_esc`), so ``oops[/]`` or ``[bold]x`` is printed as written, never read as
markup.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import JustifyMethod

__all__ = ["render_ranking", "render_run", "render_table"]


def _esc(text: object, limit: int = 120) -> str:
    """`text` as a literal for rich: markup brackets escaped; longer than `limit` characters,
    its head and tail around an ellipsis (rich lays out a cell in time quadratic in its
    length: a 100,000-character name would take minutes). CSV and JSON keep it whole."""
    from rich.markup import escape

    text = str(text)
    if len(text) > limit:
        half = (limit - 1) // 2
        text = f"{text[:half]}…{text[-half:]}"
    return escape(text)


def render_run(result: Any, *, color: bool = False) -> str:
    """The ranking tables, then one row per candidate: size, zero-shot and last fine-tuned
    loss (nats per byte), the NTK's largest eigenvalue and ‖r‖², the Hessian trace ± s.e."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    def num(x: float, fmt: str = ".4g") -> str:
        return "-" if not math.isfinite(x) else format(x, fmt)

    text = render_ranking(result.rows, result.target, color=color)
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=color, no_color=not color)
    table = Table(title="candidates · test loss in nats per byte", title_justify="left")
    cols = ("model", "params", "zero-shot", "last D", "loss", "NTK λ_max", "‖r‖²", "tr H ± s.e.")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in result.diagnostics.values():
        lam = float(r.eigenvalues.max()) if r.has_ntk else math.nan
        r2 = float(r.residual @ r.residual) if r.has_ntk else math.nan
        hess = (
            f"{r.hessian_trace:.4g} ± {r.hessian_stderr:.2g}"
            if math.isfinite(r.hessian_trace)
            else "-"
        )
        table.add_row(
            _esc(r.name),
            f"{r.n_params:,}",
            num(r.zero_shot, ".4f"),
            f"{int(r.sizes[-1])}",
            num(float(r.losses[-1]), ".4f"),
            num(lam),
            num(r2),
            hess,
        )
    console.print(table)
    measured = [r for r in result.diagnostics.values() if np.isfinite(r.ft_hessian_trace).any()]
    if measured:
        _hessian_table(console, measured, num)
    for f in getattr(result, "files", ()):
        if f.name.startswith(("ranking_target-", "report_target-")):
            console.print(f"ranking for target {result.target:g} in {_esc(f, 400)}")
            break
    console.print(f"results in {_esc(result.out_dir, 400)}")
    return text + buf.getvalue()


def _hessian_table(console: Any, measured: Sequence, num: Any) -> None:
    """The two-phase table of `lensllm run --hessian`, with what its marks mean."""
    from rich.table import Table

    from lensllm_jax.runner.report import ATS_FITTED, hessian_by_size

    phases = Table(
        title="Hessian of the mean probe loss after fine-tuning on D samples "
        "(v = θ_D − θ_0; phase by AtS's rule)",
        title_justify="left",
    )
    for i, col in enumerate(("model", "D", "loss", "tr H ± s.e.", "vᵀHv", "phase")):
        phases.add_column(col, justify="left" if i in (0, 5) else "right")
    assumed = negative = False
    for r in measured:
        for j, e in enumerate(hessian_by_size(r) or []):
            phase = {True: "power", False: "pre-power", None: "-"}[e["power_phase"]]
            if e["power_phase"] and not e["phase_tested"]:
                phase, assumed = "power*", True
            dist = e["distance"]
            negative |= dist is not None and dist < 0
            phases.add_row(
                _esc(r.name) if j == 0 else "",
                str(e["size"]),
                num(float(r.losses[j]), ".4f"),
                "-" if e["trace"] is None else f"{e['trace']:.4g} ± {e['stderr']:.2g}",
                "-" if dist is None else f"{dist:.4g}",
                phase,
            )
    console.print(phases)
    notes = [
        "tr H: Hutchinson estimate of the trace of the Hessian of the mean probe loss, all "
        "parameters."
    ]
    if assumed:
        notes.append(
            f"power*: one of the {ATS_FITTED} largest sizes, which AtS takes as power phase "
            "without a test; give more --sizes to test smaller ones."
        )
    if negative:
        notes.append(
            "vᵀHv < 0: the Hessian at θ_D is indefinite and curves down along v = θ_D − θ_0 "
            "(a saddle direction, not a minimum along the fine-tuning path); the PAC-Bayes "
            "curvature term assumes vᵀHv >= 0."
        )
    for note in notes:
        console.print(note)


def render_ranking(rows: Sequence, target: float, *, color: bool = False) -> str:
    """One rich table per method: rank, model, score (predicted loss), P(best) where the
    method has a calibrated one (then also the 90 % credible set), status."""
    from rich.console import Console
    from rich.table import Table

    from lensllm_jax.selection.ranking import credible_set_text

    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=color, no_color=not color)
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        sure = any(math.isfinite(r.p_best) for r in mine)
        table = Table(
            title=f"{_esc(method)} · predicted loss at D = {target:g}", title_justify="left"
        )
        cols: list[tuple[str, JustifyMethod]] = [
            ("rank", "right"),
            ("model", "left"),
            ("score", "right"),
        ]
        for col, just in [*cols, *([("P(best)", "right")] if sure else [])]:
            table.add_column(col, justify=just)
        table.add_column("status")
        for r in mine:
            score = "nan" if math.isnan(r.score) else f"{r.score:.4f}"
            p_best = ("-" if math.isnan(r.p_best) else f"{r.p_best:.2f}",) if sure else ()
            table.add_row(str(r.rank), _esc(r.model), score, *p_best, _esc(r.status))
        console.print(table)
        if sure:
            where = "calibration: lensllm_jax/selection/confidence.py"
            console.print(f"{_esc(credible_set_text(mine), 400)} ({where})")
    return buf.getvalue()


def render_table(rows: Sequence, *, color: bool = False, width: int = 100) -> str:
    """One rich table per dataset and metric: methods x budgets plus the mean; the best
    value of each column is bold (highest, or lowest for CostPercent)."""
    from rich.console import Console
    from rich.table import Table

    from lensllm_jax.benchmark.protocol import HIGHER_IS_BETTER, METRICS

    datasets = list(dict.fromkeys(r.dataset for r in rows))
    budgets = list(dict.fromkeys(r.budget for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    value = {(r.dataset, r.budget, r.method, r.metric): r.value_percent for r in rows}

    buf = io.StringIO()
    console = Console(
        file=buf, width=width, force_terminal=color, no_color=not color, highlight=False
    )
    for ds in datasets:
        for metric in METRICS:
            higher = HIGHER_IS_BETTER[metric]
            grid = {m: [value.get((ds, b, m, metric), math.nan) for b in budgets] for m in methods}
            for m, vals in grid.items():
                # A method that is NaN at one budget has no honest mean.
                grid[m] = [*vals, sum(vals) / len(vals) if vals else math.nan]
            cols = [*budgets, "mean"]
            best = []
            for j in range(len(cols)):
                col = [grid[m][j] for m in methods if not math.isnan(grid[m][j])]
                best.append((max(col) if higher else min(col)) if col else None)
            table = Table(
                title=f"{_esc(ds)} · {metric} (%, {'higher' if higher else 'lower'} is better)",
                title_justify="left",
            )
            table.add_column("method")
            for c in cols:
                table.add_column(c, justify="right")
            for m in methods:
                cells = []
                for j, v in enumerate(grid[m]):
                    text = "nan" if math.isnan(v) else f"{v:.1f}"
                    if best[j] is not None and v == best[j]:
                        text = f"[bold green]{text}[/]" if color else f"*{text}"
                    cells.append(text)
                table.add_row(_esc(m), *cells)
            console.print(table)
    if not color:
        console.print("* best in its column")
    return buf.getvalue()
