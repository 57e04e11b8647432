"""The ``lensllm`` command line.

    lensllm reproduce [--data CSV|DIR ...] [--methods M ...] [--format table|csv|json]
                      [--out FILE]
    lensllm select CSV --target N [--methods M ...] [--format table|csv|json] [--out FILE]
    lensllm run --models PATH [PATH ...] --data FILE [--sizes N ...] [--target N]
                [--out-dir DIR] [fine-tuning, NTK and output options]

Exit codes: 0 success; 2 bad input (one ``lensllm: error: ...`` line on stderr, no
traceback, `--out` untouched); 130 interrupted. Warnings (curves that could not be
fitted) are ``lensllm: warning: ...`` lines on stderr.

Startup is kept light: argument parsing and reading the CSVs need only the standard
library and numpy; jax is imported when the methods run, with JAX's persistent
compilation cache pointed at ``$LENSLLM_CACHE/jax`` so a second run skips compiling
(``LENSLLM_JIT_CACHE=0`` turns that off).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lensllm_jax._files import write_atomic
from lensllm_jax.errors import LensLLMInputError

__all__ = ["main"]

PROG = "lensllm"
FORMATS = ("table", "csv", "json")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _method_names() -> tuple[str, ...]:
    from lensllm_jax.reproduce import method_names  # select is light: no jax until a fit

    return method_names()


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pick the pretrained LLM to fine-tune, and know how sure to be.",
    )
    from lensllm_jax import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    rep = sub.add_parser(
        "reproduce",
        help="run every selection method on the fine-tuning scaling benchmark",
        description=(
            "Run the selection methods on curve tables (default: the fine-tuning scaling "
            "benchmark of Lin et al., from $LENSLLM_DATA or the cache, downloaded once) "
            "at budgets 1/8 ... 1/512 and score each ranking against the full-size losses."
        ),
    )
    rep.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="curve-table CSVs or folders of them (default: $LENSLLM_DATA, else the cache)",
    )
    _add_method_and_output_args(rep, default="all")
    rep.set_defaults(handler=_cmd_reproduce)

    sel = sub.add_parser(
        "select",
        help="rank your candidates from their small fine-tunes",
        description=(
            "Rank the candidates of one curve table (your models fine-tuned on a few small "
            "nested subsets; columns 'config name', '0', one per subset size, 'size', "
            "'family') by the loss each method predicts at --target samples. Rank 1 is "
            "the model to fine-tune."
        ),
    )
    sel.add_argument("table", metavar="CSV", help="the curve table")
    sel.add_argument(
        "--target",
        type=float,
        required=True,
        metavar="N",
        help="number of samples of the full fine-tuning run",
    )
    _add_method_and_output_args(sel, default="LensLLM")
    sel.set_defaults(handler=_cmd_select)
    _add_run_parser(sub)
    return parser


def _add_run_parser(sub: Any) -> None:
    """`lensllm run`: fine-tune your candidates on small subsets of your data, rank them."""
    run = sub.add_parser(
        "run",
        help="fine-tune your candidates on small subsets of your data and rank them",
        description=(
            "Fine-tune every candidate (a Hugging Face folder, a .gguf file or a repo id in "
            "the local HF cache, with its tokenizer) on nested subsets of your examples, "
            "measure its test loss (nats per byte) and its NTK on a probe set, and rank the "
            "candidates by the loss predicted at --target samples. Results are saved in "
            "--out-dir as each candidate finishes; rerunning the same command resumes."
        ),
    )
    run.add_argument(
        "--models", nargs="+", action="extend", required=True, metavar="PATH", help="candidates"
    )
    run.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="examples: .jsonl (text, or "
        "prompt/completion, or input/output) or .txt (one example per line)",
    )
    run.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=[200, 400, 800, 1600],
        metavar="N",
        help="fine-tuning subset sizes, at least 3 (default: 200 400 800 1600)",
    )
    run.add_argument(
        "--target",
        type=float,
        metavar="N",
        help="samples of the full fine-tuning run (default: every example not held out)",
    )
    run.add_argument("--test-size", type=int, default=500, metavar="N", help="default 500")
    run.add_argument(
        "--probe-size", type=int, default=32, metavar="N", help="NTK probe examples (default 32)"
    )
    run.add_argument(
        "--max-length",
        type=int,
        default=256,
        metavar="N",
        help="tokens per example; a longer one loses its prompt's beginning first (256)",
    )
    run.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (1e-4)")
    run.add_argument("--epochs", type=int, metavar="N", help="epochs per subset (3)")
    run.add_argument("--batch-size", type=int, metavar="N", help="examples per step (8)")
    run.add_argument(
        "--min-steps", type=int, metavar="N", help="at least this many steps per subset (50)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    run.add_argument(
        "--out-dir",
        metavar="DIR",
        help="results folder (default: lensllm-run-<data file stem>); resumed if it holds "
        "the same run",
    )
    run.add_argument(
        "--no-ntk", action="store_true", help="skip the NTK features (and LensLLM-NTK)"
    )
    run.add_argument(
        "--ntk-chunk",
        type=int,
        metavar="N",
        help="probe examples per Jacobian block (default: as many as fit in memory)",
    )
    run.add_argument(
        "--hessian",
        nargs="?",
        type=int,
        const=8,
        default=0,
        metavar="PROBES",
        help="also measure the probe loss's Hessian (Hutchinson trace, 8 probes, and vᵀHv) "
        "at the pretrained weights and after each fine-tune",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _add_method_and_output_args(run, default="LensLLM, plus LensLLM-NTK")
    run.set_defaults(handler=_cmd_run)


def _add_method_and_output_args(cmd: argparse.ArgumentParser, default: str) -> None:
    """--methods, --format and --out, shared by the subcommands."""
    cmd.add_argument(
        "--methods",
        nargs="+",
        action="extend",
        metavar="M",
        help=f"selection methods to run (default: {default}): {', '.join(_method_names())}",
    )
    cmd.add_argument("--format", choices=FORMATS, default="table", help="output format")
    cmd.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lensllm``; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except LensLLMInputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _check_out(out: str | None) -> Path | None:
    """Fail before any work if --out cannot be written."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise LensLLMInputError("is a folder", file=path, hint="give --out a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LensLLMInputError(
            f"folder {str(parent)!r} does not exist", file=path, hint="create it first"
        )
    if not os.access(parent, os.W_OK):
        raise LensLLMInputError(f"folder {str(parent)!r} is not writable", file=path)
    return path


