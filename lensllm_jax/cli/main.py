"""The ``lensllm`` command line.

    lensllm reproduce [--data CSV|DIR ...] [--methods M ...] [--format table|csv|json]
                      [--out FILE]
    lensllm select CSV --target N [--ntk FILE|DIR] [--methods M ...]
                   [--format table|csv|json] [--out FILE]
    lensllm run --models PATH [PATH ...] --data FILE [--sizes N ...] [--target N]
                [--out-dir DIR] [fine-tuning, NTK and output options]
                [--mesh data=D,fsdp=F] [--distributed [--coordinator HOST:PORT
                --num-processes N --process-id I]]
    lensllm plan MODEL [MODEL ...] [--devices N] [--device-memory BYTES] [--compile]
    lensllm env

``select --plot FILE``, ``env``, the progress display of ``run`` and the --help epilogs
(examples, exit codes, environment variables) live in `cli.extras`; ``plan``, ``--mesh``
and ``--distributed`` in `cli.scale`.

Exit codes: 0 success; 2 bad input or an expected failure (one ``lensllm: error: ...``
line on stderr, no traceback, `--out` untouched: a full disk, an unreadable file, input
nested too deeply, a file that is not valid text); 130 interrupted; 1 a bug (its
traceback, then a line asking for a report). Warnings (curves that could not be fitted)
are ``lensllm: warning: ...`` lines on stderr. `--out` replaces only a regular file (never
a symbolic link, FIFO or device).

Startup is kept light: argument parsing and reading the CSVs need only the standard
library and numpy; jax is imported when the methods run, with JAX's persistent
compilation cache pointed at ``$LENSLLM_CACHE/jax`` so a second run skips compiling
(``LENSLLM_JIT_CACHE=0`` turns that off).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lensllm_jax.cli.extras as extras
import lensllm_jax.cli.scale as scale
from lensllm_jax.cli._output import check_out, emit
from lensllm_jax.cli.render import render_ranking, render_run, render_table
from lensllm_jax.data._files import describe_os_error
from lensllm_jax.errors import LensLLMError, LensLLMInputError

__all__ = ["main"]

PROG = "lensllm"
ISSUES = "https://github.com/lensllm-jax/lensllm-jax/issues"
FORMATS = ("table", "csv", "json")
NTK_FILE = "ntk_features.csv"  # what `lensllm run` writes and `select --ntk DIR` reads


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _method_names() -> tuple[str, ...]:
    from lensllm_jax.selection.registry import method_names  # light: no jax until a fit

    return method_names()


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pick the pretrained LLM to fine-tune, and know how sure to be.",
        epilog=extras.EPILOGS["main"],
        formatter_class=extras.HelpFormatter,
    )
    from lensllm_jax import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    rep = sub.add_parser(
        "reproduce",
        help="run every selection method on the fine-tuning scaling benchmark",
        description=(
            "Run the selection methods on curve tables (default: the FLAN and Gigaword "
            "tables of Lin et al.'s fine-tuning scaling benchmark, shipped with the "
            "package, or the folder in $LENSLLM_DATA) at budgets 1/8 ... 1/512 and score "
            "each ranking against the full-size losses."
        ),
        epilog=extras.EPILOGS["reproduce"],
        formatter_class=extras.HelpFormatter,
    )
    rep.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH|NAME",
        help="curve-table CSVs, folders of them, or benchmark datasets by name: flan, "
        "gigaword (shipped), wmt19 (downloaded once into $LENSLLM_CACHE and checked)",
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
        epilog=extras.EPILOGS["select"],
        formatter_class=extras.HelpFormatter,
    )
    sel.add_argument("table", metavar="CSV", help="the curve table")
    sel.add_argument(
        "--target",
        type=float,
        required=True,
        metavar="N",
        help="number of samples of the full fine-tuning run",
    )
    sel.add_argument(
        "--ntk",
        metavar="FILE|DIR",
        help="the candidates' NTK spectra (ntk_features.csv, or a lensllm run folder "
        "holding it): adds LensLLM-NTK to the default methods",
    )
    _add_method_and_output_args(sel, default="LensLLM; with --ntk also LensLLM-NTK")
    extras.add_plot_argument(sel)
    sel.set_defaults(handler=_cmd_select)
    _add_run_parser(sub)
    scale.add_plan_parser(sub)
    extras.add_env_parser(sub)
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
        epilog=extras.EPILOGS["run"],
        formatter_class=extras.HelpFormatter,
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
    run.add_argument(
        "-q", "--quiet", action="store_true", help="no estimate, progress bar or progress lines"
    )
    run.add_argument(
        "--no-plots", action="store_true", help="do not draw the pictures in <out-dir>/plots"
    )
    _add_method_and_output_args(run, default="LensLLM, plus LensLLM-NTK")
    scale.add_run_switches(run)
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
    """Entry point of ``lensllm``; returns the exit code.

    The one error boundary: every expected failure becomes one ``lensllm: error:`` line and
    exit code 2 (`LensLLMError`; an `OSError` such as a full disk; a `RecursionError` or
    `MemoryError` from input too deep or too large; a Unicode error from text that is not
    valid); an interrupt is exit 130; anything else is a bug: its traceback, a line asking
    for a report, exit 1."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except LensLLMError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        return _fail(describe_os_error(err))
    except RecursionError:
        return _fail("the input is nested too deeply to read")
    except MemoryError:
        return _fail("out of memory; give smaller inputs")
    except UnicodeError as err:
        return _fail(f"text that is not valid Unicode ({type(err).__name__}: {err})")
    except Exception:
        traceback.print_exc()
        print(
            f"{PROG}: internal error: this is a bug in lensllm, not in your input; please "
            f"report it with the command and the traceback above at {ISSUES}",
            file=sys.stderr,
        )
        return 1


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 2


