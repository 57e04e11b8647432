"""Pictures of rankings and runs, one module for the command line and the notebooks.

    from lensllm_jax import plots
    rows = ll.rank(table, target)                     # rows carry each fit's parameters
    plots.save(plots.selection_figure(table, rows, target), "ranking.png")
    plots.write_run_plots(result, "runs/task/plots")  # curves, ranking, ntk, hessian

Figures are `matplotlib.figure.Figure`s made without pyplot (no window; nothing kept
alive after use; any backend, Agg when saving); `save` picks .png / .svg / .pdf from the
file name and writes whole files only. matplotlib is the optional ``plot`` extra
(``pip install 'lensllm-jax[plot]'``), imported when a figure is made.

`curves`: a ranking's curves, fitted laws, extrapolation band and P(best). `run`: the
NTK spectrum and F(Θ, t), the Hessian's two phases, the linearised dynamics, and the
``plots/`` folder of ``lensllm run``.
"""

from lensllm_jax.plots._base import FORMATS, check_plot_path, require_matplotlib, save
from lensllm_jax.plots.curves import (
    band_sigma,
    curve_from_details,
    curves_figure,
    ranking_figure,
    selection_figure,
    target_sigmas,
)
from lensllm_jax.plots.run import (
    f_of_t,
    hessian_figure,
    linearised_figure,
    ntk_figure,
    write_run_plots,
)

__all__ = [
    "FORMATS",
    "band_sigma",
    "check_plot_path",
    "curve_from_details",
    "curves_figure",
    "f_of_t",
    "hessian_figure",
    "linearised_figure",
    "ntk_figure",
    "ranking_figure",
    "require_matplotlib",
    "save",
    "selection_figure",
    "target_sigmas",
    "write_run_plots",
]
