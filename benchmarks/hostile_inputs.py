"""Feed `lensllm` several hundred hostile inputs and classify what it does with each.

Every case runs the real CLI (``python -m lensllm_jax.cli ...``) in its own process and
folder, under a wall-clock timeout and a memory limit (RLIMIT_AS), optionally with a file
size limit (RLIMIT_FSIZE: a write past it fails like a full disk). Outcomes:

  clean      refused with exactly one ``lensllm: error:`` line and exit code 2 (for an
             input that must be refused), or succeeded and passed its check (for one that
             must work); a borderline input ("either") may do either
  traceback  a Python traceback, or any other exit code (a MemoryError under the limit)
  hang       still running at the timeout (killed)
  wrong      exit 0 on an input that must be refused, a refusal of one that must work, or
             a success that fails its check (reused stale results, a crash-free but wrong
             answer)
  written    (counted apart) a refusal that left --out replaced or the --out-dir created
             without saying so (no "resume" in the error line)

The Python-API area runs snippets instead of the CLI: a one-line `LensLLMError` is a clean
refusal; a return value is judged by the case's own expression.

    python benchmarks/hostile_inputs.py [--code DIR] [--areas a,b] [--jobs 2] [--out FILE]

`--code DIR` runs another checkout's `lensllm_jax` (e.g. main before a change). Prints the
JSON summary (counts per area, the peak RSS of the memory bombs, every case's outcome).
Needs torch + transformers (the tiny checkpoints), root for the device-node cases (skipped
otherwise), and a few minutes per hundred cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load_sibling(name: str, folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


H = _load_sibling("hostile_fixtures", REPO / "tests")
C = _load_sibling("_hostile_cases", REPO / "benchmarks")
CIO = _load_sibling("_hostile_cases_io", REPO / "benchmarks")

API_WRAPPER = """
import sys
from lensllm_jax.errors import LensLLMError
import numpy as np
try:
{code}
except LensLLMError as err:
    print(f"lensllm: error: {{err}}", file=sys.stderr)
    sys.exit(2)
good = bool({good})
print("RIGHT" if good else "WRONG", repr(result)[:300])
"""


@dataclasses.dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    maxrss_mib: float
    hang: bool


def _limits(mem: int, fsize: int | None):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return apply


def _spawn(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, mem: int, fsize: int | None
) -> Result:
    """Run one case in its own session under the limits. Its output comes back through
    pipes, never files: RLIMIT_FSIZE (the imitated full disk) applies to every regular file
    the process writes, so a captured stderr file would itself be "full" and turn a clean
    one-line refusal into a failed flush at exit (status 120)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_limits(mem, fsize),
        start_new_session=True,
    )
    streams: dict[str, bytes] = {}

    def drain(name: str, pipe: Any) -> None:
        streams[name] = pipe.read()
        pipe.close()

    readers = [
        threading.Thread(target=drain, args=(name, pipe), daemon=True)
        for name, pipe in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for r in readers:
        r.start()
    hang, status, usage = False, 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            hang = True
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(timeout=10)  # a grandchild still holding the pipe must not stall the driver
    seconds = time.perf_counter() - t0
    rss = usage.ru_maxrss / 1024 if usage is not None else float("nan")
    return Result(
        None if hang else proc.returncode,
        streams.get("out", b"").decode(errors="replace"),
        streams.get("err", b"").decode(errors="replace"),
        seconds,
        rss,
        hang,
    )


def _signature(path: Path) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)


def _targets(argv: list[str], d: Path) -> list[Path]:
    out = []
    for flag in ("--out", "--out-dir"):
        if flag in argv:
            out.append(Path(argv[argv.index(flag) + 1]))
    return [p for p in out if str(p).startswith(str(d))]


def _tree(p: Path) -> Any:
    if p.is_symlink() or not p.is_dir():
        return _signature(p)
    return {c.name: _tree(c) for c in sorted(p.iterdir())}


def classify(expect: str, res: Result, problem: str | None) -> str:
    if res.hang:
        return "hang"
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in res.stderr or res.rc not in (0, 2):
        return "traceback"
    if res.rc == 2:
        errors = [line for line in err_lines if not line.startswith("lensllm: warning:")]
        one_line = len(errors) == 1 and errors[0].startswith("lensllm: error:")
        if not one_line:
            return "traceback"
        return "wrong" if expect == "ok" else "clean"
    # rc == 0
    if expect == "error":
        return "wrong"
    return "wrong" if problem else "clean"