def _enable_jit_cache() -> None:
    """Point JAX's persistent compilation cache at the lensllm cache (CLI only)."""
    if os.environ.get("LENSLLM_JIT_CACHE", "1") == "0":
        return
    from lensllm_jax.data import cache_root

    folder = cache_root() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable cache only costs speed
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    # The fits compile many small programs; cache them all, however quick to compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _with_warnings_reported(fn: Callable[[], Any]) -> Any:
    """Run `fn`, then print each warning it raised as one ``lensllm: warning:`` line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    return result


def _emit(text: str, out: Path | None) -> int:
    """Write the finished output to stdout, or atomically to --out."""
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from lensllm_jax import curves, data, reproduce

    out = _check_out(args.out)
    paths = data.resolve_data(args.data)
    tables = curves.read_curve_tables(paths)
    _enable_jit_cache()
    rows = _with_warnings_reported(lambda: reproduce.run(tables, args.methods))
    if args.format == "csv":
        return _emit(reproduce.rows_to_csv(rows), out)
    if args.format == "json":
        return _emit(reproduce.rows_to_json(rows), out)
    return _emit(render_table(rows, color=out is None and sys.stdout.isatty()), out)


def _cmd_select(args: argparse.Namespace) -> int:
    from lensllm_jax import curves, ranking

    out = _check_out(args.out)
    path = Path(args.table)
    if not path.is_file():
        raise LensLLMInputError("no such file", file=path, hint="give the curve table's path")
    table = curves.read_curve_table(path)
    _enable_jit_cache()
    rows = _with_warnings_reported(lambda: ranking.rank(table, args.target, args.methods))
    if args.format == "csv":
        return _emit(ranking.rows_to_csv(rows), out)
    if args.format == "json":
        return _emit(ranking.rows_to_json(rows), out)
    color = out is None and sys.stdout.isatty()
    return _emit(render_ranking(rows, args.target, color=color), out)


def _cmd_run(args: argparse.Namespace) -> int:
    from lensllm_jax import finetune, pipeline, ranking

    out = _check_out(args.out)
    recipe = {
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "min_steps": args.min_steps,
    }
    config = finetune.FinetuneConfig(**{k: v for k, v in recipe.items() if v is not None})
    data = Path(args.data)
    out_dir = Path(args.out_dir) if args.out_dir else Path(f"lensllm-run-{data.stem}")
    _enable_jit_cache()

    def log(line: str) -> None:
        print(f"{PROG}: {line}", file=sys.stderr, flush=True)

    result = _with_warnings_reported(
        lambda: pipeline.run(
            args.models,
            data,
            sizes=args.sizes,
            target=args.target,
            out_dir=out_dir,
            config=config,
            test_size=args.test_size,
            probe_size=args.probe_size,
            max_length=args.max_length,
            seed=args.seed,
            methods=args.methods,
            ntk=not args.no_ntk,
            ntk_chunk="auto" if args.ntk_chunk is None else args.ntk_chunk,
            hessian_probes=args.hessian,
            log=None if args.quiet else log,
        )
    )
    if args.format == "csv":
        return _emit(ranking.rows_to_csv(result.rows), out)
    if args.format == "json":
        return _emit(ranking.rows_to_json(result.rows), out)
    color = out is None and sys.stdout.isatty()
    return _emit(render_run(result, color=color), out)


def render_run(result: Any, *, color: bool = False) -> str:
    """The ranking tables, then one row per candidate: size, zero-shot and last fine-tuned
    loss (nats per byte), the NTK's largest eigenvalue and ‖r‖², the Hessian trace ± s.e."""
    import io
    import math

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from lensllm_jax import pipeline

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
            r.name,
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
        phases = Table(
            title="Hessian of the probe loss after fine-tuning on D samples "
            "(v = θ_D − θ_0; phase by AtS's rule)",
            title_justify="left",
        )
        for i, col in enumerate(("model", "D", "loss", "tr H ± s.e.", "vᵀHv", "phase")):
            phases.add_column(col, justify="left" if i in (0, 5) else "right")
        for r in measured:
            for j, e in enumerate(pipeline.hessian_by_size(r)):
                phase = {True: "power", False: "pre-power", None: "-"}[e["power_phase"]]
                phases.add_row(
                    r.name if j == 0 else "",
                    str(e["size"]),
                    num(float(r.losses[j]), ".4f"),
                    "-" if e["trace"] is None else f"{e['trace']:.4g} ± {e['stderr']:.2g}",
                    "-" if e["distance"] is None else f"{e['distance']:.4g}",
                    phase,
                )
        console.print(phases)
    console.print(f"results in {result.out_dir}")
    return text + buf.getvalue()


