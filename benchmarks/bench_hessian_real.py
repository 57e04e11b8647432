"""Memory of the Hessian estimators on a real pretrained LM (SmolLM2-135M-Instruct, Q4_1 GGUF,
f32 after dequantisation): the peak RSS of each, alone in a fresh process, against one
Hessian-vector product on the same batch (the footprint a trace should stay near); JSON.

Modes (each a child process: load the model, compile, run once, report its peak RSS):
  grad                 one gradient of the mean probe loss (for scale);
  hvp                  one HVP, forward-over-reverse (`hessian.hvp`): the reference footprint;
  hutchinson           `hutchinson_trace`, --probes Rademacher probes, defaults (probes one
                       after another, the gradient recomputed per probe);
  hutchinson_linearize the same with linearize=True (the former default: `jax.linearize` of
                       the gradient, its residuals alive across the probes);
  hutchinson_chunked   the same over micro-batches of --chunk examples (`example_chunk`);
  distance             vᵀHv (`hessian_distance`, blocks=False, as lensllm run calls it);
  hutchpp              `hutchpp_trace` with 3 x --probes HVPs (it keeps --probes sketch
                       vectors and their orthonormal basis: parameter-sized each, by design);
  top_eigenvalue       `top_eigenvalue`, 10 power iterations.
Peak RSS is the child's own VmHWM (not `ru_maxrss`, which carries the parent's peak).
The batch: --n examples of --seq random tokens (the cost does not depend on them).

Usage: nice -n 10 python benchmarks/bench_hessian_real.py --out hessian_real.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

MODES = ("grad", "hvp", "hutchinson", "hutchinson_linearize", "hutchinson_chunked", "distance",
         "hutchpp", "top_eigenvalue")  # fmt: skip


def child(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from _common import status_gib
    from bench_ntk_real import probe, smollm2_path

    from lensllm_jax import models
    from lensllm_jax.core import hessian
    from lensllm_jax.models.lm_probe import mean_probe_loss_fn

    def rss() -> float:  # this process's own peak (VmHWM), GiB
        return status_gib("VmHWM") or float("nan")

    m = models.load(str(smollm2_path()))
    after_load = rss()
    batch = probe(args.n, args.seq, m.config.vocab_size)
    f = mean_probe_loss_fn(m.apply)
    key = jax.random.PRNGKey(0)
    mode = args.child
    out: dict[str, Any] = {"mode": mode}
    t0 = time.perf_counter()
    if mode == "grad":
        jax.block_until_ready(jax.jit(jax.grad(f))(m.params, batch))
    elif mode == "hvp":
        hv = jax.jit(lambda p, b, v: hessian.hvp(lambda q: f(q, b), p, v))
        jax.block_until_ready(hv(m.params, batch, hessian.rademacher(key, m.params)))
    elif mode == "distance":
        moved = jax.tree.map(lambda x: x * 1.001, m.params)
        d = hessian.hessian_distance(f, m.params, moved, batch=batch, blocks=False)
        out["vthv"] = float(d.total)
    elif mode == "hutchpp":
        est = hessian.hutchpp_trace(f, m.params, key, 3 * args.probes, batch=batch)
        out.update(trace=float(est.mean), stderr=float(est.stderr))
    elif mode == "top_eigenvalue":
        eig = hessian.top_eigenvalue(f, m.params, key, 10, batch=batch)
        out.update(eigenvalue=float(eig.eigenvalue))
    else:
        est = hessian.hutchinson_trace(
            f, m.params, key, args.probes, group_by="top", batch=batch,
            linearize=mode == "hutchinson_linearize",
            example_chunk=args.chunk if mode == "hutchinson_chunked" else None,
        )  # fmt: skip
        out.update(trace=float(est.mean), stderr=float(est.stderr))
    out["seconds_incl_compile"] = round(time.perf_counter() - t0, 2)
    out["rss_after_load_gib"] = round(after_load, 3)
    out["peak_rss_gib"] = round(rss(), 3)
    out["peak_above_load_gib"] = round(rss() - after_load, 3)
    print(json.dumps(out))
    del np


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1, help="examples per micro-batch (chunked)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from _common import dump, load_average, machine

    res: dict[str, Any] = {
        "benchmark": "hessian_memory_real_model",
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (f32 after dequantisation)",
        "machine": machine(),
        "load_average_start": load_average(),
        "batch": {"n": args.n, "seq": args.seq},
        "probes": args.probes,
        "chunk": args.chunk,
        "modes": {},
    }
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--n", str(args.n), "--seq",
               str(args.seq), "--probes", str(args.probes), "--chunk", str(args.chunk)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        ok = proc.returncode == 0 and lines
        res["modes"][mode] = json.loads(lines[-1]) if ok else {"error": proc.stderr[-600:]}
        dump(res, args.out)
    hvp = res["modes"].get("hvp", {}).get("peak_rss_gib")
    if hvp:
        res["peak_over_one_hvp"] = {
            k: round(v["peak_rss_gib"] / hvp, 3)
            for k, v in res["modes"].items()
            if "peak_rss_gib" in v
        }
    res["load_average_end"] = load_average()
    dump(res, args.out)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
