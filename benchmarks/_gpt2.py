"""The GPT-2-shaped causal LM the NTK and Hessian benchmarks measure: presets, a minimal JAX
GPT-2 (or the model zoo's), its PyTorch twin with the same weights, and its FLOP count."""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.core import ntk

PRESETS = {
    "gpt2-small": dict(vocab=50257, d=768, layers=12, heads=12, n=64, seq=128, positions=1024),
    "small-cpu": dict(vocab=4096, d=256, layers=4, heads=4, n=16, seq=64),
    "tiny": dict(vocab=512, d=64, layers=2, heads=4, n=16, seq=32),
}


def init_gpt2(key, vocab, d, layers, heads, seq, dtype=jnp.float32) -> dict[str, Any]:
    ks = jax.random.split(key, 6)
    s = 0.02

    def n(k, shape, scale=s):
        return (scale * jax.random.normal(k, shape)).astype(dtype)

    return {
        "wte": n(ks[0], (vocab, d)),
        "wpe": n(ks[1], (seq, d), 0.01),
        "h": {
            "ln1_g": jnp.ones((layers, d), dtype),
            "ln1_b": jnp.zeros((layers, d), dtype),
            "attn_w": n(ks[2], (layers, d, 3 * d)),
            "attn_b": jnp.zeros((layers, 3 * d), dtype),
            "proj_w": n(ks[3], (layers, d, d), s / np.sqrt(2 * layers)),
            "proj_b": jnp.zeros((layers, d), dtype),
            "ln2_g": jnp.ones((layers, d), dtype),
            "ln2_b": jnp.zeros((layers, d), dtype),
            "fc_w": n(ks[4], (layers, d, 4 * d)),
            "fc_b": jnp.zeros((layers, 4 * d), dtype),
            "mlp_w": n(ks[5], (layers, 4 * d, d), s / np.sqrt(2 * layers)),
            "mlp_b": jnp.zeros((layers, d), dtype),
        },
        "lnf_g": jnp.ones((d,), dtype),
        "lnf_b": jnp.zeros((d,), dtype),
    }


def _ln(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def make_apply(heads: int):
    def apply(params, tokens):
        nb, t = tokens.shape
        x = params["wte"][tokens] + params["wpe"][:t]
        mask = jnp.tril(jnp.ones((t, t), bool))

        def block(x, p):
            d = x.shape[-1]
            hd = d // heads
            qkv = _ln(x, p["ln1_g"], p["ln1_b"]) @ p["attn_w"] + p["attn_b"]
            q, k, v = (z.reshape(nb, t, heads, hd) for z in jnp.split(qkv, 3, axis=-1))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
            att = jax.nn.softmax(jnp.where(mask, att, jnp.finfo(att.dtype).min), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(nb, t, d)
            x = x + o @ p["proj_w"] + p["proj_b"]
            h = jax.nn.gelu(_ln(x, p["ln2_g"], p["ln2_b"]) @ p["fc_w"] + p["fc_b"])
            return x + h @ p["mlp_w"] + p["mlp_b"], None

        x, _ = jax.lax.scan(block, x, params["h"])
        return _ln(x, params["lnf_g"], params["lnf_b"]) @ params["wte"].T

    return apply


def make_per_example_loss(heads: int):
    logprobs = ntk.causal_lm_token_logprobs(make_apply(heads))

    def per_example_loss(params, tokens):
        return -logprobs(params, tokens).mean(axis=-1)

    return per_example_loss


def torch_per_example_loss(heads: int):
    import torch
    import torch.nn.functional as F

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), g, b, 1e-5)

    def loss(params, tokens):  # tokens (..., T); mean NLL over positions, shape (...)
        t = tokens.shape[-1]
        x = params["wte"][tokens] + params["wpe"][:t]
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=tokens.device))
        nl = params["h.attn_w"].shape[0]
        for i in range(nl):
            d = x.shape[-1]
            hd = d // heads
            qkv = ln(x, params["h.ln1_g"][i], params["h.ln1_b"][i]) @ params["h.attn_w"][i]
            qkv = qkv + params["h.attn_b"][i]
            q, k, v = (z.reshape(*z.shape[:-1], heads, hd) for z in qkv.split(d, dim=-1))
            att = torch.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(hd)
            att = torch.softmax(att.masked_fill(~mask, torch.finfo(att.dtype).min), dim=-1)
            o = torch.einsum("...hqk,...khd->...qhd", att, v).reshape(x.shape)
            x = x + o @ params["h.proj_w"][i] + params["h.proj_b"][i]
            h = ln(x, params["h.ln2_g"][i], params["h.ln2_b"][i]) @ params["h.fc_w"][i]
            h = F.gelu(h + params["h.fc_b"][i], approximate="tanh")
            x = x + h @ params["h.mlp_w"][i] + params["h.mlp_b"][i]
        logits = ln(x, params["lnf_g"], params["lnf_b"]) @ params["wte"].T
        logp = torch.log_softmax(logits[..., :-1, :], dim=-1)
        return -logp.gather(-1, tokens[..., 1:, None])[..., 0].mean(-1)

    return loss


