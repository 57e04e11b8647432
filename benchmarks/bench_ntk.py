"""eNTK loss-gradient kernel of a GPT-2-shaped causal LM: wall time, FLOP/s, peak memory; JSON.

Target (issue 3): N = 64 sequences x 128 tokens, GPT-2 small (124M), <= 0.10 s on an H200.
Measures, each jitted, compile excluded, median of --repeat runs:

- ``ntk``: `ntk.loss_gradient_kernel` (block-wise Jacobian contraction, --chunk examples per
  block, optional --bf16 per-example gradients with f32 Gram accumulation);
- ``batched_grad``: one gradient of the mean loss over the same N x T batch, the FLOP floor
  of any per-example method (the issue measured 55 ms on an H200);
- ``naive_vmap_grad``: all N per-example gradients at once, raveled, then J Jᵀ (the baseline);
- ``torch_vmap_grad``: torch.func vmap(grad) + Gram on the same architecture and weights
  (when torch is installed; skipped with --no-torch), plus the max relative difference of
  its kernel from ours (a correctness cross-check).

FLOPs: the analytic forward+backward count of the batch (`gpt2_grad_flops`, the floor of any
per-example method; FLOP/s "at floor" = floor / time) and XLA's cost analysis of each compiled
program (`flops`; it counts a scanned layer's body once, so it undercounts).
Peak memory: the device's `memory_stats()` when it has one (GPU), else process max RSS.

Usage: python benchmarks/bench_ntk.py --preset gpt2-small          # on a GPU
       python benchmarks/bench_ntk.py --preset tiny --n 16 --seq 32  # CPU-sized
--model zoo (default when importable): lensllm_jax.models' GPT-2 (scanned layers); --model
builtin: a minimal GPT-2 defined here (pre-LN, tied embeddings, tanh-GELU, learned positions,
stacked and scanned layers). The torch twin is the builtin architecture, loaded with the same
weights in both cases, so its kernel must agree with ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lensllm_jax import ntk

PRESETS = {
    "gpt2-small": dict(vocab=50257, d=768, layers=12, heads=12, n=64, seq=128, positions=1024),
    "small-cpu": dict(vocab=4096, d=256, layers=4, heads=4, n=16, seq=64),
    "tiny": dict(vocab=512, d=64, layers=2, heads=4, n=16, seq=32),
}


# ----------------------------------------------------------------------------- model (JAX)


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


# ----------------------------------------------------------------------------- model (torch)


def torch_per_example_loss(heads: int):
    import torch
    import torch.nn.functional as F

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), g, b, 1e-5)

    def loss(params, tokens):  # tokens (..., T); mean NLL over positions, shape (...)
        t = tokens.shape[-1]
        x = params["wte"][tokens] + params["wpe"][:t]
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
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


def build_model(cfg: dict[str, int], which: str) -> dict[str, Any]:
    """params, batch, per_example_loss(params, batch) -> (N,), and `to_builtin` (a params-shaped
    tree in the builtin layout, for the torch twin). which="zoo": lensllm_jax.models' GPT-2."""
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
        m = models.from_config(hf, 0)
        return {
            "params": m.params,
            "batch": {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)},
            "loss": lambda p, b: models.per_example_loss(m.apply, p, b),
            "to_builtin": zoo_to_builtin,
            "tokens": tokens,
        }
    pos = max(seq, cfg.get("positions", seq))
    params = init_gpt2(jax.random.key(0), vocab, cfg["d"], cfg["layers"], cfg["heads"], pos)
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


# ----------------------------------------------------------------------------- timing


def gpt2_grad_flops(cfg: dict[str, int], n: int, seq: int) -> float:
    """Analytic FLOPs of one forward + backward over n x seq tokens (backward = 2x forward):
    matmul weights (12 d² per layer + the tied V x d head) and causal-unmasked attention
    (4 T d per token per layer). XLA's cost analysis counts a scanned layer once, so this is
    the floor used for FLOP/s."""
    d, nl, v = cfg["d"], cfg["layers"], cfg["vocab"]
    fwd_per_token = 2 * (nl * 12 * d * d + v * d) + nl * 4 * seq * d
    return 3.0 * fwd_per_token * n * seq


def default_model() -> str:
    """The model zoo's GPT-2 when it imports, else the builtin twin."""
    try:
        from lensllm_jax import models  # noqa: F401
    except ImportError:
        return "builtin"
    return "zoo"


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "host": platform.machine(),
    }


