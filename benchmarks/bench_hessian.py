"""Hutchinson Hessian trace of a GPT-2-shaped causal LM's mean loss: wall time, FLOP/s; JSON.

Target (issue 3): 8 Rademacher probes on 8 sequences x 128 tokens, GPT-2 small, <= 0.10 s on
an H200 (torch forward-over-reverse 1.77 s, naive JAX 0.15 s were measured there). Measures,
each jitted, compile excluded, median of --repeat runs:

- ``hutchinson``: `hessian.hutchinson_trace` (per-leaf traces from the same pass), probes one
  at a time by `lax.map` (memory of one HVP) or --probe-batch at once;
- ``batched_grad``: one gradient of the same loss (an HVP costs about two of these);
- ``torch_jvp_grad``: torch.func jvp(grad) on the same architecture and weights, one probe at a
  time (when torch is installed; --no-torch skips it), and its trace vs ours on shared probes.

FLOP floor: num_probes x 2 x the analytic forward+backward FLOPs of the batch (an HVP by
forward-over-reverse carries a tangent through the forward and the backward). Peak memory:
device `memory_stats()` when available, else process max RSS.

Usage: python benchmarks/bench_hessian.py --preset gpt2-small --n 8 --probes 8
       python benchmarks/bench_hessian.py --preset tiny            # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_ntk import (
    PRESETS,
    build_model,
    default_model,
    gpt2_grad_flops,
    machine,
    peak_memory_bytes,
    time_jitted,
    to_torch,
    torch_per_example_loss,
    torch_time,
)

from lensllm_jax import hessian


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe-batch", type=int, default=None, help="probes vmapped at once")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--model", choices=["zoo", "builtin"], default=default_model())
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    cfg["n"] = 8  # the Hutchinson batch, unless overridden
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    n, seq = cfg["n"], cfg["seq"]
    model = build_model(cfg, args.model)
    params, tokens, per_ex = model["params"], model["batch"], model["loss"]

    def run(p, x, key):
        est = hessian.hutchinson_trace(
            lambda q: per_ex(q, x).mean(),
            p,
            key,
            args.probes,
            group_by="top",
            stacked="layers" if args.model == "zoo" else "h",  # per-layer traces
            batch_size=args.probe_batch,
        )
        return est.mean, est.stderr, est.per_group

    key = jax.random.key(2)
    res: dict[str, Any] = {
        "benchmark": "hutchinson_trace",
        "machine": machine(),
        "config": {**cfg, "preset": args.preset, "probes": args.probes},
        "model": args.model,
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "target_s_h200_gpt2_small": 0.10,
    }
    h = time_jitted(run, params, tokens, key, repeat=args.repeat)
    mean, se, per_group = h.pop("_out")
    h["trace"], h["stderr"] = float(mean), float(se)
    h["per_group_sum_minus_total"] = float(sum(per_group.values()) - mean)
    h["per_layer_trace"] = {g: float(v) for g, v in per_group.items()}
    res["hutchinson"] = h
    g = time_jitted(jax.grad(lambda p, x: per_ex(p, x).mean()), params, tokens, repeat=args.repeat)
    g.pop("_out")
    res["batched_grad"] = g
    floor = args.probes * 2 * gpt2_grad_flops(cfg, n, seq)
    res["flop_floor_analytic"] = floor
    res["hutchinson_tflops_at_floor"] = floor / h["median_s"] / 1e12
    res["hutchinson_over_batched_grad"] = h["median_s"] / g["median_s"]
    res["peak_memory"] = peak_memory_bytes()

    if not args.no_torch:
        try:
            import torch
            from torch.func import grad, jvp
        except ImportError:
            res["torch_jvp_grad"] = "torch not installed"
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            tparams = to_torch(model["to_builtin"](params))
            tloss = torch_per_example_loss(cfg["heads"])
            ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long)
            # the same Rademacher probes as ours (hessian.rademacher on the split keys)
            keys = jax.random.split(key, args.probes)
            probes = [to_torch(model["to_builtin"](hessian.rademacher(k, params))) for k in keys]
            g_fn = grad(lambda p: tloss(p, ttok).mean())

            def torch_trace():
                vals = []
                for z in probes:
                    _, hz = jvp(g_fn, (tparams,), (z,))
                    vals.append(sum(float((z[k] * hz[k]).sum()) for k in z))
                return float(np.mean(vals))

            tr = torch_time(torch_trace, max(1, args.repeat // 2))
            tval = tr.pop("_out")
            tr["trace"] = tval
            tr["rel_diff_vs_jax_same_probes"] = abs(tval - h["trace"]) / abs(h["trace"])
            tr["torch"] = torch.__version__
            res["torch_jvp_grad"] = tr
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
