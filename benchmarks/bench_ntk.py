"""eNTK loss-gradient kernel of a GPT-2-shaped causal LM: wall time, FLOP/s, peak memory; JSON.

Target (issue 3): N = 64 sequences x 128 tokens, GPT-2 small (124M), <= 0.10 s on an H200.
Measures, each jitted, compile excluded, median (and min / max) of --repeat runs:

- ``ntk``: `ntk.loss_gradient_kernel` (block-wise Jacobian contraction, --chunk examples per
  block or "auto" = the memory-budget rule of `ntk.auto_chunk_size`, optional --bf16
  per-example gradients with f32 Gram accumulation, --param-dtype bf16 for bf16 backward passes);
- ``batched_grad``: one gradient of the mean loss over the same N x T batch, the FLOP floor
  of any per-example method (the issue measured 55 ms on an H200);
- ``naive_vmap_grad``: all N per-example gradients at once, then J Jᵀ leaf by leaf (the
  baseline; may run out of memory on GPT-2 small, which is recorded, not fatal);
- ``torch_vmap_grad``: torch.func vmap(grad) + Gram on the same architecture and weights, on
  the GPU when torch sees one (when torch is installed; skipped with --no-torch), plus the max
  relative difference of its kernel from ours (a correctness cross-check).

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
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lensllm_jax.core import ntk

PRESETS = {
    "gpt2-small": dict(vocab=50257, d=768, layers=12, heads=12, n=64, seq=128, positions=1024),
    "small-cpu": dict(vocab=4096, d=256, layers=4, heads=4, n=16, seq=64),
    "tiny": dict(vocab=512, d=64, layers=2, heads=4, n=16, seq=32),
}


# ----------------------------------------------------------------------------- model (JAX)


def init_gpt2(key, vocab, d, layers, heads, seq, dtype=jnp.float32) -> dict[str, Any]:
    ks = jax.random.split(key, 6)
    s = 0.02

    def n(k, shape, scale=s):
        return (scale * jax.random.normal(k, shape)).astype(dtype)

    return {
        "wte": n(ks[0], (vocab, d)),
        "wpe": n(ks[1], (seq, d), 0.01),
        "h": {
            "ln1_g": jnp.ones((layers, d), dtype),
            "ln1_b": jnp.zeros((layers, d), dtype),
            "attn_w": n(ks[2], (layers, d, 3 * d)),
            "attn_b": jnp.zeros((layers, 3 * d), dtype),
            "proj_w": n(ks[3], (layers, d, d), s / np.sqrt(2 * layers)),
            "proj_b": jnp.zeros((layers, d), dtype),
            "ln2_g": jnp.ones((layers, d), dtype),
            "ln2_b": jnp.zeros((layers, d), dtype),
            "fc_w": n(ks[4], (layers, d, 4 * d)),
            "fc_b": jnp.zeros((layers, 4 * d), dtype),
            "mlp_w": n(ks[5], (layers, 4 * d, d), s / np.sqrt(2 * layers)),
            "mlp_b": jnp.zeros((layers, d), dtype),
        },
        "lnf_g": jnp.ones((d,), dtype),
        "lnf_b": jnp.zeros((d,), dtype),
    }


def _ln(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def make_apply(heads: int):
    def apply(params, tokens):
        nb, t = tokens.shape
        x = params["wte"][tokens] + params["wpe"][:t]
        mask = jnp.tril(jnp.ones((t, t), bool))

        def block(x, p):
            d = x.shape[-1]
            hd = d // heads
            qkv = _ln(x, p["ln1_g"], p["ln1_b"]) @ p["attn_w"] + p["attn_b"]
            q, k, v = (z.reshape(nb, t, heads, hd) for z in jnp.split(qkv, 3, axis=-1))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
            att = jax.nn.softmax(jnp.where(mask, att, jnp.finfo(att.dtype).min), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(nb, t, d)
            x = x + o @ p["proj_w"] + p["proj_b"]
            h = jax.nn.gelu(_ln(x, p["ln2_g"], p["ln2_b"]) @ p["fc_w"] + p["fc_b"])
            return x + h @ p["mlp_w"] + p["mlp_b"], None

        x, _ = jax.lax.scan(block, x, params["h"])
        return _ln(x, params["lnf_g"], params["lnf_b"]) @ params["wte"].T

    return apply


def make_per_example_loss(heads: int):
    logprobs = ntk.causal_lm_token_logprobs(make_apply(heads))

    def per_example_loss(params, tokens):
        return -logprobs(params, tokens).mean(axis=-1)

    return per_example_loss


# ----------------------------------------------------------------------------- model (torch)


def torch_per_example_loss(heads: int):
    import torch
    import torch.nn.functional as F

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), g, b, 1e-5)

    def loss(params, tokens):  # tokens (..., T); mean NLL over positions, shape (...)
        t = tokens.shape[-1]
        x = params["wte"][tokens] + params["wpe"][:t]
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=tokens.device))
        nl = params["h.attn_w"].shape[0]
        for i in range(nl):
            d = x.shape[-1]
            hd = d // heads
            qkv = ln(x, params["h.ln1_g"][i], params["h.ln1_b"][i]) @ params["h.attn_w"][i]
            qkv = qkv + params["h.attn_b"][i]
            q, k, v = (z.reshape(*z.shape[:-1], heads, hd) for z in qkv.split(d, dim=-1))
            att = torch.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(hd)
            att = torch.softmax(att.masked_fill(~mask, torch.finfo(att.dtype).min), dim=-1)
            o = torch.einsum("...hqk,...khd->...qhd", att, v).reshape(x.shape)
            x = x + o @ params["h.proj_w"][i] + params["h.proj_b"][i]
            h = ln(x, params["h.ln2_g"][i], params["h.ln2_b"][i]) @ params["h.fc_w"][i]
            h = F.gelu(h + params["h.fc_b"][i], approximate="tanh")
            x = x + h @ params["h.mlp_w"][i] + params["h.mlp_b"][i]
        logits = ln(x, params["lnf_g"], params["lnf_b"]) @ params["wte"].T
        logp = torch.log_softmax(logits[..., :-1, :], dim=-1)
        return -logp.gather(-1, tokens[..., 1:, None])[..., 0].mean(-1)

    return loss


def zoo_to_builtin(p: dict[str, Any]) -> dict[str, Any]:
    """lensllm_jax.models' GPT-2 params (or any tree of that shape) in the builtin layout."""
    lay = p["layers"]
    return {
        "wte": p["wte"]["embedding"],
        "wpe": p["wpe"]["embedding"],
        "h": {
            "ln1_g": lay["ln_1"]["scale"],
            "ln1_b": lay["ln_1"]["bias"],
            "attn_w": lay["c_attn"]["kernel"],
            "attn_b": lay["c_attn"]["bias"],
            "proj_w": lay["attn_proj"]["kernel"],
            "proj_b": lay["attn_proj"]["bias"],
            "ln2_g": lay["ln_2"]["scale"],
            "ln2_b": lay["ln_2"]["bias"],
            "fc_w": lay["c_fc"]["kernel"],
            "fc_b": lay["c_fc"]["bias"],
            "mlp_w": lay["mlp_proj"]["kernel"],
            "mlp_b": lay["mlp_proj"]["bias"],
        },
        "lnf_g": p["ln_f"]["scale"],
        "lnf_b": p["ln_f"]["bias"],
    }