def run_case(case: Any, fx: Any, base: Path, args: argparse.Namespace, idx: int) -> dict:
    d = base / f"case{idx:04d}"
    d.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(d),
        "PYTHONPATH": str(args.code),
        "LENSLLM_CACHE": str(base / "cache"),
        "LENSLLM_JIT_CACHE": "0" if case.fsize else "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "OMP_NUM_THREADS": "1",
    }
    mem = int(args.mem_gib * 2**30)
    timeout = case.timeout or args.timeout
    record: dict[str, Any] = {"area": case.area, "case": case.name, "expect": case.expect}
    try:
        if case.area == "api":
            code, good = case.setup
            snippet = API_WRAPPER.format(
                code="\n".join("    " + line for line in (CIO.API_PRELUDE + code).splitlines()),
                good=good,
            )
            cmd = [sys.executable, "-c", snippet]
            res = _spawn(cmd, d, env, timeout, mem, None)
            problem = None if "RIGHT" in res.stdout else "wrong value"
            targets: list[Path] = []
            before_sig: dict = {}
        else:
            for pre in case.before:
                argv = pre(d, fx)
                r = _spawn([sys.executable, "-m", "lensllm_jax.cli", *argv], d, env, 900, mem, None)
                if r.rc != 0:
                    record.update(outcome="setup-failed", stderr=r.stderr[-800:])
                    return record
                shutil.rmtree(d / "m", ignore_errors=True)  # the case copies it again
            argv = case.setup(d, fx)
            if case.between is not None:
                case.between(d, fx)
            targets = _targets(argv, d)
            before_sig = {p: _tree(p) for p in targets}
            cmd = [sys.executable, "-m", "lensllm_jax.cli", *argv]
            res = _spawn(cmd, d, env, timeout, mem, case.fsize)
            problem = case.check(d, res) if (case.check and res.rc == 0) else None
    except OSError as err:  # a case this machine cannot make (mknod without root)
        record.update(outcome="skipped", why=str(err))
        return record
    outcome = classify(case.expect, res, problem)
    written = False
    if res.rc != 0:
        changed = [p for p in targets if _tree(p) != before_sig.get(p)]
        said = "resume" in res.stderr
        written = bool(changed) and not said
    errs = [line for line in res.stderr.splitlines() if line.strip()]
    record.update(
        outcome=outcome,
        written=written,
        rc=res.rc,
        seconds=round(res.seconds, 2),
        maxrss_mib=round(res.maxrss_mib, 1),
        first_line=(errs[0][:300] if errs else res.stdout.strip()[:200]),
        last_line=(errs[-1][:300] if errs else ""),
        problem=problem,
    )
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return record


def build_fixtures(root: Path) -> Any:
    root.mkdir(parents=True, exist_ok=True)
    gpt2, llama = root / "gpt2", root / "llama"
    if not gpt2.exists():
        H.tiny_hf(gpt2, "gpt2", 0)
    if not llama.exists():
        H.tiny_hf(llama, "llama", 1)
    task = root / "task.jsonl"
    task.write_text("\n".join(H.task_lines(32)) + "\n")
    return C.Fixtures(root, gpt2, llama, H.tiny_gguf(), task)


def all_cases() -> list[Any]:
    cases = [
        *C.config_cases(),
        *C.safetensors_cases(),
        *C.gguf_cases(),
        *CIO.data_cases(),
        *CIO.curves_cases(),
        *CIO.out_cases(),
        *CIO.resume_cases(),
        *CIO.name_cases(),
    ]
    for name, code, good, expect in CIO.api_cases():
        cases.append(C.Case("api", name, (code, good), expect))
    return cases


def summarise(records: list[dict]) -> dict:
    areas: dict[str, dict[str, int]] = {}
    for r in records:
        a = areas.setdefault(
            r["area"],
            dict.fromkeys(
                ("tried", "clean", "traceback", "hang", "wrong", "written", "skipped"), 0
            ),
        )
        if r["outcome"] in ("skipped", "setup-failed"):
            a["skipped"] += 1
            continue
        a["tried"] += 1
        a[r["outcome"]] += 1
        a["written"] += int(r.get("written", False))
    total = {k: sum(a[k] for a in areas.values()) for k in next(iter(areas.values()))}
    return {"areas": areas, "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose lensllm_jax runs")
    p.add_argument("--areas", help="comma-separated areas (default: all)")
    p.add_argument("--match", help="only cases whose name contains this (a|b: either)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--mem-gib", type=float, default=4.0)
    p.add_argument("--work", type=Path, help="folder for fixtures and cases (default: a temp)")
    p.add_argument("--keep", action="store_true", help="keep each case's folder")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    args.code = args.code.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    fx = build_fixtures(work / "fixtures")
    cases = all_cases()
    if args.areas:
        cases = [c for c in cases if c.area in args.areas.split(",")]
    if args.match:
        cases = [c for c in cases if any(m in c.name for m in args.match.split("|"))]
    base = work / f"cases-{int(time.time())}"
    base.mkdir()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_case, c, fx, base, args, i) for i, c in enumerate(cases)]
        records = []
        for f in futures:
            r = f.result()
            records.append(r)
            print(
                f"{r['outcome']:>10} {'W' if r.get('written') else ' '} {r['area']:>11}: "
                f"{r['case']} | {r.get('last_line', r.get('why', ''))[:150]}",
                file=sys.stderr,
                flush=True,
            )
    bombs = [
        {
            "case": r["case"],
            "area": r["area"],
            "outcome": r["outcome"],
            "maxrss_mib": r["maxrss_mib"],
            "seconds": r["seconds"],
        }
        for r in records
        if "maxrss_mib" in r
        and any(
            k in r["case"]
            for k in ("1e9", "2^6", "deep", "nested", "20,000", "200,000", "zero", "2^40")
        )
    ]
    body = {
        "code": str(args.code),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": None,
        },
        "limits": {"mem_gib": args.mem_gib, "timeout_s": args.timeout},
        "wall_s": round(time.perf_counter() - t0, 1),
        **summarise(records),
        "bombs": bombs,
        "cases": records,
    }
    body["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(body, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: body[k] for k in ("code", "wall_s", "areas", "total")}, indent=1))


if __name__ == "__main__":
    main()
