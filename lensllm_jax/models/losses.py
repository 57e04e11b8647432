"""Losses over any `apply(params, tokens, attention_mask) -> logits`.

Batch format (a dict of equal-shape (batch, seq) arrays):
  "tokens":         int32 token ids;
  "loss_mask":      1 where the token is a *target* (predicted from the tokens before it), 0 for
                    prompt and padding; position 0 is never a target;
  "attention_mask": optional, 1 = real token (defaults to all ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["count_params", "greedy_generate", "per_example_loss", "token_logprobs"]

Array = jax.Array
ApplyFn = Callable[..., Array]


def token_logprobs(
    apply: ApplyFn, params: Any, tokens: Array, attention_mask: Array | None = None
) -> Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t = 1..S−1, shape (batch, seq − 1), f32.

    Cost: one forward pass, O(batch·seq·vocab) for the log-softmax.
    """
    logits = apply(params, tokens, attention_mask).astype(jnp.float32)
    # log p(x_{t+1}) = logit[x_{t+1}] − logsumexp(logits) at every position t, then drop the
    # last: no (batch, seq − 1, vocab) copy of the logits (only (batch, seq) values sliced)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
    return (picked - jax.nn.logsumexp(logits, axis=-1))[:, :-1]


def per_example_loss(apply: ApplyFn, params: Any, batch: Mapping[str, Array]) -> Array:
    """Mean next-token NLL over each example's target tokens, shape (batch,).

    ℓ_b = −Σ_t m_{b,t} log p(x_{b,t} | x_{b,<t}) / max(Σ_t m_{b,t}, 1),  m = loss_mask[:, 1:].
    An example with no target token gets 0. Cost: one forward pass.
    """
    tokens = batch["tokens"]
    lp = token_logprobs(apply, params, tokens, batch.get("attention_mask"))
    m = jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32)
    return -(lp * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def count_params(params: Any) -> int:
    """Total number of scalars in a params pytree (tied embeddings counted once)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def greedy_generate(
    apply: ApplyFn, params: Any, prompt: list[int] | np.ndarray, max_new_tokens: int
) -> list[int]:
    """Greedy continuation of one prompt (no KV cache: one jitted full forward per step on a
    fixed (1, len(prompt)+max_new_tokens) buffer, so it compiles once). Returns the new ids.
    Cost: max_new_tokens forwards of length len(prompt)+max_new_tokens.
    """
    prompt = [int(t) for t in prompt]
    n = len(prompt) + max_new_tokens
    buf = np.zeros((1, n), np.int32)
    buf[0, : len(prompt)] = prompt

    @jax.jit
    def next_token(params, buf, pos):
        logits = apply(params, buf)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits[0], pos - 1, keepdims=False))

    for pos in range(len(prompt), n):
        buf[0, pos] = int(next_token(params, jnp.asarray(buf), pos))
    return buf[0, len(prompt) :].tolist()