def build_model(cfg: dict[str, int], which: str, dtype: Any = jnp.float32) -> dict[str, Any]:
    """params, batch, per_example_loss(params, batch) -> (N,), and `to_builtin` (a params-shaped
    tree in the builtin layout, for the torch twin). which="zoo": lensllm_jax.models' GPT-2.
    dtype: the parameters' dtype (bf16 makes every forward / backward matmul bf16)."""
    n, seq, vocab = cfg["n"], cfg["seq"], cfg["vocab"]
    tokens = jax.random.randint(jax.random.key(1), (n, seq), 0, vocab)
    if which == "zoo":
        from lensllm_jax import models

        hf = {
            "model_type": "gpt2",
            "n_embd": cfg["d"],
            "n_layer": cfg["layers"],
            "n_head": cfg["heads"],
            "vocab_size": vocab,
            "n_positions": max(seq, cfg.get("positions", seq)),
        }
        m = models.from_config(hf, 0, dtype=dtype)
        return {
            "params": m.params,
            "batch": {"tokens": tokens, "loss_mask": jnp.ones_like(tokens)},
            "loss": lambda p, b: models.per_example_loss(m.apply, p, b),
            "to_builtin": zoo_to_builtin,
            "tokens": tokens,
        }
    pos = max(seq, cfg.get("positions", seq))
    params = init_gpt2(jax.random.key(0), vocab, cfg["d"], cfg["layers"], cfg["heads"], pos, dtype)
    return {
        "params": params,
        "batch": tokens,
        "loss": make_per_example_loss(cfg["heads"]),
        "to_builtin": lambda p: p,
        "tokens": tokens,
    }


