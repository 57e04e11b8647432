"""Fine-tuning throughput: train-step tokens/s and compile time for a GPT-2-shaped model, and
the wall time of one loss curve (zero-shot + fine-tune/evaluate per subset size).

    python benchmarks/bench_finetune.py                                  # tiny preset, CPU
    python benchmarks/bench_finetune.py --preset gpt2-small --batch 8 --seq 256 --steps 5

Prints one JSON object (machine info included). Random weights and random tokens (the cost does
not depend on the values); the loss covers the second half of each sequence (the "target").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from _common import machine

from lensllm_jax import models
from lensllm_jax.data.text import TokenData
from lensllm_jax.runner import finetune as ft

PRESETS = {
    "tiny": {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 1024},
    "gpt2-small": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
                   "n_head": 12, "n_positions": 1024},
}  # fmt: skip


def random_data(n: int, seq: int, vocab: int, seed: int) -> TokenData:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, seq)).astype(np.int32)
    loss_mask = np.zeros((n, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    return TokenData(
        tokens, loss_mask, np.ones((n, seq), np.int32), np.full(n, 4 * (seq - seq // 2))
    )


def bench_step(m: models.CausalLM, args: argparse.Namespace) -> dict:
    cfg = ft.FinetuneConfig(batch_size=args.batch)
    init, step = ft.make_train_step(m.apply, cfg)
    params = jax.tree.map(lambda x: x.copy(), m.params)
    opt_state = init(params)
    batch = random_data(args.batch, args.seq, m.config.vocab_size, 0).batch()
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch, 1e-4)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, 1e-4)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n_params = models.count_params(m.params)
    tokens = args.batch * args.seq
    return {
        "batch": args.batch, "seq": args.seq, "n_params": n_params,
        "first_step_s": round(first, 3), "compile_s": round(first - step_s, 3),
        "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(6 * n_params * tokens / step_s / 1e12, 4),
    }  # fmt: skip


def bench_curve(args: argparse.Namespace) -> dict:
    m = models.from_config(PRESETS["tiny"], 0)
    v = m.config.vocab_size
    pool = random_data(max(args.curve_sizes), args.curve_seq, v, 1)
    test = random_data(64, args.curve_seq, v, 2)
    cfg = ft.FinetuneConfig()
    out = {"preset": "tiny", "sizes": args.curve_sizes, "seq": args.curve_seq, "test": 64}
    for label in ("first_s", "cached_s"):  # the first run includes compiling step + eval
        t0 = time.perf_counter()
        curve = ft.loss_curve(m.apply, m.params, pool, test, args.curve_sizes, cfg, seed=0)
        out[label] = round(time.perf_counter() - t0, 3)
    out["num_steps"] = curve.num_steps.tolist()
    out["status"] = list(curve.status)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--curve-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--curve-seq", type=int, default=64)
    p.add_argument("--no-curve", action="store_true")
    args = p.parse_args()
    m = models.from_config(PRESETS[args.preset], 0)
    result = {"preset": args.preset, "train_step": bench_step(m, args)}
    if not args.no_curve:
        result["loss_curve"] = bench_curve(args)
    print(
        json.dumps(
            {
                "benchmark": "bench_finetune",
                "machine": machine(),
                "results": result,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
