"""Model-zoo throughput: forward tokens/s, per-example-gradient throughput and compile times,
scanned versus unrolled layers, for GPT-2-small and SmolLM2-135M shapes (random weights).

    python benchmarks/bench_models.py                      # both models, CPU-friendly sizes
    python benchmarks/bench_models.py --models smollm2-135m --batch 16 --seq 512 --grad-batch 8

Prints one JSON object (machine info included). Per-example gradients are
vmap(grad(per_example_loss)) over the batch: what the NTK/Hessian code differentiates.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import machine

from lensllm_jax import models

SHAPES = {
    "gpt2-small": {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_positions": 1024,
    },
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
    },
}  # fmt: skip


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile seconds, best-of-`repeats` run seconds) of a jitted fn."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best


def bench(name: str, args: argparse.Namespace, scan_layers: bool, depth: int | None) -> dict:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    cfg = models.config_from_hf(SHAPES[name])
    if depth is not None:
        cfg = cfg.replace(num_layers=depth)
    m = models.from_config(cfg, 0, dtype=dtype, scan_layers=scan_layers, remat=args.remat)
    rng = np.random.default_rng(0)
    v = m.config.vocab_size
    toks = jnp.asarray(rng.integers(0, v, (args.batch, args.seq)), jnp.int32)
    fwd_compile, fwd_s = _timed(m.apply, m.params, toks, repeats=args.repeats)

    gtoks = toks[: args.grad_batch]
    mask = jnp.ones_like(gtoks)

    def one(params, t, lm):
        return m.per_example_loss(params, {"tokens": t[None], "loss_mask": lm[None]})[0]

    def per_example_grads(params, t, lm):
        g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, t, lm)
        # reduce to one number per example so the benchmark does not time a host copy
        return jax.tree_util.tree_reduce(
            lambda a, b: a + b,
            jax.tree_util.tree_map(lambda x: jnp.sum(x * x, axis=tuple(range(1, x.ndim))), g),
        )

    grad_compile, grad_s = _timed(per_example_grads, m.params, gtoks, mask, repeats=args.repeats)
    return {
        "model": name,
        "layers": "scan" if scan_layers else "unrolled",
        "num_layers": cfg.num_layers,
        "n_params": models.count_params(m.params),
        "dtype": args.dtype,
        "remat": args.remat,
        "forward": {
            "batch": args.batch, "seq": args.seq, "compile_s": round(fwd_compile, 3),
            "step_s": round(fwd_s, 4), "tokens_per_s": round(args.batch * args.seq / fwd_s, 1),
        },
        "per_example_grad": {
            "batch": args.grad_batch, "seq": args.seq, "compile_s": round(grad_compile, 3),
            "step_s": round(grad_s, 4), "examples_per_s": round(args.grad_batch / grad_s, 3),
            "tokens_per_s": round(args.grad_batch * args.seq / grad_s, 1),
        },
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--grad-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true")
    p.add_argument(
        "--layers", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"]
    )
    p.add_argument(
        "--depths", nargs="+", type=int, default=None,
        help="override the number of layers (a sweep shows compile time vs depth)",
    )  # fmt: skip
    args = p.parse_args()
    results = [
        bench(n, args, mode == "scan", depth)
        for n in args.models
        for depth in (args.depths or [None])
        for mode in args.layers
    ]
    print(
        json.dumps(
            {
                "benchmark": "bench_models",
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
