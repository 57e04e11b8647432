"""GPT-NeoX (Pythia): fused per-head q/k/v, partial rotary (`rotary_pct` /
`partial_rotary_factor`), parallel residual.

Parallel block:  y = x + W_o·attn(RoPE_partial(qkv(LN₁ x))) + W_2 act(W_1 LN₂ x);
sequential:      h = x + attn(LN₁ x),  y = h + mlp(LN₂ h).
Forward cost ≈ 2·N_params·tokens + 4·L·S²·H FLOPs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import LMConfig
from .layers import (
    Dense,
    LayerNorm,
    activation,
    apply_rope,
    attend,
    attention_bias,
    layer_norm,
    output_logits,
    rope_tables,
    run_layers,
    stack_init,
)

__all__ = ["HF_IGNORE", "HF_PREFIXES", "Block", "forward", "hf_name", "init_params"]

Array = jax.Array


class Block(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, layer_idx: Array) -> Array:
        c = self.cfg
        b, s, hdim = x.shape
        h = LayerNorm(c.norm_eps, name="input_layernorm")(x)
        # transformers' layout: the fused output is (heads, 3·head_dim) with q|k|v per head.
        qkv = Dense(3 * hdim, c.qkv_bias, name="qkv")(h).reshape(b, s, c.num_heads, 3 * c.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attend(q, k, v, mask, c.head_dim**-0.5).reshape(b, s, hdim)
        a = Dense(hdim, c.o_bias, name="dense")(a)
        ln2 = LayerNorm(c.norm_eps, name="post_attention_layernorm")
        act = activation(c.activation)
        up = Dense(c.intermediate_size, True, name="dense_h_to_4h")
        down = Dense(hdim, True, name="dense_4h_to_h")
        if c.parallel_residual:
            return x + a + down(act(up(ln2(x))))
        h = x + a
        return h + down(act(up(ln2(h))))


def init_params(cfg: LMConfig, key: Array, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) weights), the pytree `forward` expects."""
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    h = cfg.hidden_size
    x = jnp.zeros((1, 1, h))
    cos = sin = jnp.zeros((1, 1, cfg.rotary_dim))
    mask = jnp.ones((1, 1, 1, 1), bool)
    params = {
        "embed": {"embedding": 0.02 * jax.random.normal(k_emb, (cfg.vocab_size, h))},
        "layers": stack_init(Block(cfg), k_layers, cfg.num_layers, x, cos, sin, mask, 0),
        "final_norm": {"scale": jnp.ones((h,)), "bias": jnp.zeros((h,))},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": 0.02 * jax.random.normal(k_head, (h, cfg.vocab_size))}
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def forward(
    cfg: LMConfig,
    params: dict,
    tokens: Array,
    attention_mask: Array | None = None,
    *,
    scan_layers: bool = True,
    remat: bool = False,
) -> Array:
    """Logits (batch, seq, vocab) in f32 for int tokens (batch, seq); mask 1 = real token.

    Positions are 0..seq−1 whatever the mask (as transformers' forward without position_ids):
    pad on the right, or expect left padding to shift positions.
    """
    b, s = tokens.shape
    emb = params["embed"]["embedding"]
    x = emb[tokens]
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(s), (b, s)))
    mask = attention_bias(attention_mask, b, s)
    blk = Block(cfg)

    def block(h, p, i):
        return blk.apply({"params": p}, h, cos, sin, mask, i)

    x = run_layers(block, x, params["layers"], scan_layers=scan_layers, remat=remat)
    x = layer_norm(x, params["final_norm"]["scale"], params["final_norm"]["bias"], cfg.norm_eps)
    return output_logits(cfg, params, x, emb)


HF_PREFIXES = ("gpt_neox.",)
HF_IGNORE = (r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)
_LAYER = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "qkv": "attention.query_key_value",
    "dense": "attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}
_TOP = {"embed": "embed_in", "final_norm": "final_layer_norm", "lm_head": "embed_out"}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for a params leaf path; per-layer names hold "{i}"."""
    from .weights import hf_leaf_name

    return hf_leaf_name(path, _TOP, _LAYER, "layers.{i}.")
