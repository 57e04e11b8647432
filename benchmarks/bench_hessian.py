"""Hutchinson Hessian trace of a GPT-2-shaped causal LM's mean loss: wall time, FLOP/s; JSON.

Target (issue 3): 8 Rademacher probes on 8 sequences x 128 tokens, GPT-2 small, <= 0.10 s on
an H200 (torch forward-over-reverse 1.77 s, naive JAX 0.15 s were measured there). Measures,
each jitted, compile excluded, median of --repeat runs:

- ``hutchinson``: `hessian.hutchinson_trace` (per-leaf traces from the same pass), probes one
  at a time by `lax.map` (memory of one HVP) or --probe-batch at once;
- ``batched_grad``: one gradient of the same loss (an HVP costs about two of these);
- ``torch_jvp_grad``: torch.func jvp(grad) on the same architecture and weights, one probe at a
  time, on the GPU when torch sees one (when torch is installed; --no-torch skips it), and its
  trace vs ours on shared probes.

FLOP floor: num_probes x 2 x the analytic forward+backward FLOPs of the batch (an HVP by
forward-over-reverse carries a tangent through the forward and the backward). Peak memory:
device `memory_stats()` when available, else process max RSS.

JSON: the trace, its standard error and the number of probes (`num_probes`, `stderr`,
`relative_stderr`), per-layer traces, TFLOP/s at the floor and as a fraction of the device's
bf16 peak, peak device memory; a failing section is recorded as {"error": ...}, and --out
rewrites the file after every section.

Usage: python benchmarks/bench_hessian.py --preset gpt2-small --probe-batch 8   # on a GPU
       python benchmarks/bench_hessian.py --preset tiny                          # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    add_rates,
    dump,
    machine,
    peak_memory_bytes,
    section,
    time_jitted,
    torch_device,
    torch_time,
)
from _gpt2 import (
    PRESETS,
    add_config_args,
    build_model,
    gpt2_grad_flops,
    to_torch,
    torch_per_example_loss,
)

from lensllm_jax.core import hessian


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe-batch", type=int, default=None, help="probes vmapped at once")
    ap.add_argument("--no-linearize", action="store_true", help="full jvp(grad) per probe")
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    cfg["n"] = 8  # the Hutchinson batch, unless overridden
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    n, seq = cfg["n"], cfg["seq"]
    pdtype = jnp.bfloat16 if args.param_dtype == "bf16" else jnp.float32
    model = build_model(cfg, args.model, pdtype)
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
            linearize=not args.no_linearize,
        )
        return est

    key = jax.random.key(2)
    mach = machine()
    peak = mach["peak_bf16_tflops_datasheet"]
    out = args.out
    res: dict[str, Any] = {
        "benchmark": "hutchinson_trace",
        "machine": mach,
        "config": {
            **cfg,
            "preset": args.preset,
            "probes": args.probes,
            "probe_batch": args.probe_batch,
            "linearize": not args.no_linearize,
            "param_dtype": args.param_dtype,
        },
        "model": args.model,
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "target_s_h200_gpt2_small": 0.10,
    }
    # FLOP floor: one HVP = a forward + backward carrying a tangent, ≈ 2 gradients
    floor = args.probes * 2 * gpt2_grad_flops(cfg, n, seq)
    res["flop_floor_analytic"] = floor
    dump(res, out)

    def run_hutchinson():
        h = time_jitted(run, params, tokens, key, repeat=args.repeat)
        est = h.pop("_out")
        rep = est.as_dict()  # trace, stderr, relative_stderr, num_probes, per_group
        per_group = rep.pop("per_group")
        h.update(rep)
        h["per_group_sum_minus_total"] = sum(v["trace"] for v in per_group.values()) - rep["trace"]
        h["per_layer_trace"] = per_group
        add_rates(h, floor, peak)
        h["peak_memory_after"] = peak_memory_bytes()
        h["meets_target_0p10_s"] = h["median_s"] <= 0.10
        res["hutchinson"] = h

    section(res, "hutchinson", out, run_hutchinson)

    def run_grad():
        g = time_jitted(
            jax.grad(lambda p, x: per_ex(p, x).mean()), params, tokens, repeat=args.repeat
        )
        g.pop("_out")
        add_rates(g, floor / (2 * args.probes), peak)
        res["batched_grad"] = g
        if "median_s" in res.get("hutchinson", {}):
            res["hutchinson_over_batched_grad"] = res["hutchinson"]["median_s"] / g["median_s"]

    section(res, "batched_grad", out, run_grad)
    res["peak_memory"] = peak_memory_bytes()
    dump(res, out)

    if not args.no_torch:
        section(res, "torch_jvp_grad", out, lambda: run_torch(res, model, cfg, args, key))
    print(json.dumps(res, indent=2, default=str))


def run_torch(res, model, cfg, args, key) -> None:
    try:
        import torch
        from torch.func import grad, jvp
    except ImportError:
        res["torch_jvp_grad"] = "torch not installed"
        return
    dev = torch_device(args.torch_device)
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    params = model["params"]

    def on_dev(tree):
        return {k: v.to(dev) for k, v in to_torch(model["to_builtin"](tree)).items()}

    tparams = on_dev(params)
    tloss = torch_per_example_loss(cfg["heads"])
    ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long, device=dev)
    # the same Rademacher probes as ours (hessian.rademacher on the split keys)
    keys = jax.random.split(key, args.probes)
    probes = [on_dev(hessian.rademacher(k, params)) for k in keys]
    g_fn = grad(lambda p: tloss(p, ttok).mean())

    def torch_trace():
        vals = []
        for z in probes:
            _, hz = jvp(g_fn, (tparams,), (z,))
            vals.append(sum((z[k] * hz[k]).sum() for k in z))
        return float(torch.stack(vals).mean())

    tr = torch_time(torch_trace, max(1, args.repeat // 2), sync)
    tval = tr.pop("_out")
    tr["trace"] = tval
    if "trace" in res.get("hutchinson", {}):
        tr["rel_diff_vs_jax_same_probes"] = abs(tval - res["hutchinson"]["trace"]) / abs(
            res["hutchinson"]["trace"]
        )
    tr["torch"] = torch.__version__
    tr["device"] = dev
    res["torch_jvp_grad"] = tr


if __name__ == "__main__":
    main()
