"""OPT: learned positions with offset 2 (taken from the attention mask's cumulative sum),
pre- or post-LayerNorm (`do_layer_norm_before`), optional project_in/project_out (OPT-350m).

Pre-LN block:  h = x + W_out·attn(W_q n(x), W_k n(x), W_v n(x)),  y = h + fc2(act(fc1 n(h))).
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

__all__ = [
    "HF_IGNORE",
    "HF_PREFIXES",
    "POSITION_OFFSET",
    "Block",
    "forward",
    "hf_name",
    "init_params",
]

Array = jax.Array
POSITION_OFFSET = 2


class Block(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, layer_idx: Array) -> Array:
        c = self.cfg
        b, s, hdim = x.shape
        ln_attn = LayerNorm(c.norm_eps, c.layer_norm_affine, name="self_attn_layer_norm")
        ln_mlp = LayerNorm(c.norm_eps, c.layer_norm_affine, name="final_layer_norm")
        pre = c.do_layer_norm_before
        h = ln_attn(x) if pre else x
        q, k, v = (
            Dense(hdim, c.qkv_bias, name=n)(h).reshape(b, s, c.num_heads, c.head_dim)
            for n in ("q", "k", "v")
        )
        a = attend(q, k, v, mask, c.head_dim**-0.5).reshape(b, s, hdim)
        x = x + Dense(hdim, c.o_bias, name="o")(a)
        if not pre:
            x = ln_attn(x)
        h = ln_mlp(x) if pre else x
        h = activation(c.activation)(Dense(c.intermediate_size, c.mlp_bias, name="fc1")(h))
        x = x + Dense(hdim, c.mlp_bias, name="fc2")(h)
        return x if pre else ln_mlp(x)


def init_params(cfg: LMConfig, key: Array, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) weights), the pytree `forward` expects."""
    ks = jax.random.split(key, 6)
    h, p = cfg.hidden_size, cfg.word_embed_proj_dim
    x = jnp.zeros((1, 1, h))
    params = {
        "embed": {"embedding": 0.02 * jax.random.normal(ks[0], (cfg.vocab_size, p))},
        "positions": {
            "embedding": 0.02
            * jax.random.normal(ks[1], (cfg.max_position_embeddings + POSITION_OFFSET, h))
        },
        "layers": stack_init(Block(cfg), ks[2], cfg.num_layers, x, jnp.ones((1, 1, 1, 1), bool), 0),
    }
    if cfg.final_layer_norm and cfg.layer_norm_affine:
        params["final_norm"] = {"scale": jnp.ones((h,)), "bias": jnp.zeros((h,))}
    if p != h:
        params["project_in"] = {"kernel": 0.02 * jax.random.normal(ks[3], (p, h))}
        params["project_out"] = {"kernel": 0.02 * jax.random.normal(ks[4], (h, p))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": 0.02 * jax.random.normal(ks[5], (p, cfg.vocab_size))}
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

    Positions are cumsum(mask)·mask − 1 (+2 offset), as transformers computes them, so left
    padding does not shift the positions of real tokens.
    """
    b, s = tokens.shape
    emb = params["embed"]["embedding"]
    x = emb[tokens]
    if "project_in" in params:
        x = jnp.dot(x, params["project_in"]["kernel"].astype(x.dtype))
    m = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(m, axis=1) * m - 1
    x = x + params["positions"]["embedding"][positions + POSITION_OFFSET].astype(x.dtype)
    mask = attention_bias(attention_mask, b, s)
    blk = Block(cfg)

    def block(h, p, i):
        return blk.apply({"params": p}, h, mask, i)

    x = run_layers(block, x, params["layers"], scan_layers=scan_layers, remat=remat)
    if cfg.final_layer_norm:
        fn = params.get("final_norm", {})
        x = layer_norm(x, fn.get("scale"), fn.get("bias"), cfg.norm_eps)
    if "project_out" in params:
        x = jnp.dot(x, params["project_out"]["kernel"].astype(x.dtype))
    return output_logits(cfg, params, x, emb)


HF_PREFIXES = ("model.decoder.", "decoder.")
HF_IGNORE = ()
_LAYER = {
    "self_attn_layer_norm": "self_attn_layer_norm",
    "final_layer_norm": "final_layer_norm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.out_proj",
    "fc1": "fc1",
    "fc2": "fc2",
}
_TOP = {
    "embed": "embed_tokens",
    "positions": "embed_positions",
    "final_norm": "final_layer_norm",
    "project_in": "project_in",
    "project_out": "project_out",
    "lm_head": "lm_head",
}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for a params leaf path; per-layer names hold "{i}"."""
    from .weights import hf_leaf_name

    return hf_leaf_name(path, _TOP, _LAYER, "layers.{i}.")
