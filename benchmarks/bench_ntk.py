"""eNTK loss-gradient kernel of a GPT-2-shaped causal LM: wall time, FLOP/s, peak memory; JSON.

Target (issue 3): N = 64 sequences x 128 tokens, GPT-2 small (124M), <= 0.10 s on an H200.
Measures, each jitted, compile excluded (see Timing below):

- ``ntk``: `ntk.loss_gradient_kernel` (block-wise Jacobian contraction, --chunk examples per
  block or "auto" = the memory-budget rule of `ntk.auto_chunk_size`, optional --bf16
  per-example gradients with f32 Gram accumulation, --param-dtype bf16 for bf16 backward passes);
- ``batched_grad``: one gradient of the mean loss over the same N x T batch, the FLOP floor
  of any per-example method (the issue measured 55 ms on an H200);
- ``naive_vmap_grad``: all N per-example gradients at once, then J Jᵀ leaf by leaf (the
  baseline; may run out of memory on GPT-2 small, which is recorded, not fatal);
- ``torch_vmap_grad``: torch.func vmap(grad) + Gram on the same architecture and weights, on
  the GPU when torch sees one (when torch is installed; skipped with --no-torch), plus the max
  relative difference of its kernel from ours (a correctness cross-check). On a CPU it runs
  as its users run it: one thread per core and OMP_WAIT_POLICY=PASSIVE (set by _common).

Timing: every function compiled / warmed up first, then --repeat interleaved rounds (one call
of each per round) and, per function, its time over the kernel's in the same round
(``over_ntk_per_round``; the median of those is the figure to quote on a busy machine).

FLOPs: the analytic forward+backward count of the batch (`gpt2_grad_flops`, the floor of any
per-example method): `tflops_at_floor` = floor / time, `fraction_of_bf16_peak` against the
device's datasheet peak; and XLA's cost analysis (`flops_xla`; it counts a scanned layer's body
once, so it undercounts). Peak memory: the device's `memory_stats()["peak_bytes_in_use"]`
(GPU) read right after each measurement, else the process max RSS.
Every section that fails (e.g. out of memory) is recorded as {"error": ...}; --out rewrites
the JSON file after every section, so a timeout keeps what was measured. --profile adds
``ntk_profile``: the kernel's time per phase (forward / backward / outside the gradient, i.e.
the Gram) and JAX primitive, and its top HLO ops, from a `jax.profiler` trace (run last).

Usage: python benchmarks/bench_ntk.py --preset gpt2-small --chunk 32 --bf16   # on a GPU
       python benchmarks/bench_ntk.py --preset tiny --n 16 --seq 32             # CPU-sized
--model zoo (default when importable): lensllm_jax.models' GPT-2 (scanned layers); --model
builtin: a minimal GPT-2 defined here (pre-LN, tied embeddings, tanh-GELU, learned positions,
stacked and scanned layers). The torch twin is the builtin architecture, loaded with the same
weights in both cases, so its kernel must agree with ours.
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
    profile_breakdown,
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

from lensllm_jax.core import ntk

# ----------------------------------------------------------------------------- model (JAX)


# ----------------------------------------------------------------------------- model (torch)


# ----------------------------------------------------------------------------- timing


def parse_chunk(text: str) -> int | str | None:
    if text in ("auto", "none", "None"):
        return None if text.lower() == "none" else "auto"
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_config_args(ap)
    ap.add_argument(
        "--chunk",
        type=parse_chunk,
        default="auto",
        help="examples per Jacobian block: an int, auto (memory budget, default) or none (all)",
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 per-example grads, f32 Gram")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="per-op time breakdown of the ntk kernel"
    )
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    n, seq = cfg["n"], cfg["seq"]
    pdtype = jnp.bfloat16 if args.param_dtype == "bf16" else jnp.float32
    jdtype = jnp.bfloat16 if args.bf16 else None

    model = build_model(cfg, args.model, pdtype)
    params, tokens, loss = model["params"], model["batch"], model["loss"]
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    per_example = ntk.jacobian_bytes_per_example(params, 1, jdtype)
    budget = ntk.memory_budget()
    chunk = args.chunk
    resolved = ntk.auto_chunk_size(n, per_example, budget) if chunk == "auto" else chunk or n
    mach = machine()
    peak = mach["peak_bf16_tflops_datasheet"]

    kernel_fn = ntk.empirical_ntk_fn(loss, chunk_size=chunk, jacobian_dtype=jdtype)
    res: dict[str, Any] = {
        "benchmark": "entk_loss_gradient_kernel",
        "machine": mach,
        "load_average_start": load_average(),
        "config": {
            **cfg,
            "preset": args.preset,
            "chunk": chunk,
            "chunk_resolved": resolved,
            "bf16_jacobians": args.bf16,
            "param_dtype": args.param_dtype,
        },
        "model": args.model,
        "n_params": n_params,
        "memory_budget_bytes": budget,
        "plan": kernel_fn.plan(params, tokens).as_dict(),  # type: ignore[attr-defined]
        "target_s_h200_gpt2_small": 0.10,
    }
    floor = gpt2_grad_flops(cfg, n, seq)
    res["flop_floor_analytic"] = floor
    out = args.out
    dump(res, out)
    fns: dict[str, Any] = {}
    theta = None

    def run_ntk():
        nonlocal theta
        r = time_jitted(lambda p, x: kernel_fn(p, x), params, tokens, repeat=1)
        theta = np.asarray(r.pop("_out"), dtype=np.float64)
        res["ntk"] = {"compile_s": r["compile_s"], "flops_xla": r["flops_xla"]}
        res["ntk"]["peak_memory_after"] = peak_memory_bytes()
        compiled = jax.jit(lambda p, x: kernel_fn(p, x))
        fns["ntk"] = lambda: jax.block_until_ready(compiled(params, tokens))

    section(res, "ntk", out, run_ntk)

    def run_grad():
        g = jax.jit(jax.grad(lambda p, x: loss(p, x).mean()))
        jax.block_until_ready(g(params, tokens))
        fns["batched_grad"] = lambda: jax.block_until_ready(g(params, tokens))

    section(res, "batched_grad", out, run_grad)

    if not args.no_naive:

        def naive(p, x):
            one = lambda xi: jax.tree.map(lambda a: a[None], xi)  # noqa: E731
            grads = jax.vmap(jax.grad(lambda p, xi: loss(p, one(xi))[0]), (None, 0))(p, x)
            # leaf by leaf (no concatenated copy of all N gradients)
            return sum(
                jnp.dot(a.reshape(n, -1), a.reshape(n, -1).T, preferred_element_type=jnp.float32)
                for a in jax.tree.leaves(grads)
            )

        def run_naive():
            nv = jax.jit(naive)
            theta_naive = np.asarray(nv(params, tokens), dtype=np.float64)
            naive_res: dict[str, Any] = {"peak_memory_after": peak_memory_bytes()}
            res["naive_vmap_grad"] = naive_res
            if theta is not None:
                naive_res["max_rel_diff_vs_ntk"] = float(
                    np.max(np.abs(theta_naive - theta)) / np.max(np.abs(theta))
                )
            fns["naive_vmap_grad"] = lambda: jax.block_until_ready(nv(params, tokens))

        section(res, "naive_vmap_grad", out, run_naive)
    res["peak_memory"] = peak_memory_bytes()
    if not args.no_torch:
        section(res, "torch_vmap_grad", out, lambda: torch_peer(res, fns, model, cfg, args, theta))
    if "ntk" in fns:
        rounds = interleaved(fns, args.repeat, reference="ntk")
        res["rounds"] = rounds
        for name, r in rounds.items():
            res.setdefault(name, {}).update(r)
            add_rates(res[name], floor, peak)
        if "batched_grad" in rounds:
            res["ntk_over_batched_grad"] = 1.0 / rounds["batched_grad"]["over_ntk_median"]
    res["load_average_end"] = load_average()
    dump(res, out)
    if args.profile:  # last: a profiler that fails or hangs cannot cost the timings above

        def run_profile():
            res["ntk_profile"] = profile_breakdown(
                lambda p, x: kernel_fn(p, x), params, tokens, repeat=3
            )

        section(res, "ntk_profile", out, run_profile)
    print(json.dumps(res, indent=2, default=str))


def torch_peer(res, fns, model, cfg, args, theta) -> None:
    """torch.func `vmap(grad)` over the N examples + Gram, on the same architecture and weights,
    as its users run it (passive OpenMP waiting, one thread per core)."""
    try:
        import torch
        from torch.func import grad, vmap
    except ImportError:
        res["torch_vmap_grad"] = "torch not installed"
        return
    n = cfg["n"]
    dev = torch_device(args.torch_device)
    setup = torch_setup() if dev == "cpu" else {"torch": torch.__version__}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    tparams = {k: v.to(dev) for k, v in to_torch(model["to_builtin"](model["params"])).items()}
    tloss = torch_per_example_loss(cfg["heads"])
    ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long, device=dev)
    per_ex = vmap(grad(tloss), in_dims=(None, 0))

    def torch_kernel():
        with torch.no_grad():
            gs = per_ex(tparams, ttok)
            # reduce, not sum(): the same additions, typed as a tensor (sum starts from int 0)
            out = functools.reduce(
                operator.add, (v.reshape(n, -1) @ v.reshape(n, -1).T for v in gs.values())
            )
        sync()
        return out

    tk = torch_kernel().detach().cpu().double().numpy()  # warm-up and the cross-check
    tr: dict[str, Any] = {**setup, "device": dev}
    if theta is not None:
        tr["max_rel_diff_vs_ntk"] = float(np.max(np.abs(tk - theta)) / np.max(np.abs(theta)))
    if dev == "cuda":
        tr["torch_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    res["torch_vmap_grad"] = tr
    fns["torch_vmap_grad"] = torch_kernel


if __name__ == "__main__":
    main()
