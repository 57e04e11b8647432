"""Llama family: Llama 2/3 (rope_theta, "llama3" rope scaling, GQA, head_dim, tied or untied
embeddings), Mistral (sliding window), Qwen2 (q/k/v bias), SmolLM2.

Block (pre-norm):  h = x + W_o·attn(RoPE(W_q n(x)), RoPE(W_k n(x)), W_v n(x)),
                   y = h + W_down(act(W_gate n(h)) ⊙ W_up n(h)),   n = RMSNorm.
Forward cost ≈ 2·N_params·tokens + 4·L·S²·H·D FLOPs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import LMConfig
from .layers import (
    Dense,
    RMSNorm,
    activation,
    apply_rope,
    attend,
    attention_bias,
    output_logits,
    rms_norm,
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
        b, s, _ = x.shape
        h = RMSNorm(c.norm_eps, name="input_norm")(x)
        q = Dense(c.num_heads * c.head_dim, c.qkv_bias, name="q")(h)
        k = Dense(c.num_kv_heads * c.head_dim, c.qkv_bias, name="k")(h)
        v = Dense(c.num_kv_heads * c.head_dim, c.qkv_bias, name="v")(h)
        q = apply_rope(q.reshape(b, s, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, s, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, s, c.num_kv_heads, c.head_dim)
        a = attend(q, k, v, mask, c.head_dim**-0.5).reshape(b, s, c.num_heads * c.head_dim)
        x = x + Dense(c.hidden_size, c.o_bias, name="o")(a)
        h = RMSNorm(c.norm_eps, name="post_norm")(x)
        act = activation(c.activation)
        g = Dense(c.intermediate_size, c.mlp_bias, name="gate")(h)
        u = Dense(c.intermediate_size, c.mlp_bias, name="up")(h)
        return x + Dense(c.hidden_size, c.mlp_bias, name="down")(act(g) * u)


def init_params(cfg: LMConfig, key: Array, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) weights, unit norms), the pytree `forward` expects."""
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    x = jnp.zeros((1, 1, cfg.hidden_size))
    cos = sin = jnp.zeros((1, 1, cfg.rotary_dim))
    mask = jnp.ones((1, 1, 1, 1), bool)
    params = {
        "embed": {"embedding": 0.02 * jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden_size))},
        "layers": stack_init(Block(cfg), k_layers, cfg.num_layers, x, cos, sin, mask, 0),
        "norm": {"scale": jnp.ones((cfg.hidden_size,))},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {
            "kernel": 0.02 * jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))
        }
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
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope_tables(cfg, positions)
    mask = attention_bias(attention_mask, b, s, cfg.sliding_window)
    blk = Block(cfg)

    def block(h, p, i):
        return blk.apply({"params": p}, h, cos, sin, mask, i)

    x = run_layers(block, x, params["layers"], scan_layers=scan_layers, remat=remat)
    x = rms_norm(x, params["norm"]["scale"], cfg.norm_eps)
    return output_logits(cfg, params, x, emb)


# ---------------------------------------------------------------- Hugging Face names

HF_PREFIXES = ("model.",)
HF_IGNORE = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
_LAYER = {
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_TOP = {"embed": "embed_tokens", "norm": "norm", "lm_head": "lm_head"}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for a params leaf path; per-layer names hold "{i}"."""
    from .weights import hf_leaf_name

    return hf_leaf_name(path, _TOP, _LAYER, "layers.{i}.")
