"""The per-example probe loss of a causal LM, in nats per byte: what the NTK and the Hessian
of `lensllm run` are measured on.

    ℓ_i(θ) = (−Σ_t m_it log p(x_it | x_i,<t) / Σ_t m_it) · (Σ_t m_it / bytes_i)

(the mean token NLL over the target tokens, times target tokens per target byte), so that
candidates with different tokenizers share one unit. Each example is processed on its own,
as the empirical NTK requires.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lensllm_jax.models.losses import per_example_loss

__all__ = ["mean_probe_loss_fn", "probe_batch", "probe_loss_fn"]


def probe_batch(data: Any) -> dict[str, np.ndarray]:
    """The probe batch for `probe_loss_fn` from a `data.text.TokenData`: tokens, loss_mask,
    attention_mask and ``nats_per_byte`` = target tokens / target bytes per example (the
    factor that turns a mean token NLL into nats per byte)."""
    loss_mask = np.asarray(data.loss_mask, np.int32)
    n_target = loss_mask[:, 1:].sum(axis=1)  # position 0 is never a target
    scale = n_target / np.maximum(np.asarray(data.target_bytes, np.int64), 1)
    return {
        "tokens": np.asarray(data.tokens, np.int32),
        "loss_mask": loss_mask,
        "attention_mask": np.asarray(data.attention_mask, np.int32),
        "nats_per_byte": scale.astype(np.float32),
    }


@functools.lru_cache(maxsize=16)
def probe_loss_fn(apply: Callable[..., Any]) -> Callable[[Any, Mapping[str, Any]], Any]:
    """`(params, batch) -> (N,)` per-example loss in nats per byte (the module's ℓ_i). Pure,
    jittable. One function object per `apply`, so programs compiled for it are shared by
    same-architecture models."""

    def loss(params: Any, batch: Mapping[str, Any]) -> Any:
        return per_example_loss(apply, params, batch) * batch["nats_per_byte"]

    return loss


@functools.lru_cache(maxsize=16)
def mean_probe_loss_fn(apply: Callable[..., Any]) -> Callable[[Any, Mapping[str, Any]], Any]:
    """(θ, batch) -> (1/N) Σ_i ℓ_i(θ), the scalar whose Hessian is measured; one function
    object per model, so the Hessian programs compile once per model (and batch shape)
    however many fine-tuned parameter sets they measure."""
    loss = probe_loss_fn(apply)
    return lambda p, batch: loss(p, batch).mean()
