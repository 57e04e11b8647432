"""Hutchinson Hessian trace of a GPT-2-shaped causal LM's mean loss: wall time, FLOP/s; JSON.

Target (issue 3): 8 Rademacher probes on 8 sequences x 128 tokens, GPT-2 small, <= 0.10 s on
an H200 (torch forward-over-reverse 1.77 s, naive JAX 0.15 s were measured there). Measures,
each jitted, compile excluded, median of --repeat runs:

- ``hutchinson``: `hessian.hutchinson_trace` (per-leaf traces from the same pass), probes one
  at a time by `lax.map` (memory of one HVP) or --probe-batch at once;
- ``batched_grad``: one gradient of the same loss (an HVP costs about two of these);
- torch peers on the same architecture, weights and probes (when torch is installed;
  --no-torch skips them), on the GPU when torch sees one, else as their users run them on a
  CPU (one thread per core, OMP_WAIT_POLICY=PASSIVE): ``torch_vmap_probes`` (torch.func vmap
  of jvp(grad) over the probes), ``torch_double_backward`` (PyHessian style: the gradient's
  graph built once, one autograd.grad per probe) and ``torch_jvp_grad_loop`` (jvp(grad) one
  probe at a time); each with its trace vs ours.

Timing: every function compiled / warmed up first, then --repeat interleaved rounds (one call
of each per round); per function its time over ours in the same round (``over_hutchinson_*``).

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
import functools
import json
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    add_rates,
    dump,
    interleaved,
    load_average,
    machine,
    peak_memory_bytes,
    section,
    time_jitted,
    torch_device,
    torch_setup,
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
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe-batch", type=int, default=None, help="probes vmapped at once")
    ap.add_argument("--linearize", action="store_true", help="linearize the gradient once")
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
            linearize=args.linearize,
        )
        return est

    key = jax.random.key(2)
    mach = machine()
    peak = mach["peak_bf16_tflops_datasheet"]
    out = args.out
    res: dict[str, Any] = {
        "benchmark": "hutchinson_trace",
        "machine": mach,
        "load_average_start": load_average(),
        "config": {
            **cfg,
            "preset": args.preset,
            "probes": args.probes,
            "probe_batch": args.probe_batch,
            "linearize": args.linearize,
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

    fns: dict[str, Any] = {}

    def run_hutchinson():
        h = time_jitted(run, params, tokens, key, repeat=1)
        est = h.pop("_out")
        rep = est.as_dict()  # trace, stderr, relative_stderr, num_probes, per_group
        per_group = rep.pop("per_group")
        res["hutchinson"] = {"compile_s": h["compile_s"], "flops_xla": h["flops_xla"], **rep}
        res["hutchinson"]["per_group_sum_minus_total"] = (
            sum(v["trace"] for v in per_group.values()) - rep["trace"]
        )
        res["hutchinson"]["per_layer_trace"] = per_group
        res["hutchinson"]["peak_memory_after"] = peak_memory_bytes()
        compiled = jax.jit(run)
        fns["hutchinson"] = lambda: jax.block_until_ready(compiled(params, tokens, key))

    section(res, "hutchinson", out, run_hutchinson)

    def run_grad():
        g = jax.jit(jax.grad(lambda p, x: per_ex(p, x).mean()))
        jax.block_until_ready(g(params, tokens))
        fns["batched_grad"] = lambda: jax.block_until_ready(g(params, tokens))

    section(res, "batched_grad", out, run_grad)
    res["peak_memory"] = peak_memory_bytes()
    dump(res, out)

    if not args.no_torch:
        section(res, "torch", out, lambda: torch_peers(res, fns, model, cfg, args, key))
    if "hutchinson" in fns:
        rounds = interleaved(fns, args.repeat, reference="hutchinson")
        res["rounds"] = rounds
        for name, r in rounds.items():
            res.setdefault(name, {}).update(r)
            fl = floor if name != "batched_grad" else floor / (2 * args.probes)
            add_rates(res[name], fl, peak)
            if name == "hutchinson":
                res[name]["meets_target_0p10_s"] = r["median_s"] <= 0.10
        if "batched_grad" in rounds:
            res["hutchinson_over_batched_grad"] = (
                1.0 / rounds["batched_grad"]["over_hutchinson_median"]
            )
    res["load_average_end"] = load_average()
    dump(res, out)
    print(json.dumps(res, indent=2, default=str))


def torch_peers(res, fns, model, cfg, args, key) -> None:
    """Three torch Hutchinson estimators on the same weights and probes (ours, transferred):
    torch.func vmap over the probes of jvp(grad) (forward-over-reverse, all probes at once),
    a PyHessian-style double backward (grad with create_graph once, then one
    autograd.grad(g, params, z) per probe reusing that graph), and jvp(grad) one probe at a
    time. Run as their users run them on a CPU: one thread per core, passive OpenMP waiting."""
    try:
        import torch
        from torch.func import grad, jvp, vmap
    except ImportError:
        res["torch"] = "torch not installed"
        return
    dev = torch_device(args.torch_device)
    setup = torch_setup() if dev == "cpu" else {"torch": torch.__version__}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    params = model["params"]

    def on_dev(tree):
        return {k: v.to(dev) for k, v in to_torch(model["to_builtin"](tree)).items()}

    tparams = on_dev(params)
    tloss = torch_per_example_loss(cfg["heads"])
    ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long, device=dev)
    keys = jax.random.split(key, args.probes)  # the probes hutchinson_trace draws
    probes = [on_dev(hessian.rademacher(k, params)) for k in keys]
    stacked = {k: torch.stack([z[k] for z in probes]) for k in probes[0]}
    g_fn = grad(lambda p: tloss(p, ttok).mean())

    def hvp(z):
        return jvp(g_fn, (tparams,), (z,))[1]

    def vmap_probes():
        hz = vmap(hvp)(stacked)
        # reduce, not sum(): the same additions, typed as a tensor (sum starts from int 0)
        out = functools.reduce(operator.add, ((stacked[k] * hz[k]).flatten(1).sum(1) for k in hz))
        out = out.mean()
        sync()
        return float(out)

    def loop_probes():
        vals = [
            functools.reduce(operator.add, ((z[k] * hz[k]).sum() for k in z))
            for z in probes
            for hz in [hvp(z)]
        ]
        sync()
        return float(torch.stack(vals).mean())

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tparams.items()}
    names = list(leaves)

    def double_backward():
        loss = tloss(leaves, ttok).mean()
        gs = torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=True)
        vals = []
        for z in probes:
            hz = torch.autograd.grad(gs, [leaves[k] for k in names], [z[k] for k in names],
                                     retain_graph=True)  # fmt: skip
            vals.append(sum((z[k] * h).sum() for k, h in zip(names, hz, strict=True)))
        sync()
        return float(torch.stack(vals).mean().detach())

    ours = res.get("hutchinson", {}).get("trace")
    out: dict[str, Any] = {**setup, "device": dev}
    for name, fn in (("torch_vmap_probes", vmap_probes), ("torch_double_backward",
                     double_backward), ("torch_jvp_grad_loop", loop_probes)):  # fmt: skip
        try:
            tval = fn()  # warm-up, and the value on the same probes
        except Exception as err:  # e.g. out of memory for the vmap over all probes
            out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
        out[name] = {"trace": tval}
        if ours is not None:
            out[name]["rel_diff_vs_jax_same_probes"] = abs(tval - ours) / abs(ours)
        fns[name] = fn
    res["torch"] = out


if __name__ == "__main__":
    main()
