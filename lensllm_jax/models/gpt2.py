"""GPT-2 (also Cerebras-GPT, LaMini-GPT, DistilGPT2): learned positions, pre-LayerNorm.

Block:  h = x + W_proj·attn(split(W_attn LN(x))),  y = h + W_2 act(W_1 LN(h)).
Weights are Conv1D, i.e. already (in, out): no transpose on load.
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
    attend,
    attention_bias,
    layer_norm,
    output_logits,
    run_layers,
    stack_init,
)

__all__ = ["HF_IGNORE", "HF_PREFIXES", "Block", "forward", "hf_name", "init_params"]

Array = jax.Array


class Block(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, layer_idx: Array) -> Array:
        c = self.cfg
        b, s, hdim = x.shape
        h = LayerNorm(c.norm_eps, name="ln_1")(x)
        qkv = Dense(3 * hdim, True, name="c_attn")(h)
        q, k, v = (t.reshape(b, s, c.num_heads, c.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        scale = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale = scale / (jnp.asarray(layer_idx, jnp.float32) + 1.0)
        a = attend(q, k, v, mask, scale).reshape(b, s, hdim)
        x = x + Dense(hdim, True, name="attn_proj")(a)
        h = LayerNorm(c.norm_eps, name="ln_2")(x)
        h = activation(c.activation)(Dense(c.intermediate_size, True, name="c_fc")(h))
        return x + Dense(hdim, True, name="mlp_proj")(h)


def init_params(cfg: LMConfig, key: Array, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) weights), the pytree `forward` expects."""
    k_wte, k_wpe, k_layers, k_head = jax.random.split(key, 4)
    h = cfg.hidden_size
    x = jnp.zeros((1, 1, h))
    params = {
        "wte": {"embedding": 0.02 * jax.random.normal(k_wte, (cfg.vocab_size, h))},
        "wpe": {"embedding": 0.01 * jax.random.normal(k_wpe, (cfg.max_position_embeddings, h))},
        "layers": stack_init(
            Block(cfg), k_layers, cfg.num_layers, x, jnp.ones((1, 1, 1, 1), bool), 0
        ),
        "ln_f": {"scale": jnp.ones((h,)), "bias": jnp.zeros((h,))},
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
    wte = params["wte"]["embedding"]
    x = wte[tokens] + params["wpe"]["embedding"][jnp.arange(s)][None]
    mask = attention_bias(attention_mask, b, s)
    blk = Block(cfg)

    def block(h, p, i):
        return blk.apply({"params": p}, h, mask, i)

    x = run_layers(block, x, params["layers"], scan_layers=scan_layers, remat=remat)
    x = layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], cfg.norm_eps)
    return output_logits(cfg, params, x, wte)


HF_PREFIXES = ("transformer.",)
HF_IGNORE = (r"h\.\d+\.attn\.(bias|masked_bias)",)
_LAYER = {
    "ln_1": "ln_1",
    "ln_2": "ln_2",
    "c_attn": "attn.c_attn",
    "attn_proj": "attn.c_proj",
    "c_fc": "mlp.c_fc",
    "mlp_proj": "mlp.c_proj",
}
_TOP = {"wte": "wte", "wpe": "wpe", "ln_f": "ln_f", "lm_head": "lm_head"}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for a params leaf path; Conv1D weights are not transposed."""
    from .weights import hf_leaf_name

    name, transpose = hf_leaf_name(path, _TOP, _LAYER, "h.{i}.")
    return name, transpose and path[0] == "lm_head"
