"""Fine-tuning curve tables: the loss of each candidate model after fine-tuning on
nested subsets of D samples.

`CurveTable` is the one in-memory form every selection method reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CurveTable"]


@dataclass(frozen=True)
class CurveTable:
    """Test losses of M candidate models fine-tuned on S subset sizes.

    Attributes:
      name: dataset name (for a CSV, its file stem).
      models: (M,) model names, in file order.
      sizes: (S,) strictly increasing positive subset sizes D (float64).
      losses: (M, S) test loss after fine-tuning on `sizes[j]` samples (float64, > 0).
      zero_shot: (M,) test loss before fine-tuning (D = 0).
      n_params: (M,) parameter counts.
      families: (M,) model family labels.
    """

    name: str
    models: tuple[str, ...]
    sizes: np.ndarray
    losses: np.ndarray
    zero_shot: np.ndarray
    n_params: np.ndarray
    families: tuple[str, ...]

    @property
    def num_models(self) -> int:
        return len(self.models)
