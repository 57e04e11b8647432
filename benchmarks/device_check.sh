#!/usr/bin/env bash
# One-shot GPU check for issue 3: eNTK loss-gradient kernel and Hutchinson trace timings.
#
# Run from the repository root (the package need not be installed; PYTHONPATH=. is set here):
#     bash benchmarks/device_check.sh
# On the lent H200 (device tool `run`, one call): command "bash benchmarks/device_check.sh",
# timeout_s 480 (the steps stop by DEVICE_CHECK_BUDGET_S = 420 s; the summary needs seconds).
# On a CPU, to test the script itself in ~2-3 minutes:
#     DEVICE_CHECK_PRESET=tiny PYTHON=.venv/bin/python bash benchmarks/device_check.sh
#
# Steps, most important first, each under its own `timeout` so one failure or hang does not
# lose the others; every bench rewrites its JSON after each section (a timeout keeps what was
# measured). Later steps are skipped when the overall budget (DEVICE_CHECK_BUDGET_S, default
# 420 s) is nearly spent. Compiled programs go to a persistent cache (JAX_COMPILATION_CACHE_DIR,
# default /tmp/lensllm_jax_cache), so a program compiled by an earlier step is not compiled
# again (its compile_s is then the cache load).
#   0. environment: nvidia-smi, jax.devices(), versions; imports with gguf / rich blocked
#   1. ntk_c32_bf16:      eNTK, --chunk 32 --bf16 (f32 params; + batched grad, naive vmap(grad),
#                         then a per-op profile of the kernel: where the time goes on the GPU)
#   2. hessian_pb8:       Hutchinson, 8 probes vmapped at once, f32 params
#   3. ntk_auto_pbf16:    eNTK, --chunk auto, bf16 params and Jacobians (bf16 backward passes)
#   4. hessian_pb8_pbf16: Hutchinson, bf16 params
#   5. torch_ntk:         torch.func vmap(grad) on the GPU next to ours (JAX held to 30 % memory)
#   6. torch_hessian:     torch.func jvp(grad) on the GPU next to ours
# Output in $OUT (default ./device_out): one JSON per step, log.txt, summary.txt (8 files at
# most: the device tool returns no more). Exit 0 if anything was measured, else 1.
set -u

OUT="${OUT:-./device_out}"
PY="${PYTHON:-python3}"
PRESET="${DEVICE_CHECK_PRESET:-gpt2-small}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-420}"
REPEAT="${DEVICE_CHECK_REPEAT:-5}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/lensllm_jax_cache}"
START=$(date +%s)
EXTRA=()
if [ "$PRESET" = "tiny" ]; then EXTRA=(--n 8 --seq 16); fi