def _enable_jit_cache() -> None:
    """Point JAX's persistent compilation cache at the lensllm cache (CLI only)."""
    if os.environ.get("LENSLLM_JIT_CACHE", "1") == "0":
        return
    from lensllm_jax.data._files import cache_root

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


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from lensllm_jax.benchmark import protocol
    from lensllm_jax.benchmark.download import resolve_data
    from lensllm_jax.data.curves import read_curve_tables

    out = check_out(args.out)
    paths = resolve_data(args.data, fetcher=extras.announcing_fetcher())
    tables = read_curve_tables(paths)
    _enable_jit_cache()
    rows = _with_warnings_reported(lambda: protocol.run(tables, args.methods))
    if args.format == "csv":
        return emit(protocol.rows_to_csv(rows), out)
    if args.format == "json":
        return emit(protocol.rows_to_json(rows), out)
    return emit(render_table(rows, color=out is None and sys.stdout.isatty()), out)


def _cmd_select(args: argparse.Namespace) -> int:
    from lensllm_jax.data.curves import read_curve_table
    from lensllm_jax.data.spectra import read_spectra, with_spectra
    from lensllm_jax.selection import ranking as rank

    out = check_out(args.out)
    plot = extras.check_plot_argument(args.plot)
    path = Path(args.table)
    if not path.exists():
        raise LensLLMInputError("no such file", file=path, hint="give the curve table's path")
    table = read_curve_table(path)
    methods = args.methods
    if args.ntk is not None:
        spectra_path = Path(args.ntk)
        if spectra_path.is_dir():  # a run's output folder
            spectra_path = spectra_path / NTK_FILE
        table = with_spectra(table, read_spectra(spectra_path))
        methods = methods or ["LensLLM", "LensLLM-NTK"]
    _enable_jit_cache()
    rows = _with_warnings_reported(lambda: rank.rank(table, args.target, methods))
    if plot is not None:
        extras.write_selection_plot(plot, table, rows, args.target)
    if args.format == "csv":
        return emit(rank.rows_to_csv(rows), out)
    if args.format == "json":
        return emit(rank.rows_to_json(rows), out)
    color = out is None and sys.stdout.isatty()
    return emit(render_ranking(rows, args.target, color=color), out)


def _cmd_run(args: argparse.Namespace) -> int:
    from lensllm_jax.runner import finetune, job
    from lensllm_jax.selection import ranking as rank

    out = check_out(args.out)
    recipe = {
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "min_steps": args.min_steps,
    }
    config = finetune.FinetuneConfig(**{k: v for k, v in recipe.items() if v is not None})
    data = Path(args.data)
    out_dir = Path(args.out_dir) if args.out_dir else Path(f"lensllm-run-{data.stem}")
    many = scale.run_switches(args)
    _enable_jit_cache()

    with scale.native_stdout_to_stderr(many["distributed"] is not False):
        result = _with_warnings_reported(
            lambda: job.run(
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
                progress=extras.progress_for(args.quiet),
                plots=not args.no_plots,
                **many,
            )
        )
    from lensllm_jax.runner.distributed import is_writer

    if not is_writer():
        return 0  # process 0 alone prints and writes
    if args.format == "csv":
        return emit(rank.rows_to_csv(result.rows), out)
    if args.format == "json":
        return emit(rank.rows_to_json(result.rows), out)
    color = out is None and sys.stdout.isatty()
    return emit(render_run(result, color=color), out)


if __name__ == "__main__":
    sys.exit(main())
