"""The command line's pictures, environment report, progress and help texts: ``select
--plot FILE``, ``lensllm env``, the progress display of ``run`` and each command's epilog
(examples, exit codes, environment variables). `main` wires them in.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ENVIRONMENT",
    "EPILOGS",
    "HelpFormatter",
    "add_env_parser",
    "add_plot_argument",
    "announcing_fetcher",
    "check_plot_argument",
    "environment_report",
    "progress_for",
    "write_selection_plot",
]

PROG = "lensllm"

# name -> what it does (the same text in --help, `lensllm env` and README).
ENVIRONMENT = {
    "LENSLLM_DATA": "a folder of benchmark CSVs for 'reproduce' "
    "(default: the FLAN and Gigaword tables shipped in the package)",
    "LENSLLM_CACHE": "the cache folder: downloads and compiled programs "
    "(default: $XDG_CACHE_HOME/lensllm_jax, else ~/.cache/lensllm_jax)",
    "LENSLLM_JIT_CACHE": "0 turns off JAX's persistent compilation cache ($LENSLLM_CACHE/jax)",
    "LENSLLM_NTK_MEMORY": "bytes for the NTK's Jacobian blocks in 'run', e.g. 8GiB "
    "(default: a quarter of the host's available memory on a CPU, else from the device)",
}

_EXIT_CODES = (
    "exit codes:\n"
    "  0    done\n"
    "  2    bad input: one 'lensllm: error: ...' line (what, where, what to do), "
    "no traceback,\n"
    "       nothing written\n"
    "  130  interrupted (Ctrl-C); 'lensllm run' resumes where it stopped\n"
)


_UNSET = {  # what applies when a variable is not set (`lensllm env`)
    "LENSLLM_DATA": "the shipped tables",
    "LENSLLM_CACHE": "the default",
    "LENSLLM_JIT_CACHE": "on",
    "LENSLLM_NTK_MEMORY": "from the device",
}


def _environment_help(names: tuple[str, ...]) -> str:
    import textwrap

    width = max(len(n) for n in names)
    lines = [
        textwrap.fill(
            ENVIRONMENT[n],
            width=88,
            initial_indent=f"  {n.ljust(width)}  ",
            subsequent_indent=" " * (width + 4),
        )
        for n in names
    ]
    return "environment variables:\n" + "\n".join(lines) + "\n"


_ALL_ENV = tuple(ENVIRONMENT)
EPILOGS = {
    "main": (
        "examples:\n"
        "  lensllm reproduce                  # every method on the benchmark, offline\n"
        "  lensllm select my_task.csv --target 200000 --plot ranking.png\n"
        "  lensllm run --models ./gpt2 ./model.gguf --data task.jsonl --out-dir runs/task\n"
        "  lensllm env                        # the JAX backend and devices in use\n\n"
        + _EXIT_CODES
        + "\n"
        + _environment_help(_ALL_ENV)
    ),
    "reproduce": (
        "examples:\n"
        "  lensllm reproduce\n"
        "  lensllm reproduce --data flan --methods AtS LensLLM --format csv --out results.csv\n"
        "  lensllm reproduce --data wmt19     # downloaded once, SHA-256 checked\n\n"
        + _EXIT_CODES
        + "\n"
        + _environment_help(("LENSLLM_DATA", "LENSLLM_CACHE", "LENSLLM_JIT_CACHE"))
    ),
    "select": (
        "examples:\n"
        "  lensllm select my_task.csv --target 200000\n"
        "  lensllm select my_task.csv --target 200000 --methods AtS LensLLM --format json\n"
        "  lensllm select runs/task/curves.csv --target 200000 --ntk runs/task --plot r.pdf\n\n"
        "--format json carries each method's fitted parameters per candidate ('details').\n\n"
        + _EXIT_CODES
        + "\n"
        + _environment_help(("LENSLLM_CACHE", "LENSLLM_JIT_CACHE"))
    ),
    "run": (
        "examples:\n"
        "  lensllm run --models ./my-gpt2 SmolLM2-135M-Instruct.Q4_1.gguf --data task.jsonl\n"
        "  lensllm run --models ./a ./b --data task.jsonl --sizes 100 200 400 800 --hessian\n"
        "  lensllm run --models ./a ./b --data task.jsonl --target 50000   # re-rank only\n\n"
        "Before any work it prints an estimate of the cost; on a terminal a progress bar\n"
        "shows the steps left and the time left (-q: silent). Pictures go to plots/ in the\n"
        "results folder. A rerun with another --target writes ranking_target-<N>.csv,\n"
        "report_target-<N>.json and plots_target-<N>/, never over an earlier ranking.\n\n"
        + _EXIT_CODES
        + "\n"
        + _environment_help(("LENSLLM_CACHE", "LENSLLM_JIT_CACHE", "LENSLLM_NTK_MEMORY"))
    ),
    "env": (
        "example:\n  lensllm env   # e.g. 'backend gpu · 1 device: cuda:0 (NVIDIA H200)'\n\n"
        + _environment_help(_ALL_ENV)
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' layout (examples, tables) and wraps any longer line, such as a
    one-line description, to the terminal's width."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for line in text.splitlines():
            if len(indent + line) > width and not line.startswith(" "):
                out.append(textwrap.fill(line, width, initial_indent=indent,
                                         subsequent_indent=indent))  # fmt: skip
            else:
                out.append(indent + line)
        return "\n".join(out)


def add_plot_argument(cmd: argparse.ArgumentParser) -> None:
    """``--plot FILE``: the ranking and every candidate's curve as a picture."""
    cmd.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the ranking and each candidate's curve, fitted laws and 90%% band "
        "to FILE (.png, .svg or .pdf; needs the 'plot' extra: matplotlib)",
    )