say() { echo "== $*" | tee -a "$LOG"; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME MAX_SECONDS [ENV=VALUE ...] -- ARGS...: one python process under `timeout`.
run_step() {
    local name="$1" max_s="$2"
    shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local left
    left=$(remaining)
    if [ "$left" -lt 45 ]; then
        say "$name: skipped (only ${left} s of the ${BUDGET_S} s budget left)"
        return 0
    fi
    local t=$((max_s < left - 5 ? max_s : left - 5))
    say "$name: timeout ${t} s: $*"
    local t0 rc
    t0=$(date +%s)
    env "${envs[@]}" timeout -k 10 "$t" "$PY" "$@" --out "$OUT/$name.json" \
        >>"$LOG" 2>&1
    rc=$?
    say "$name: exit $rc after $(($(date +%s) - t0)) s$([ $rc -eq 124 ] && echo ' (timed out)')"
}

say "device check for issue 3, preset $PRESET, budget ${BUDGET_S} s, $(date -u +%FT%TZ)"
(nvidia-smi || echo "no nvidia-smi") >>"$LOG" 2>&1
# 0. versions and imports with gguf / rich blocked (the GPU image may lack them)
timeout 120 "$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, sys
for name in ("gguf", "rich"):
    sys.modules[name] = None  # any `import gguf` / `import rich` now raises ImportError
import jax
print("jax", jax.__version__, "devices", jax.devices())
for mod in ("lensllm_jax.core.ntk", "lensllm_jax.core.hessian", "lensllm_jax.models"):
    importlib.import_module(mod)
sys.path.insert(0, "benchmarks")
import _gpt2, bench_hessian, bench_ntk  # noqa: E401,F401
print("lensllm_jax.core.ntk / hessian / models and the benches import without gguf / rich")
for name in ("gguf", "rich"):
    del sys.modules[name]
print("benchmark model:", _gpt2.default_model(), "(zoo needs flax; else the builtin GPT-2)")
for pkg in ("jaxlib", "flax", "optax", "numpy", "scipy", "torch", "transformers"):
    try:
        print(pkg, importlib.import_module(pkg).__version__)
    except Exception as err:
        print(pkg, "missing:", type(err).__name__)
try:
    print("memory_stats", jax.devices()[0].memory_stats())
except Exception as err:
    print("memory_stats unavailable:", err)
EOF
say "environment: exit $?"

COMMON=(--preset "$PRESET" "${EXTRA[@]}" --repeat "$REPEAT")
run_step ntk_c32_bf16 180 -- benchmarks/bench_ntk.py "${COMMON[@]}" --chunk 32 --bf16 --no-torch \
    --profile
run_step hessian_pb8 120 -- benchmarks/bench_hessian.py "${COMMON[@]}" --probe-batch 8 --no-torch
run_step ntk_auto_pbf16 100 -- benchmarks/bench_ntk.py "${COMMON[@]}" --chunk auto --bf16 \
    --param-dtype bf16 --no-naive --no-torch
run_step hessian_pb8_pbf16 90 -- benchmarks/bench_hessian.py "${COMMON[@]}" --probe-batch 8 \
    --param-dtype bf16 --no-torch
run_step torch_ntk 100 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 -- benchmarks/bench_ntk.py \
    --preset "$PRESET" "${EXTRA[@]}" --repeat 3 --chunk 32 --bf16 --no-naive
run_step torch_hessian 90 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 -- benchmarks/bench_hessian.py \
    --preset "$PRESET" "${EXTRA[@]}" --repeat 3 --probe-batch 8

# summary: one line per measurement; exit 0 if anything has a median time
"$PY" - "$OUT" "$(($(date +%s) - START))" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys

out, wall = sys.argv[1], sys.argv[2]
measured = 0
print(f"issue 3 device check, {wall} s wall")
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    try:
        d = json.load(open(path))
    except Exception as err:
        print(f"{os.path.basename(path)}: unreadable ({err})")
        continue
    m, c = d.get("machine", {}), d.get("config", {})
    print(
        f"{os.path.basename(path)}: {m.get('device')} jax {m.get('jax')}; n={c.get('n')} "
        f"seq={c.get('seq')} chunk={c.get('chunk_resolved', '-')} "
        f"params={c.get('param_dtype')} P={d.get('n_params')}"
    )
    for key in ("ntk", "hutchinson", "batched_grad", "naive_vmap_grad", "torch_vmap_grad",
                "torch_jvp_grad"):
        r = d.get(key)
        if isinstance(r, dict) and "median_s" in r:
            measured += 1
            mem = (r.get("peak_memory_after") or {}).get("gib")
            extra = ""
            if "tflops_at_floor" in r:
                extra += f" {r['tflops_at_floor']:.3g} TFLOP/s at floor"
            if r.get("fraction_of_bf16_peak"):
                extra += f" ({100 * r['fraction_of_bf16_peak']:.1f}% of bf16 peak)"
            if mem is not None:
                extra += f", peak {mem} GiB"
            if "num_probes" in r:
                extra += f", trace {r['trace']:.4g} ± {r['stderr']:.2g} ({r['num_probes']} probes)"
            if "max_rel_diff_vs_ntk" in r:
                extra += f", rel diff vs ours {r['max_rel_diff_vs_ntk']:.1e}"
            spread = f"[{r['min_s'] * 1e3:.2f}, {r['max_s'] * 1e3:.2f}]" if "max_s" in r else ""
            comp = f" compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            print(f"  {key:16s} median {r['median_s'] * 1e3:9.2f} ms {spread}{comp}{extra}")
        elif isinstance(r, dict) and "error" in r:
            print(f"  {key:16s} ERROR {r['error'][:200]}")
        elif isinstance(r, str):
            print(f"  {key:16s} {r}")
    prof = d.get("ntk_profile")
    if isinstance(prof, dict) and "error" not in prof:
        for proc, pr in prof.items():
            top = list(pr.get("by_phase_and_primitive_ms", {}).items())[:6]
            print(f"  profile {proc}: {pr.get('matched_ms_per_call')} ms matched; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in top))
    elif isinstance(prof, dict):
        print(f"  profile ERROR {prof['error'][:200]}")
print(f"measured: {measured}")
sys.exit(0 if measured else 1)
EOF
rc=${PIPESTATUS[0]}
echo "summary exit $rc" >>"$LOG"
exit "$rc"