def peak_memory_bytes() -> dict[str, Any]:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return {"kind": "device_peak_bytes_in_use", "bytes": int(stats["peak_bytes_in_use"])}
    return {
        "kind": "process_max_rss",
        "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def time_jitted(fn, *args, repeat: int) -> dict[str, Any]:
    """Compile, then the median wall time of `repeat` calls (block_until_ready)."""
    jfn = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jfn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "compile_s": compile_s,
        "flops": flops,
        "achieved_tflops": flops / med / 1e12,
        "_out": out,
    }


def torch_time(fn, repeat: int) -> dict[str, Any]:
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "_out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    ap.add_argument("--chunk", type=int, default=None, help="examples per Jacobian block")
    ap.add_argument("--bf16", action="store_true", help="bf16 per-example grads, f32 Gram")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--model", choices=["zoo", "builtin"], default=default_model())
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    n, seq = cfg["n"], cfg["seq"]
    chunk = args.chunk or max(1, n // 2)

    model = build_model(cfg, args.model)
    params, tokens, loss = model["params"], model["batch"], model["loss"]
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))

    kernel_fn = ntk.empirical_ntk_fn(
        loss, chunk_size=chunk, jacobian_dtype=jnp.bfloat16 if args.bf16 else None
    )
    res: dict[str, Any] = {
        "benchmark": "entk_loss_gradient_kernel",
        "machine": machine(),
        "config": {**cfg, "preset": args.preset, "chunk": chunk, "bf16": args.bf16},
        "model": args.model,
        "n_params": n_params,
        # two blocks of per-example gradients alive at once (row + column)
        "jacobian_blocks_bytes": 2 * chunk * n_params * (2 if args.bf16 else 4),
        "target_s_h200_gpt2_small": 0.10,
    }
    r = time_jitted(lambda p, x: kernel_fn(p, x), params, tokens, repeat=args.repeat)
    theta = np.asarray(r.pop("_out"))
    res["ntk"] = r
    g = time_jitted(jax.grad(lambda p, x: loss(p, x).mean()), params, tokens, repeat=args.repeat)
    g.pop("_out")
    res["batched_grad"] = g
    res["ntk_over_batched_grad"] = r["median_s"] / g["median_s"]
    floor = gpt2_grad_flops(cfg, n, seq)
    res["flop_floor_analytic"] = floor
    res["ntk_tflops_at_floor"] = floor / r["median_s"] / 1e12
    res["batched_grad_tflops_at_floor"] = floor / g["median_s"] / 1e12

    if not args.no_naive:

        def naive(p, x):
            one = lambda xi: jax.tree.map(lambda a: a[None], xi)  # noqa: E731
            grads = jax.vmap(jax.grad(lambda p, xi: loss(p, one(xi))[0]), (None, 0))(p, x)
            j = jnp.concatenate([a.reshape(n, -1) for a in jax.tree.leaves(grads)], axis=1)
            return j @ j.T

        nv = time_jitted(naive, params, tokens, repeat=args.repeat)
        theta_naive = np.asarray(nv.pop("_out"))
        nv["max_rel_diff_vs_ntk"] = float(
            np.max(np.abs(theta_naive - theta)) / np.max(np.abs(theta))
        )
        res["naive_vmap_grad"] = nv
    res["peak_memory"] = peak_memory_bytes()

    if not args.no_torch:
        try:
            import torch
            from torch.func import functional_call, grad, vmap  # noqa: F401
        except ImportError:
            res["torch_vmap_grad"] = "torch not installed"
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            tparams = to_torch(model["to_builtin"](params))
            tloss = torch_per_example_loss(cfg["heads"])
            ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long)
            per_ex = vmap(grad(tloss), in_dims=(None, 0))

            def torch_kernel():
                gs = per_ex(tparams, ttok)
                return sum(v.reshape(n, -1) @ v.reshape(n, -1).T for v in gs.values())

            tr = torch_time(torch_kernel, max(1, args.repeat // 2))
            tk = tr.pop("_out").detach().numpy()
            tr["max_rel_diff_vs_ntk"] = float(np.max(np.abs(tk - theta)) / np.max(np.abs(theta)))
            tr["torch"] = torch.__version__
            res["torch_vmap_grad"] = tr
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