def check_plot_argument(path: str | None) -> Path | None:
    """The --plot path, checked before any work (format, folder, matplotlib present)."""
    if path is None:
        return None
    from lensllm_jax.plots import check_plot_path, require_matplotlib

    checked = check_plot_path(path)
    require_matplotlib()
    return checked


def write_selection_plot(path: Path, table: Any, rows: Any, target: float) -> None:
    """`plots.selection_figure` of the ranking, saved to `path` (whole or not at all)."""
    from lensllm_jax.plots import save, selection_figure

    save(selection_figure(table, rows, target), path)


def progress_for(quiet: bool, stream: Any = None) -> Any:
    """``run``'s progress display: nothing with -q; a rich bar with the time left when
    `stream` (stderr) is a terminal; else one ``lensllm: ...`` line per event."""
    from lensllm_jax.runner.progress import LineProgress, Progress, RichProgress

    stream = sys.stderr if stream is None else stream
    if quiet:
        return Progress()
    if stream.isatty():
        return RichProgress(PROG)

    def line(text: str) -> None:
        print(f"{PROG}: {text}", file=stream, flush=True)

    return LineProgress(line)


def announcing_fetcher(stream: Any = None) -> Callable[[str], bytes]:
    """The benchmark's downloader, saying on stderr what it fetched (one line once the file
    is in: the files are a few kB, so no bar; a failed download is the error line alone)."""
    from lensllm_jax.benchmark.download import fetch_url

    stream = sys.stderr if stream is None else stream

    def fetch(url: str) -> bytes:
        data = fetch_url(url)
        print(f"{PROG}: downloaded {len(data):,} bytes from {url}", file=stream, flush=True)
        return data

    return fetch


def add_env_parser(sub: Any) -> None:
    """``lensllm env``: what JAX runs on, versions, and the environment variables."""
    env = sub.add_parser(
        "env",
        help="print the JAX backend and devices, versions and environment variables",
        description="Print, first on one line, the version, the JAX backend and the "
        "devices JAX sees (so you know a GPU is used), then the optional packages and the "
        "lensllm environment variables with their values.",
        epilog=EPILOGS["env"],
        formatter_class=HelpFormatter,
    )
    env.set_defaults(handler=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    sys.stdout.write(environment_report())
    sys.stdout.flush()
    return 0


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment_report(env: Mapping[str, str] | None = None) -> str:
    """The text of ``lensllm env``: one summary line (lensllm, Python, jax, backend,
    devices), the optional packages, then each environment variable and its value."""
    import jax

    from lensllm_jax import __version__
    from lensllm_jax.data._files import cache_root

    env = os.environ if env is None else env
    devices = jax.devices()
    kinds = ", ".join(f"{d.platform}:{d.id} ({d.device_kind})" for d in devices)
    plural = "device" if len(devices) == 1 else "devices"
    lines = [
        f"lensllm {__version__} · Python {platform.python_version()} · jax {jax.__version__} "
        f"· backend {jax.default_backend()} · {len(devices)} {plural}: {kinds}"
    ]
    extras = []
    for pkg, use in (
        ("jaxlib", "JAX's runtime"),
        ("transformers", "tokenizers for 'run'"),
        ("matplotlib", "plots"),
    ):
        v = _version(pkg)
        extras.append(f"{pkg} {v} ({use})" if v else f"{pkg} not installed ({use})")
    lines.append("packages: " + "; ".join(extras))
    width = max(len(n) for n in ENVIRONMENT)
    for name in ENVIRONMENT:
        value = env.get(name)
        shown = value if value else f"(unset: {_UNSET[name]})"
        if name == "LENSLLM_CACHE":
            shown += f" -> {cache_root(env)}"
        lines.append(f"{name.ljust(width)}  {shown}")
    return "\n".join(lines) + "\n"