def to_torch(params):
    import torch

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        flat[name] = torch.tensor(np.asarray(leaf, dtype=np.float32))
    return flat


# ----------------------------------------------------------------------------- timing


def gpt2_grad_flops(cfg: dict[str, int], n: int, seq: int) -> float:
    """Analytic FLOPs of one forward + backward over n x seq tokens (backward = 2x forward):
    matmul weights (12 d² per layer + the tied V x d head) and causal-unmasked attention
    (4 T d per token per layer). XLA's cost analysis counts a scanned layer once, so this is
    the floor used for FLOP/s."""
    d, nl, v = cfg["d"], cfg["layers"], cfg["vocab"]
    fwd_per_token = 2 * (nl * 12 * d * d + v * d) + nl * 4 * seq * d
    return 3.0 * fwd_per_token * n * seq


def default_model() -> str:
    """The model zoo's GPT-2 when it imports (its layers need flax, and flax needs rich), else
    the builtin twin (plain JAX)."""
    try:
        import flax.linen  # noqa: F401

        from lensllm_jax import models  # noqa: F401
    except ImportError:
        return "builtin"
    return "zoo"


# Dense bf16 tensor-core peak by device kind (vendor datasheets; KINDS.md measured 769-798
# TFLOP/s on an 8192^3 bf16 matmul on an H200), for "fraction of peak" in the JSON.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    return {
        "platform": dev.platform,
        "device": kind,
        "device_count": jax.device_count(),
        "peak_bf16_tflops_datasheet": peak,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "host": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", ""),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }


def peak_memory_bytes() -> dict[str, Any]:
    """Peak device memory so far (`memory_stats()["peak_bytes_in_use"]` on GPU / TPU; the
    process's max RSS on CPU). Both are high-water marks of the whole process: read it right
    after the measurement it belongs to."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {
            "kind": "device_peak_bytes_in_use",
            "bytes": int(stats["peak_bytes_in_use"]),
            "gib": round(int(stats["peak_bytes_in_use"]) / 2**30, 3),
            "bytes_limit": int(stats.get("bytes_limit", 0)),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": "process_max_rss", "bytes": rss, "gib": round(rss / 2**30, 3)}


def time_jitted(fn, *args, repeat: int) -> dict[str, Any]:
    """Compile, then the median wall time of `repeat` calls (block_until_ready)."""
    jfn = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jfn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    except Exception:  # not every backend / version provides it
        flops = float("nan")
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "repeat": repeat,
        "compile_s": compile_s,
        "flops_xla": flops,
        "_out": out,
    }


def add_rates(r: dict[str, Any], floor_flops: float, peak_tflops: float | None) -> None:
    """Achieved TFLOP/s at the analytic floor (floor / time) and as a fraction of the device's
    bf16 peak; XLA's own count (it counts a scanned layer body once) when it has one."""
    r["tflops_at_floor"] = floor_flops / r["median_s"] / 1e12
    r["fraction_of_bf16_peak"] = r["tflops_at_floor"] / peak_tflops if peak_tflops else None
    r["tflops_xla_count"] = r["flops_xla"] / r["median_s"] / 1e12


