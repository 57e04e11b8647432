"""Sharded programs vs unsharded ones, side by side: no hidden copies on a one-device mesh,
and the speed-up on a bigger one; JSON.

Target (issue 10): on one H200, each sharded program on a ("data", "fsdp") = (1, 1) mesh runs
as fast as the unsharded program (per-round ratio ≈ 1.0: no resharding, no host round trip,
no extra copies). Unmeasured on a GPU so far; on this project's CPU it only checks that the
script runs.

Measured, in interleaved rounds (unsharded then sharded, --rounds times, compile excluded),
the per-round ratio sharded / unsharded and its median, for:

- ``step``: one AdamW fine-tuning step from host batches (`runner.finetune.make_train_step`
  vs the same with ``mesh=``), params and state donated, as `lensllm run` calls it;
- ``eval``: per-example NLL sums of one batch (`finetune.evaluate`'s program);
- ``ntk``: the loss-gradient NTK of N probe examples (`core.ntk.loss_gradient_kernel` vs
  `parallel.ntk.loss_gradient_kernel`, one Jacobian block);
- ``hutchinson``: the trace with --probes Rademacher probes (`core.hessian` vs
  `parallel.hessian`).

With --mesh data=D,fsdp=F (D·F devices), the sharded side runs on that mesh instead: the
ratio is then the multi-device speed-up's inverse.

Usage: python benchmarks/bench_sharding.py --preset gpt2-small --out sharding.json  # GPU
       python benchmarks/bench_sharding.py --preset tiny --rounds 3                 # CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import dump, machine, section

from lensllm_jax import models
from lensllm_jax.core import hessian, ntk
from lensllm_jax.models.lm_probe import mean_probe_loss_fn, probe_loss_fn
from lensllm_jax.parallel import hessian as phessian
from lensllm_jax.parallel import make_mesh, presets, shard_params
from lensllm_jax.parallel import ntk as pntk
from lensllm_jax.runner import finetune

TINY = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
SHAPES = {  # preset -> (batch, seq, NTK examples, Hutchinson batch)
    "tiny": (8, 64, 16, 8),
    "gpt2-small": (4, 128, 16, 8),
    "smollm2-135m": (4, 128, 16, 8),
}


def _batch(rng: np.random.Generator, n: int, t: int, vocab: int) -> dict[str, np.ndarray]:
    return {
        "tokens": rng.integers(0, vocab, (n, t)).astype(np.int32),
        "loss_mask": np.ones((n, t), np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "nats_per_byte": np.full(n, 0.3, np.float32),
    }


def _rounds(plain, sharded, rounds: int) -> dict[str, Any]:
    """Interleaved timings (first call of each = compile, reported apart)."""
    t0 = time.perf_counter()
    plain()
    c_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    sharded()
    c_sharded = time.perf_counter() - t0
    tp, ts = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sharded()
        ts.append(time.perf_counter() - t0)
    ratios = [s / p for s, p in zip(ts, tp, strict=True)]
    return {
        "unsharded_s": {"median": statistics.median(tp), "min": min(tp), "first": c_plain},
        "sharded_s": {"median": statistics.median(ts), "min": min(ts), "first": c_sharded},
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--mesh", default="data=1,fsdp=1", help="layout of the sharded side")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()

    config = TINY if args.preset == "tiny" else presets.PRESETS[args.preset]
    m = models.from_config(config, 0)
    bsz, seq, n_ntk, n_hess = SHAPES[args.preset]
    devices = jax.devices()
    spec = dict(kv.split("=") for kv in args.mesh.split(","))
    size = int(np.prod([int(v) for v in spec.values()]))
    mesh = make_mesh(args.mesh, devices[:size])
    res: dict[str, Any] = {
        "machine": machine(),
        "load_average": os.getloadavg(),
        "preset": args.preset,
        "num_params": int(m.num_params),
        "mesh": args.mesh,
        "shapes": {"batch": bsz, "seq": seq, "ntk_examples": n_ntk, "hutchinson_batch": n_hess},
        "rounds": args.rounds,
    }
    rng = np.random.default_rng(0)
    vocab = m.config.vocab_size
    sharded_params = shard_params(m.params, mesh)

    def step_section() -> dict[str, Any]:
        cfg = finetune.FinetuneConfig(batch_size=bsz)
        batch = _batch(rng, bsz, seq, vocab)
        init1, step1 = finetune.make_train_step(m.apply, cfg)
        init2, step2 = finetune.make_train_step(m.apply, cfg, mesh=mesh)
        plain = jax.tree.map(lambda x: jnp.array(x, copy=True), m.params)
        sharded = jax.tree.map(lambda x: jnp.array(x, copy=True), sharded_params)
        # (params, optimizer state) per side
        state: dict[str, tuple[Any, Any]] = {
            "plain": (plain, init1(plain)),
            "sharded": (sharded, init2(sharded)),
        }

        def run(which: str, step) -> None:
            p, o = state[which]
            p, o, loss = step(p, o, batch, 1e-4)
            jax.block_until_ready(loss)
            state[which] = (p, o)

        return _rounds(lambda: run("plain", step1), lambda: run("sharded", step2), args.rounds)

    def eval_section() -> dict[str, Any]:
        from lensllm_jax.parallel.programs import sharded_eval_sums

        b = _batch(rng, bsz, seq, vocab)
        args3 = (b["tokens"], b["loss_mask"], b["attention_mask"])
        plain = jax.jit(finetune.example_nll_fn(m.apply))
        sharded = sharded_eval_sums(finetune.example_nll_fn(m.apply), mesh)
        return _rounds(
            lambda: jax.block_until_ready(plain(m.params, *args3)),
            lambda: jax.block_until_ready(sharded(sharded_params, *args3)),
            args.rounds,
        )

    def ntk_section() -> dict[str, Any]:
        b = _batch(rng, n_ntk, seq, vocab)
        loss = probe_loss_fn(m.apply)
        return _rounds(
            lambda: np.asarray(ntk.loss_gradient_kernel(loss, m.params, b, chunk_size=None)),
            lambda: pntk.loss_gradient_kernel(loss, sharded_params, b, mesh, chunk_size=None),
            args.rounds,
        )

    def hutchinson_section() -> dict[str, Any]:
        b = _batch(rng, n_hess, seq, vocab)
        loss = mean_probe_loss_fn(m.apply)
        key = jax.random.PRNGKey(0)
        return _rounds(
            lambda: float(hessian.hutchinson_trace(loss, m.params, key, args.probes, batch=b).mean),
            lambda: float(
                phessian.hutchinson_trace(
                    loss, sharded_params, key, args.probes, mesh, batch=b
                ).mean
            ),
            args.rounds,
        )

    for key, fn in (
        ("step", step_section),
        ("eval", eval_section),
        ("ntk", ntk_section),
        ("hutchinson", hutchinson_section),
    ):
        val = section(res, key, args.out, fn)
        if val is not None:
            res[key] = val
            dump(res, args.out)
    res["load_average_after"] = os.getloadavg()
    dump(res, args.out)
    import json

    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
