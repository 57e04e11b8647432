"""Every selection method, registered once: name -> `Method`.

A `Method` is called like a function, ``method(table, budget_size, target) -> Selection``,
and says what else a caller needs to know: whether it needs the table's NTK spectra, and
whether its predictions have a calibrated error model (then rankings carry P(best)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import lensllm_jax.selection.baselines as baselines
import lensllm_jax.selection.lensllm as lensllm
import lensllm_jax.selection.ntk_arms as ntk_arms
from lensllm_jax.data.curves import CurveTable
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection.base import Selection, SelectionMethod

__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "method_names", "resolve_methods"]


@dataclass(frozen=True)
class Method:
    """One selection method.

    Attributes:
      name: its registry name (e.g. "LensLLM").
      fn: ``(table, budget_size, target) -> Selection``.
      summary: one line for ``--help``.
      needs_ntk: it reads `CurveTable.ntk` (LensLLM-NTK).
      calibrated: its predicted losses have the calibrated error model of
        `selection.confidence`, so rankings by it carry P(best) and a credible set.
    """

    name: str
    fn: SelectionMethod
    summary: str
    needs_ntk: bool = False
    calibrated: bool = False

    def __call__(self, table: CurveTable, budget_size: float, target: float) -> Selection:
        return self.fn(table, budget_size, target)


_ALL = (
    Method("ZeroShot", baselines.zero_shot, "the zero-shot loss; no fine-tuning"),
    Method("SubTuning", baselines.subtuning, "the loss at the largest fine-tuned size"),
    Method("ModelSize", baselines.model_size, "the largest model"),
    Method("VanillaFit", baselines.vanilla_fit, "L = B/D^β + E, extrapolated"),
    Method("RectifiedFit", baselines.rectified_fit, "L = B/(D_l + D^β) + E, extrapolated"),
    Method("AtS", baselines.ats, "Accept-then-Stop: a power-phase line, extrapolated"),
    Method(
        "LensLLM",
        lensllm.lensllm,
        "LENSLLM law fused with AtS, slopes pooled (curves only)",
        calibrated=True,
    ),
    Method(
        "LensLLM-NTK",
        lensllm.lensllm_ntk,
        "L = B/(F(Θ,t) + D^β) + E with each candidate's NTK spectrum",
        needs_ntk=True,
    ),
    # The NTK arms of issue 9 (selection.ntk_arms; benchmarks/zoo measures them).
    Method(
        "LensLLM-cap",
        ntk_arms.lensllm_cap,
        "L = B/(F + D^β) + E with F <= ‖r‖² fitted: LensLLM-NTK without its spectrum",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps",
        ntk_arms.ntk_steps,
        "F(Θ, τ(D)) per point at the recipe's steps, SGD-equivalent η, F(0) = ‖r‖²",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-F0",
        ntk_arms.ntk_steps_f0,
        "as LensLLM-NTK-steps with F(0) fitted: the spectrum sets F's decay only",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-lr",
        ntk_arms.ntk_steps_lr,
        "as LensLLM-NTK-steps with η = the recipe's learning rate (AdamW read as SGD)",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-lr-shuffled",
        ntk_arms.ntk_steps_lr_shuffled,
        "control: LensLLM-NTK-steps-lr with the kernels deranged across candidates",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-rate",
        ntk_arms.ntk_steps_rate,
        "as LensLLM-NTK-steps with η's scale fitted: the recipe's step ratios kept",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-shuffled",
        ntk_arms.ntk_steps_shuffled,
        "control: LensLLM-NTK-steps with the kernels deranged across candidates",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-F0-shuffled",
        ntk_arms.ntk_steps_f0_shuffled,
        "control: LensLLM-NTK-steps-F0 with the kernels deranged across candidates",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-NTK-steps-rate-shuffled",
        ntk_arms.ntk_steps_rate_shuffled,
        "control: LensLLM-NTK-steps-rate with the kernels deranged across candidates",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-kernel",
        ntk_arms.kernel_trend,
        "LensLLM whose slope trend also takes the kernel's summaries (λ_max, tr Θ/N, ...)",
        needs_ntk=True,
    ),
    Method(
        "LensLLM-kernel-shuffled",
        ntk_arms.kernel_trend_shuffled,
        "control: LensLLM-kernel with the summaries deranged across candidates",
        needs_ntk=True,
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
DEFAULT_METHODS = ("LensLLM",)


def method_names(*, ntk: bool = True) -> tuple[str, ...]:
    """Names of the registered methods, in registry order (without the NTK ones when
    `ntk` is False)."""
    return tuple(name for name, m in METHODS.items() if ntk or not getattr(m, "needs_ntk", False))


def resolve_methods(
    methods: Sequence[str] | Mapping[str, Callable[..., Selection]] | None,
) -> dict[str, Method]:
    """Name -> `Method`. `None` means every registered method that needs no NTK spectra; a
    mapping is used as given (custom methods, wrapped as uncalibrated `Method`s); an unknown
    name is a `LensLLMInputError` naming the known ones."""
    if isinstance(methods, Mapping):
        return {name: _as_method(name, fn) for name, fn in methods.items()}
    if methods is None:
        return {name: _as_method(name, METHODS[name]) for name in method_names(ntk=False)}
    out: dict[str, Method] = {}
    for name in methods:
        if name not in METHODS:
            raise LensLLMInputError(
                f"unknown method {name!r}", hint=f"choose from {', '.join(METHODS)}"
            )
        out[name] = _as_method(name, METHODS[name])
    return out


def _as_method(name: str, fn: Callable[..., Selection]) -> Method:
    return fn if isinstance(fn, Method) else Method(name, fn, "custom")