def _norm_op(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def profile_breakdown(fn, *args, repeat: int = 3, top: int = 15) -> dict[str, Any]:
    """Where the time of one compiled call goes: `jax.profiler` trace of `repeat` calls (after a
    warm-up), each traced event matched to the compiled HLO instruction of the same name (or
    its `hlo_op` argument: XLA GPU's kernels and library calls carry one) and grouped by phase
    (forward / backward = transpose(jvp) / outside the gradient, e.g. the Gram contraction)
    and JAX primitive. Per traced process (host CPU, each GPU stream group), ms per call."""
    import glob
    import gzip
    import re
    import tempfile
    from collections import Counter

    jfn = jax.jit(fn)
    hlo = jfn.lower(*args).compile().as_text()
    meta: dict[str, tuple[str, str]] = {}
    for line in hlo.splitlines():
        mm = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if mm:
            on = re.search(r'op_name="([^"]*)"', line)
            meta[_norm_op(mm.group(1))] = (mm.group(2), on.group(1) if on else "")
    jax.block_until_ready(jfn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeat):
                jax.block_until_ready(jfn(*args))
        files = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        trace = json.load(gzip.open(files[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pname = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    out: dict[str, Any] = {}
    by_proc: dict[str, tuple[Counter, Counter, Counter]] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args_ = e.get("args") or {}
        key = _norm_op(str(args_.get("hlo_op") or e["name"]))
        proc = pname.get(e.get("pid"), str(e.get("pid")))
        cats, ops, unmatched = by_proc.setdefault(proc, (Counter(), Counter(), Counter()))
        ms = e["dur"] / 1000 / repeat
        if key not in meta:
            if not e["name"].startswith(("$", "Thunk", "Slinky")):
                unmatched[e["name"][:60]] += ms
            continue
        shape, op_name = meta[key]
        phase = (
            "backward"
            if "transpose(jvp" in op_name
            else "forward"
            if "jvp(" in op_name
            else "outside-grad"
        )
        prim = op_name.rsplit("/", 1)[-1] or "?"
        cats[f"{phase}:{prim}"] += ms
        ops[f"{key} {shape} {op_name[-60:]}"] += ms
    for proc, (cats, ops, unmatched) in by_proc.items():
        if not cats and not unmatched:
            continue
        out[proc] = {
            "matched_ms_per_call": round(sum(cats.values()), 3),
            "by_phase_and_primitive_ms": {k: round(v, 3) for k, v in cats.most_common(top)},
            "top_ops_ms": {k: round(v, 3) for k, v in ops.most_common(top)},
            "top_unmatched_ms": {k: round(v, 3) for k, v in unmatched.most_common(8)},
        }
    return out


def torch_time(fn, repeat: int, sync=lambda: None) -> dict[str, Any]:
    out = fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "_out": out}


def torch_device(choice: str) -> str:
    """ "auto": cuda when torch sees a GPU, else cpu."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared with bench_hessian.py."""
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for k in ("vocab", "d", "layers", "heads", "n", "seq", "positions"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    ap.add_argument("--param-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-device", default="auto", help="auto (cuda if present), cpu, cuda")
    ap.add_argument("--model", choices=["zoo", "builtin"], default=default_model())
    ap.add_argument("--out", default=None, help="also write the JSON here (after every section)")


def dump(res: dict[str, Any], out: str | None) -> None:
    """Write the results so far (a later crash or timeout keeps what was measured)."""
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=2, default=str)
        os.replace(tmp, out)


def section(res: dict[str, Any], key: str, out: str | None, fn) -> Any:
    """Run one measurement; an exception (e.g. out of memory) is recorded, not fatal."""
    try:
        val = fn()
    except Exception as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
        res[key] = {"error": f"{type(err).__name__}: {msg}"}
        print(f"[{key}] failed: {res[key]['error']}", file=sys.stderr)
        val = None
    dump(res, out)
    return val


def parse_chunk(text: str) -> int | str | None:
    if text in ("auto", "none", "None"):
        return None if text.lower() == "none" else "auto"
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        # at most two blocks of per-example gradients alive at once (row + column)
        "jacobian_blocks_bytes": min(2, -(-n // resolved)) * resolved * per_example,
        "target_s_h200_gpt2_small": 0.10,
    }
    floor = gpt2_grad_flops(cfg, n, seq)
    res["flop_floor_analytic"] = floor
    out = args.out
    dump(res, out)
    theta = None

    def run_ntk():
        nonlocal theta
        r = time_jitted(lambda p, x: kernel_fn(p, x), params, tokens, repeat=args.repeat)
        theta = np.asarray(r.pop("_out"), dtype=np.float64)
        add_rates(r, floor, peak)
        r["peak_memory_after"] = peak_memory_bytes()
        r["meets_target_0p10_s"] = r["median_s"] <= 0.10
        res["ntk"] = r

    section(res, "ntk", out, run_ntk)

    def run_grad():
        g = time_jitted(
            jax.grad(lambda p, x: loss(p, x).mean()), params, tokens, repeat=args.repeat
        )
        g.pop("_out")
        add_rates(g, floor, peak)
        res["batched_grad"] = g
        if "median_s" in res.get("ntk", {}):
            res["ntk_over_batched_grad"] = res["ntk"]["median_s"] / g["median_s"]

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
            nv = time_jitted(naive, params, tokens, repeat=args.repeat)
            theta_naive = np.asarray(nv.pop("_out"), dtype=np.float64)
            add_rates(nv, floor, peak)
            if theta is not None:
                nv["max_rel_diff_vs_ntk"] = float(
                    np.max(np.abs(theta_naive - theta)) / np.max(np.abs(theta))
                )
            nv["peak_memory_after"] = peak_memory_bytes()
            res["naive_vmap_grad"] = nv

        section(res, "naive_vmap_grad", out, run_naive)
    res["peak_memory"] = peak_memory_bytes()
    dump(res, out)

    if not args.no_torch:
        section(res, "torch_vmap_grad", out, lambda: run_torch(res, model, cfg, args, theta))
    if args.profile:  # last: a profiler that fails or hangs cannot cost the timings above

        def run_profile():
            res["ntk_profile"] = profile_breakdown(
                lambda p, x: kernel_fn(p, x), params, tokens, repeat=3
            )

        section(res, "ntk_profile", out, run_profile)
    print(json.dumps(res, indent=2, default=str))


def run_torch(res, model, cfg, args, theta) -> None:
    try:
        import torch
        from torch.func import grad, vmap
    except ImportError:
        res["torch_vmap_grad"] = "torch not installed"
        return
    n = cfg["n"]
    dev = torch_device(args.torch_device)
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    tparams = {k: v.to(dev) for k, v in to_torch(model["to_builtin"](model["params"])).items()}
    tloss = torch_per_example_loss(cfg["heads"])
    ttok = torch.tensor(np.asarray(model["tokens"]), dtype=torch.long, device=dev)
    per_ex = vmap(grad(tloss), in_dims=(None, 0))

    def torch_kernel():
        gs = per_ex(tparams, ttok)
        return sum(v.reshape(n, -1) @ v.reshape(n, -1).T for v in gs.values())

    tr = torch_time(torch_kernel, max(1, args.repeat // 2), sync)
    tk = tr.pop("_out").detach().cpu().double().numpy()
    if theta is not None:
        tr["max_rel_diff_vs_ntk"] = float(np.max(np.abs(tk - theta)) / np.max(np.abs(theta)))
    tr["torch"] = torch.__version__
    tr["device"] = dev
    if dev == "cuda":
        tr["torch_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    res["torch_vmap_grad"] = tr


if __name__ == "__main__":
    main()
