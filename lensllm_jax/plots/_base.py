"""What every plot shares: a matplotlib `Figure` made without pyplot (no window, no global
figure list, whatever backend the session has), one colour per method, and an atomic save
whose format follows the file's suffix.

matplotlib is the optional ``plot`` extra: it is imported when a figure is made, never at
import time, and its absence is one `LensLLMInputError` line naming the install.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lensllm_jax.data._files import check_output_file
from lensllm_jax.errors import LensLLMInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FORMATS",
    "LEVEL",
    "METHOD_COLORS",
    "Z_90",
    "check_plot_path",
    "method_color",
    "new_figure",
    "require_matplotlib",
    "save",
]

FORMATS = (".png", ".svg", ".pdf")
LEVEL = 0.9  # the bands and credible sets drawn: 90 %
Z_90 = 1.6448536269514722  # two-sided 90 % normal quantile
DPI = 150

METHOD_COLORS = {
    "LensLLM": "#c0392b",
    "LensLLM-NTK": "#8e44ad",
    "AtS": "#27ae60",
    "VanillaFit": "#2980b9",
    "RectifiedFit": "#e67e22",
    "SubTuning": "#7f8c8d",
    "ZeroShot": "#95a5a6",
    "ModelSize": "#34495e",
}
_CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def method_color(method: str) -> str:
    """The colour of a method in every plot (a custom method gets a stable cycle colour)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _CYCLE[sum(map(ord, method)) % len(_CYCLE)]


def candidate_color(i: int) -> str:
    """The colour of the i-th candidate where candidates share one axes."""
    return _CYCLE[i % len(_CYCLE)]


def require_matplotlib() -> None:
    """Raise one `LensLLMInputError` line when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise LensLLMInputError(
            "plots need matplotlib, which is not installed",
            hint="pip install 'lensllm-jax[plot]'",
        ) from None


def new_figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """A `matplotlib.figure.Figure` of `width` x `height` inches, not registered with
    pyplot: it never opens a window and is freed when dropped."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The path, checked before any work: a .png, .svg or .pdf file name in an existing,
    writable folder. Raises `LensLLMInputError` (one line) otherwise."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise LensLLMInputError(
            f"cannot tell the plot format from {p.suffix or 'no suffix'!r}",
            file=p,
            hint="name the plot file .png, .svg or .pdf",
        )
    return check_output_file(p, flag="--plot")


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` to `path` (format from the suffix: .png, .svg, .pdf), whole or not at
    all (rendered in memory, then an atomic rename). Returns the path."""
    from lensllm_jax.data._files import write_atomic

    p = check_plot_path(path)
    buf = io.BytesIO()
    # Fixed metadata keeps a file byte-stable across runs (no creation date or version).
    meta: dict[str, Any] = {"Software": None} if p.suffix.lower() == ".png" else {}
    if p.suffix.lower() == ".pdf":
        meta = {"CreationDate": None, "Producer": None, "Creator": None}
    elif p.suffix.lower() == ".svg":
        meta = {"Date": None, "Creator": None}
    fig.savefig(buf, format=p.suffix.lower()[1:], dpi=fig.dpi, metadata=meta)
    return write_atomic(p, buf.getvalue())


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def log_grid(lo: float, hi: float, n: int = 120) -> np.ndarray:
    """n sizes evenly spaced in log D from lo to hi (both included)."""
    return np.geomspace(lo, hi, n)


def short_name(name: str, width: int = 28) -> str:
    """A model name that fits a panel title: the last path part, cut with an ellipsis."""
    tail = name.rstrip("/").split("/")[-1] or name
    return tail if len(tail) <= width else tail[: width - 1] + "…"
