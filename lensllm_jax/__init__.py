"""lensllm-jax: choose the pretrained LLM to fine-tune, and say how sure the choice is.

LENSLLM (Zeng et al., ICML 2025) on top of the rectified scaling law and AtS of
Lin et al. (ICML 2024), in JAX. Data flows one way:
files -> curves/kernels -> fits -> ranking -> report.

    import lensllm_jax as ll
    table = ll.read_curve_table("my_task.csv")
    rows = ll.rank(table, target=200_000)            # LensLLM, rank 1 first, with P(best)
    result = ll.run(["./gpt2", "./llama"], "task.jsonl", out_dir="runs/task")

The public API is re-exported here by name; the subpackages are the rooms: `core` (pure
JAX: laws, fit, ntk, hessian), `models` (the Flax zoo and its loaders), `data` (curve
tables, spectra, task text), `selection` (the methods, one ranking path, how sure),
`runner` (the `lensllm run` job), `parallel` (device meshes and sharded programs),
`benchmark` (Lin et al.'s protocol and data), `plots` (pictures of rankings and runs; the
``plot`` extra), `cli`.
Names load on first use, so ``import lensllm_jax`` stays light (no jax until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> module that defines it (loaded on first access, PEP 562).
_EXPORTS = {
    # data
    "CurveTable": "lensllm_jax.data.curves",
    "NTKSpectra": "lensllm_jax.data.curves",
    "read_curve_table": "lensllm_jax.data.curves",
    "write_curve_table": "lensllm_jax.data.curves",
    "read_spectra": "lensllm_jax.data.spectra",
    "with_spectra": "lensllm_jax.data.spectra",
    # selection
    "METHODS": "lensllm_jax.selection.registry",
    "Method": "lensllm_jax.selection.registry",
    "Selection": "lensllm_jax.selection.base",
    "RankRow": "lensllm_jax.selection.ranking",
    "rank": "lensllm_jax.selection.ranking",
    "confidence": "lensllm_jax.selection.confidence",
    # run
    "run": "lensllm_jax.runner.job",
    "RunResult": "lensllm_jax.runner.result",
    "FinetuneConfig": "lensllm_jax.runner.finetune",
    # core
    "fit_law": "lensllm_jax.core.fit",
    "FitResult": "lensllm_jax.core.fit",
    "FitStatus": "lensllm_jax.core.fit",
    "predict": "lensllm_jax.core.laws",
    "empirical_ntk_fn": "lensllm_jax.core.ntk",
    "empirical_ntk": "lensllm_jax.core.ntk",
    "loss_gradient_kernel": "lensllm_jax.core.ntk",
    "ntk_test_loss": "lensllm_jax.core.ntk_loss",
    "hutchinson_trace": "lensllm_jax.core.hessian",
    "hessian_distance": "lensllm_jax.core.hessian",
    # errors
    "LensLLMError": "lensllm_jax.errors",
    "LensLLMInputError": "lensllm_jax.errors",
    "CurveFitWarning": "lensllm_jax.errors",
}
_SUBPACKAGES = (
    "benchmark",
    "cli",
    "core",
    "data",
    "errors",
    "models",
    "parallel",
    "plots",
    "runner",
    "selection",
)

__all__ = [
    "METHODS",
    "CurveFitWarning",
    "CurveTable",
    "FinetuneConfig",
    "FitResult",
    "FitStatus",
    "LensLLMError",
    "LensLLMInputError",
    "Method",
    "NTKSpectra",
    "RankRow",
    "RunResult",
    "Selection",
    "__version__",
    "benchmark",
    "cli",
    "confidence",
    "core",
    "data",
    "empirical_ntk",
    "empirical_ntk_fn",
    "errors",
    "fit_law",
    "hessian_distance",
    "hutchinson_trace",
    "loss_gradient_kernel",
    "models",
    "ntk_test_loss",
    "parallel",
    "plots",
    "predict",
    "rank",
    "read_curve_table",
    "read_spectra",
    "run",
    "runner",
    "selection",
    "with_spectra",
    "write_curve_table",
]

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time, __getattr__ below
    from lensllm_jax import (
        benchmark,
        cli,
        core,
        data,
        errors,
        models,
        parallel,
        plots,
        runner,
        selection,
    )
    from lensllm_jax.core.fit import FitResult, FitStatus, fit_law
    from lensllm_jax.core.hessian import hessian_distance, hutchinson_trace
    from lensllm_jax.core.laws import predict
    from lensllm_jax.core.ntk import empirical_ntk, empirical_ntk_fn, loss_gradient_kernel
    from lensllm_jax.core.ntk_loss import ntk_test_loss
    from lensllm_jax.data.curves import CurveTable, NTKSpectra, read_curve_table, write_curve_table
    from lensllm_jax.data.spectra import read_spectra, with_spectra
    from lensllm_jax.errors import CurveFitWarning, LensLLMError, LensLLMInputError
    from lensllm_jax.runner.finetune import FinetuneConfig
    from lensllm_jax.runner.job import run
    from lensllm_jax.runner.result import RunResult
    from lensllm_jax.selection.base import Selection
    from lensllm_jax.selection.confidence import confidence
    from lensllm_jax.selection.ranking import RankRow, rank
    from lensllm_jax.selection.registry import METHODS, Method


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"lensllm_jax.{name}")
    else:
        raise AttributeError(f"module 'lensllm_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