def zoo_to_builtin(p: dict[str, Any]) -> dict[str, Any]:
    """lensllm_jax.models' GPT-2 params (or any tree of that shape) in the builtin layout."""
    lay = p["layers"]
    return {
        "wte": p["wte"]["embedding"],
        "wpe": p["wpe"]["embedding"],
        "h": {
            "ln1_g": lay["ln_1"]["scale"],
            "ln1_b": lay["ln_1"]["bias"],
            "attn_w": lay["c_attn"]["kernel"],
            "attn_b": lay["c_attn"]["bias"],
            "proj_w": lay["attn_proj"]["kernel"],
            "proj_b": lay["attn_proj"]["bias"],
            "ln2_g": lay["ln_2"]["scale"],
            "ln2_b": lay["ln_2"]["bias"],
            "fc_w": lay["c_fc"]["kernel"],
            "fc_b": lay["c_fc"]["bias"],
            "mlp_w": lay["mlp_proj"]["kernel"],
            "mlp_b": lay["mlp_proj"]["bias"],
        },
        "lnf_g": p["ln_f"]["scale"],
        "lnf_b": p["ln_f"]["bias"],
    }


def build_model(cfg: dict[str, int], which: str, dtype: Any = jnp.float32) -> dict[str, Any]:
    """params, batch, per_example_loss(params, batch) -> (N,), and `to_builtin` (a params-shaped
    tree in the builtin layout, for the torch twin). which="zoo": lensllm_jax.models' GPT-2.
    dtype: the parameters' dtype (bf16 makes every forward / backward matmul bf16)."""
    n, seq, vocab = cfg["n"], cfg["seq"], cfg["vocab"]
    tokens = jax.random.randint(jax.random.key(1), (n, seq), 0, vocab)
    if which == "zoo":
        from lensllm_jax import models

        hf = {
            "model_type": "gpt2",
            "n_embd": cfg["d"],
            "n_layer": cfg["layers"],
            "n_head": cfg["heads"],
            "vocab_size": vocab,
            "n_positions": max(seq, cfg.get("positions", seq)),
        }
        m = models.from_config(hf, 0, dtype=dtype)
        return {
            "params": m.params,
            "batch": {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)},
            "loss": lambda p, b: models.per_example_loss(m.apply, p, b),
            "to_builtin": zoo_to_builtin,
            "tokens": tokens,
        }
    pos = max(seq, cfg.get("positions", seq))
    params = init_gpt2(jax.random.key(0), vocab, cfg["d"], cfg["layers"], cfg["heads"], pos, dtype)
    return {
        "params": params,
        "batch": tokens,
        "loss": make_per_example_loss(cfg["heads"]),
        "to_builtin": lambda p: p,
        "tokens": tokens,
    }


def to_torch(params):
    import torch

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        flat[name] = torch.tensor(np.asarray(leaf, dtype=np.float32))
    return flat


def gpt2_grad_flops(cfg: dict[str, int], n: int, seq: int) -> float:
    """Analytic FLOPs of one forward + backward over n x seq tokens (backward = 2x forward):
    matmul weights (12 d² per layer + the tied V x d head) and causal-unmasked attention
    (4 T d per token per layer). XLA's cost analysis counts a scanned layer once, so this is
    the floor used for FLOP/s."""
    d, nl, v = cfg["d"], cfg["layers"], cfg["vocab"]
    fwd_per_token = 2 * (nl * 12 * d * d + v * d) + nl * 4 * seq * d
    return 3.0 * fwd_per_token * n * seq


def default_model() -> str:
    """The model zoo's GPT-2 when it imports (its layers need flax, and flax needs rich), else
    the builtin twin (plain JAX)."""
    try:
        import flax.linen  # noqa: F401

        from lensllm_jax import models  # noqa: F401
    except ImportError:
        return "builtin"
    return "zoo"


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared with bench_hessian.py."""
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    ap.add_argument("--param-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-device", default="auto", help="auto (cuda if present), cpu, cuda")
    ap.add_argument("--model", choices=["zoo", "builtin"], default=default_model())
    ap.add_argument("--out", default=None, help="also write the JSON here (after every section)")
