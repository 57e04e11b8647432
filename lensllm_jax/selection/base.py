"""What every selection method shares: its result type, its signature, and the rule that
it sees only the curve points at or below the budget.

A method is ``method(table, budget_size, target) -> Selection``: it may read the fine-tuning
losses at sizes D <= budget_size, the zero-shot column, the parameter counts (and, for
LensLLM-NTK, the table's NTK spectra), and scores each model (lower = better; for the
fitting methods the score is the predicted loss at `target`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import numpy as np

from lensllm_jax.data.curves import CurveTable
from lensllm_jax.errors import CurveFitWarning, LensLLMInputError

if TYPE_CHECKING:
    from lensllm_jax.core.fit import FitResult

__all__ = [
    "Selection",
    "SelectionMethod",
    "all_ok",
    "fit_predict",
    "from_predictions",
    "law_details",
    "visible_curves",
]


class Selection(NamedTuple):
    """Scores of M candidates (lower = better).

    Attributes:
      scores: (M,) float64; NaN where status is not "ok" (such a model ranks last).
      status: (M,) "ok" | "failed".
      finetuned_sizes: per model, the subset sizes it was fine-tuned on (for the cost).
      pearson_sign: the sign that turns `scores` into the feature Lin et al. correlate
        with the true loss (PearCorr): +1 for predicted losses, −1 for ModelSize (whose
        feature is log(size), higher = better). Use `metrics.selection_pearson_percent`.
      details: what made each score, name -> (M,) array (e.g. a law's fitted B, beta, E;
        LensLLM's fused level and slope), so the curve behind a score can be redrawn;
        None for the methods that fit nothing.
    """

    scores: np.ndarray
    status: tuple[str, ...]
    finetuned_sizes: tuple[tuple[float, ...], ...]
    pearson_sign: float = 1.0
    details: dict[str, np.ndarray] | None = None


SelectionMethod: TypeAlias = Callable[[CurveTable, float, float], Selection]


def visible_curves(table: CurveTable, budget_size: float) -> tuple[np.ndarray, np.ndarray]:
    """The sizes D <= budget_size (S_b,) and their losses (M, S_b): all a method may see.

    Raises `LensLLMInputError` when fewer than 3 sizes are left. Cost O(M·S).
    """
    keep = table.sizes <= budget_size * (1.0 + 1e-12)
    if int(keep.sum()) < 3:
        raise LensLLMInputError(
            f"budget D <= {budget_size:g} leaves {int(keep.sum())} fine-tuned sizes, need >= 3",
            file=table.source or table.name,
            hint="use a larger budget (smaller ratio) or add smaller subset sizes",
        )
    return np.asarray(table.sizes[keep], np.float64), np.asarray(table.losses[:, keep], np.float64)


def all_ok(scores: np.ndarray, sizes: tuple[float, ...], m: int, sign: float = 1.0) -> Selection:
    return Selection(np.asarray(scores, np.float64), ("ok",) * m, (sizes,) * m, sign)


def from_predictions(
    pred: np.ndarray,
    ok: np.ndarray,
    sizes: np.ndarray,
    name: str,
    details: dict[str, np.ndarray] | None = None,
) -> Selection:
    """Selection from predicted losses; a non-finite or failed prediction is a failure.
    `details` (name -> (M,) array) is passed on as `Selection.details`."""
    ok = np.asarray(ok, bool) & np.isfinite(pred) & (pred > 0)
    if not ok.all():
        warnings.warn(
            f"{name}: {int((~ok).sum())} of {ok.size} curves could not be fitted; they rank last",
            CurveFitWarning,
            stacklevel=3,
        )
    scores = np.where(ok, pred, np.nan)
    status = tuple("ok" if o else "failed" for o in ok)
    return Selection(scores, status, (tuple(float(s) for s in sizes),) * ok.size, 1.0, details)


def fit_predict(
    law: str, d: np.ndarray, losses: np.ndarray, target: float, **kw
) -> tuple[np.ndarray, np.ndarray, FitResult]:
    """Fit `law` to every curve (`core.fit.fit_law`) and predict L(target): (pred (M,),
    ok (M,), the fit). jax is imported only here, when a law is fitted. `law_details(res)`
    gives the fitted parameters as `Selection.details`."""
    from lensllm_jax.core import fit, laws

    res = fit.fit_law(law, np.broadcast_to(d, losses.shape), losses, **kw)
    with np.errstate(all="ignore"):
        pred = laws.predict(law, res.params, float(target), aux=kw.get("aux"))
    return np.asarray(pred, np.float64), np.asarray(res.ok), res


def law_details(res: FitResult, ok: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A fit's natural parameters by name, each (M,) float64, NaN where the fit failed (or
    where `ok` is False): the `Selection.details` of a law-based method."""
    keep = np.asarray(res.ok if ok is None else ok, bool)
    return {k: np.where(keep, np.asarray(v, np.float64), np.nan) for k, v in res.params.items()}