def render_ranking(rows: Sequence, target: float, *, color: bool = False) -> str:
    """One rich table per method: rank, model, score (predicted loss), P(best) where the
    method has a calibrated one (then also the 90 % credible set), status."""
    import io
    import math

    from rich.console import Console
    from rich.table import Table

    from lensllm_jax.ranking import credible_set_text

    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=color, no_color=not color)
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        sure = any(math.isfinite(r.p_best) for r in mine)
        table = Table(title=f"{method} · predicted loss at D = {target:g}", title_justify="left")
        cols = (("rank", "right"), ("model", "left"), ("score", "right"))
        for col, just in (*cols, *((("P(best)", "right"),) if sure else ())):
            table.add_column(col, justify=just)
        table.add_column("status")
        for r in mine:
            score = "nan" if math.isnan(r.score) else f"{r.score:.4f}"
            p_best = ("-" if math.isnan(r.p_best) else f"{r.p_best:.2f}",) if sure else ()
            table.add_row(str(r.rank), r.model, score, *p_best, r.status)
        console.print(table)
        if sure:
            console.print(f"{credible_set_text(mine)} (calibration: lensllm_jax/confidence.py)")
    return buf.getvalue()


def render_table(rows: Sequence, *, color: bool = False, width: int = 100) -> str:
    """One rich table per dataset and metric: methods x budgets plus the mean; the best
    value of each column is bold (highest, or lowest for CostPercent)."""
    import io
    import math

    from rich.console import Console
    from rich.table import Table

    from lensllm_jax.reproduce import HIGHER_IS_BETTER, METRICS

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
                title=f"{ds} · {metric} (%, {'higher' if higher else 'lower'} is better)",
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
                table.add_row(m, *cells)
            console.print(table)
    if not color:
        console.print("* best in its column")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
