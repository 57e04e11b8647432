"""What an exact eNTK computed under `jit` holds: XLA's own memory accounting of the compiled
kernel program, in chunks of per-example gradients; JSON.

The memory plan (`core._ntk_memory`, `ntk_plan`) counts two chunks of c per-example
Jacobians alive at once, plus one chunk's activations. A kernel called under `jit` is one
XLA program, whose temporaries (`compiled.memory_analysis().temp_size_in_bytes`; no run,
no timing) show what the schedule really holds. Measured for a scanned Llama (30 layers,
so the layers run in a `lax.scan`) and N examples in blocks of c (nb = N / c blocks):

- ``loss_kernel``: a scalar per example (the kernel of `lensllm run`), in units of one
  chunk of per-example gradients (c · P · itemsize). Also the same in a program of one
  chunk's gradients alone (``one_chunk_of_gradients``): what one block costs by itself
  (its gradients, the output, and its backward pass's temporaries);
- ``four_outputs``: 4 outputs per example (A·C = 4), in units of c · 4 · P · itemsize.

Usage: python benchmarks/bench_ntk_jit_memory.py [--layers 30] [--n 12] [--out F]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import numpy as np
from _common import dump, load_average, machine

from lensllm_jax import models
from lensllm_jax.core import _ntk_layout, ntk
from lensllm_jax.models.lm_probe import probe_loss_fn


def _temp_bytes(fn, *args) -> int:
    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    if ma is None:
        raise RuntimeError("this backend reports no XLA memory analysis (temporaries)")
    return int(ma.temp_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--n", type=int, default=12, help="examples (N)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 2 * args.seq}  # fmt: skip
    m = models.from_config(cfg, 0)
    p = sum(int(a.size) for a in jax.tree.leaves(m.params))
    rng = np.random.default_rng(0)
    n, t = args.n, args.seq
    batch = {
        "tokens": rng.integers(0, 64, (n, t)).astype(np.int32),
        "loss_mask": np.ones((n, t), np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "nats_per_byte": np.full(n, 0.25, np.float32),
    }
    loss = probe_loss_fn(m.apply)

    def four(params: Any, x: Any) -> jax.Array:
        return jax.nn.log_softmax(m.apply(params, x["tokens"]))[:, :4, 0]

    res: dict[str, Any] = {
        "machine": machine(),
        "load": load_average(),
        "model": {"layers": args.layers, "params": p, "n": n, "seq": t},
        "loss_kernel": {},
        "four_outputs": {},
    }
    chunks = [c for c in (n, n // 2, n // 3, n // 4, n // 6) if c >= 1 and n % c == 0]
    for c in chunks:
        unit = c * p * 4
        grads_fn, _ = _ntk_layout.per_example_grads(
            loss, m.params, jax.tree.map(lambda a, c=c: a[:c], batch)
        )
        kfn = ntk.empirical_ntk_fn(loss, implementation="jacobian_contraction", chunk_size=c)
        vfn = ntk.empirical_ntk_fn(
            four, trace_axes=(1,), implementation="jacobian_contraction", chunk_size=c
        )
        res["loss_kernel"][f"nb={n // c}"] = {
            "chunk": c,
            "temp_over_chunk": round(_temp_bytes(kfn, m.params, batch) / unit, 3),
            "one_chunk_of_gradients": round(
                _temp_bytes(grads_fn, m.params, jax.tree.map(lambda a, c=c: a[:c], batch)) / unit
                + 1.0,  # + its output, one chunk
                3,
            ),
        }
        res["four_outputs"][f"nb={n // c}"] = {
            "chunk": c,
            "temp_over_chunk": round(_temp_bytes(vfn, m.params, batch) / (4 * unit), 3),
        }
    dump(res, args.out)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
