"""Building blocks shared by the families: Flax norms/linears, RoPE, masked attention, layer scan.

Numerics follow transformers' PyTorch models: norms, softmax and RoPE tables in float32 whatever
the parameter dtype, matmuls in the parameter dtype (f32 or bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.errors import ModelConfigError

from .config import LMConfig

__all__ = [
    "ACTIVATIONS",
    "MASK_VALUE",
    "Dense",
    "LayerNorm",
    "RMSNorm",
    "apply_rope",
    "attend",
    "attention_bias",
    "rope_tables",
    "run_layers",
    "stack_init",
]

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ModelConfigError(
            f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


class Dense(nn.Module):
    """y = x @ kernel + bias; kernel is (in, out) (transformers' nn.Linear weight transposed)."""

    features: int
    use_bias: bool = True
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features)
        )
        y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * scale, computed in f32, cast back before the scale (as HF)."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x, scale, self.eps)


class LayerNorm(nn.Module):
    """(x − mean) / sqrt(var + eps) * scale + bias in f32; `affine=False` drops scale/bias."""

    eps: float
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if not self.affine:
            return layer_norm(x, None, None, self.eps)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm(x, scale, bias, self.eps)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x: Array, scale: Array | None, bias: Array | None, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        assert bias is not None  # a LayerNorm with a scale has a bias
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# ---------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: LMConfig) -> np.ndarray:
    """Inverse frequencies (rotary_dim/2,) in float32, with "linear"/"llama3" scaling (as HF)."""
    dim = cfg.rotary_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2) / np.float32(dim)))).astype(
        np.float32
    )
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        factor, lo, hi = (
            float(s["factor"]),
            float(s["low_freq_factor"]),
            float(s["high_freq_factor"]),
        )
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "freq_factors":  # GGUF `rope_freqs.weight`: per-frequency divisors
        inv = (inv / np.asarray(s["factors"], np.float32)).astype(np.float32)
    return inv


def rope_tables(cfg: LMConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin of shape (batch, seq, rotary_dim) in f32 for integer `positions` (batch, seq)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first rotary_dim dims of x (batch, seq, heads, head_dim), rotate_half style."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = xr * c + rot * s
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


# ---------------------------------------------------------------- attention


def attention_bias(
    attention_mask: Array | None, batch: int, seq: int, sliding_window: int | None = None
) -> Array:
    """Boolean (batch, 1, seq, seq) mask: causal ∧ key not padding ∧ within the sliding window."""
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    allowed = jnp.broadcast_to(allowed, (batch, 1, seq, seq))
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
    return allowed


MASK_VALUE = -1e30  # added to a disallowed score: its exp is exactly 0 in float32
UNROLL_MAX_LAYERS = 4  # up to this depth `run_layers` unrolls even when asked to scan


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float | Array) -> Array:
    """softmax(q kᵀ · scale + bias) v with grouped-query heads, bias = 0 where `mask` allows
    and MASK_VALUE elsewhere.

    q: (B, S, H, D); k, v: (B, S, KV, D) with H = KV·G; mask (B or 1, 1, S, S) bool.
    4-D layout: the G query heads sharing a key/value head are stacked as G·S query rows of
    one (B, KV) batch of matmuls, so k and v are never repeated; scores and softmax in f32.
    The mask enters as an additive bias of shape (B, 1, G·S, S) (one fused add, no select on
    the (B, H, S, S) scores and none on the probabilities). A row with no allowed key (a
    padding query under left padding) gets finite, meaningless weights; no real position
    attends to it. Cost O(B·H·S²·D).
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
    kt = k.transpose(0, 2, 1, 3)  # (B, KV, S, D)
    vt = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32)
    bias = jnp.where(mask, jnp.float32(0), jnp.float32(MASK_VALUE))  # (B|1, 1, S, S)
    if g > 1:
        bias = jnp.broadcast_to(bias[:, :, None], (bias.shape[0], 1, g, s, s))
        bias = bias.reshape(bias.shape[0], 1, g * s, s)
    probs = jax.nn.softmax(scores * scale + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vt)  # (B, KV, G·S, D)
    out = out.reshape(b, kv, g, s, v.shape[-1]).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, s, h, v.shape[-1])


# ---------------------------------------------------------------- layer stack


def stack_init(module: nn.Module, key: Array, num_layers: int, *example: Any) -> Any:
    """Flax-init one block per layer and stack each leaf along a new leading axis."""
    keys = jax.random.split(key, num_layers)
    return jax.vmap(lambda k: module.init(k, *example)["params"])(keys)


def run_layers(
    block: Callable[[Array, Any, Array], Any],
    x: Array,
    layers: Any,
    *,
    scan_layers: bool = True,
    remat: bool = False,
) -> Array:
    """x ← block(x, layer_params_i, i) for each layer i of the stacked `layers` pytree.

    scan_layers=True runs `jax.lax.scan` (compile time flat in depth) when there are more than
    UNROLL_MAX_LAYERS layers; False, or a shallower stack, unrolls a Python loop over the same
    stacked params (no stacked copies of each layer's residuals for the backward pass: faster
    to run, compile time ∝ depth).
    remat=True rematerialises each block in the backward pass (memory O(1) blocks of
    activations instead of O(depth), one extra forward).
    """
    fn = jax.checkpoint(block) if remat else block
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    if scan_layers and n > UNROLL_MAX_LAYERS:

        def body(h, inp):
            p, i = inp
            return fn(h, p, i), None

        x, _ = jax.lax.scan(body, x, (layers, jnp.arange(n)))
        return x
    # One split per leaf (its transpose is one concatenate), not n slices whose gradients would
    # be n zero-padded full-size arrays summed together.
    leaves, treedef = jax.tree_util.tree_flatten(layers)
    per_leaf = [jnp.unstack(a, axis=0) for a in leaves]
    for i in range(n):
        x = fn(x, jax.tree_util.tree_unflatten(treedef, [p[i] for p in per_leaf]), jnp.asarray(i))
    return x


def output_logits(cfg: LMConfig, params: dict, x: Array, embedding: Array) -> Array:
    """Final hidden states (batch, seq, hidden) -> f32 logits through the tied input
    embedding or the untied ``params["lm_head"]``. Cost: one (hidden x vocab) matmul."""
    head = embedding.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.dot(x, head.astype(x.dtype), preferred_element_type=jnp.float32)
