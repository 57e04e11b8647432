"""Which candidate will have the lowest loss after full fine-tuning: the selection methods
(one registry), one ranking path (failed last, P(best) for calibrated methods), and the
error model behind "how sure".
"""

from lensllm_jax.selection.base import Selection, SelectionMethod, visible_curves
from lensllm_jax.selection.confidence import Confidence, credible_set, prob_best
from lensllm_jax.selection.ranking import RankRow, rank, rows_to_csv, rows_to_json
from lensllm_jax.selection.registry import (
    DEFAULT_METHODS,
    METHODS,
    Method,
    method_names,
    resolve_methods,
)

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Confidence",
    "Method",
    "RankRow",
    "Selection",
    "SelectionMethod",
    "credible_set",
    "method_names",
    "prob_best",
    "rank",
    "resolve_methods",
    "rows_to_csv",
    "rows_to_json",
    "visible_curves",
]
