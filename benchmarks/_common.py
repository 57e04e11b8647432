"""What every benchmark script shares: the machine record, timing of compiled calls (median,
min, max; compile time apart), achieved FLOP/s, peak memory, profiles, and writing JSON so
that a crash keeps what was measured. Benchmarks import it as a sibling module
(``python benchmarks/<script>.py`` puts this folder on the path)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import jax

# Peers run as their users run them: torch's OpenMP threads sleep instead of spin-waiting when
# idle (the default spin steals the cores JAX and the other peer need on a shared machine).
# Set before torch is imported (libgomp reads it once); benchmarks import this module first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def load_average() -> dict[str, Any]:
    """`uptime`'s load averages (1, 5, 15 min) and the CPU count: how busy the machine was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return {}
    return {"1min": one, "5min": five, "15min": fifteen, "cpus": os.cpu_count()}


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
    if "flops_xla" in r:
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
    if hlo is None:
        raise RuntimeError("this backend gives no compiled HLO text to match the trace against")
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


class CompileCounter:
    """Counts the XLA programs JAX compiles inside a `with` block (its compile log), by name."""

    def __enter__(self) -> CompileCounter:
        import logging
        from collections import Counter

        self.names: Counter[str] = Counter()
        counter = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if msg.startswith("Compiling "):
                    counter.names[msg.split(" ")[1]] += 1

        self._handler = Handler(level=logging.DEBUG)
        self._logger = logging.getLogger("jax")
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        self._was = jax.config.values["jax_log_compiles"]  # typed; the attribute is dynamic
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.config.update("jax_log_compiles", self._was)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)

    def as_dict(self) -> dict[str, Any]:
        return {"programs": sum(self.names.values()), "by_name": dict(self.names.most_common())}


def torch_setup() -> dict[str, Any]:
    """torch with one intra-op thread per core (this machine's count) and passive OpenMP
    waiting; returns what was set, for the JSON."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


def interleaved(fns: dict[str, Any], rounds: int, reference: str) -> dict[str, Any]:
    """Time every `fn()` (already compiled / warmed up; each must block until done) once per
    round, in turn, for `rounds` rounds; per function the median time and, per round, its
    ratio to `reference`'s time in that round (a busy machine slows both alike), and the same
    in process CPU time (CPU seconds used by all threads: steadier than wall time when
    other jobs share the cores; torch's threads count too, OpenMP waiting passively)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out: dict[str, Any] = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[reference], strict=True)]
        cpu_ratios = [t / r for t, r in zip(cpu[name], cpu[reference], strict=True)]
        out[name] = {
            "median_s": statistics.median(ts),
            "times_s": [round(t, 4) for t in ts],
            f"over_{reference}_per_round": [round(x, 3) for x in ratios],
            f"over_{reference}_median": round(statistics.median(ratios), 3),
            "cpu_s": [round(t, 4) for t in cpu[name]],
            f"cpu_over_{reference}_median": round(statistics.median(cpu_ratios), 3),
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


def status_gib(field: str = "VmHWM") -> float | None:
    """A memory field of /proc/self/status in GiB: VmHWM (this process's own peak RSS) or
    VmRSS; None off Linux. Not `ru_maxrss`: Linux carries the parent's peak into a child
    across fork and exec, so a child of a large process would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
