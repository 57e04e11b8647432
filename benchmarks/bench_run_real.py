"""`lensllm run --hessian` on the real SmolLM2-135M-Instruct (Q4_1 GGUF) over real English
(Python's `pydoc_data.topics` paragraphs), in a child process: its peak RSS, wall time, the
number of XLA programs it compiles (JAX's compile log; the persistent compilation cache off),
and its progress lines (the NTK route it chose, the Hessian traces); JSON.

Usage: nice -n 10 python benchmarks/bench_run_real.py --out run_real.json
       LENSLLM_NTK_MEMORY=4GiB python benchmarks/bench_run_real.py ...   # a smaller budget
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import load_average
from bench_ntk_real import smollm2_path

from lensllm_jax.data.text import python_doc_paragraphs


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--paragraphs", type=int, default=160)
    ap.add_argument("--sizes", nargs="+", default=["4", "8", "16"])
    ap.add_argument("--probe-size", default="32")
    ap.add_argument("--test-size", default="32")
    ap.add_argument("--max-length", default="64")
    ap.add_argument("--hessian", default="8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "python_docs.txt"
        data.write_text("\n".join(python_doc_paragraphs(args.paragraphs)) + "\n", encoding="utf-8")
        argv = [
            "run", "--models", str(smollm2_path()), "--data", str(data), "--sizes", *args.sizes,
            "--test-size", args.test_size, "--probe-size", args.probe_size, "--max-length",
            args.max_length, "--epochs", "1", "--min-steps", "2", "--batch-size", "4",
            "--hessian", args.hessian, "--out-dir", str(Path(tmp) / "run"), "--format", "json",
        ]  # fmt: skip
        env = {**os.environ, "JAX_LOG_COMPILES": "1", "LENSLLM_JIT_CACHE": "0",
               "HF_HUB_OFFLINE": "1"}  # fmt: skip
        load0 = load_average()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "lensllm_jax.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    lines = proc.stderr.splitlines()
    compiles = [ln.split(" ")[1] for ln in lines if ln.startswith("Compiling ")]
    progress = [ln for ln in lines if ln.startswith("lensllm") or ": " in ln[:80]]
    res: dict[str, Any] = {
        "benchmark": "lensllm_run_real_model",
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF",
        "argv": [*argv[:1], "--models", "<gguf>", "--data", "<pydoc paragraphs>", *argv[5:-4]],
        "ntk_memory_env": os.environ.get("LENSLLM_NTK_MEMORY"),
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 3),
        "compiled_programs": len(compiles),
        "compiled_by_name": {n: compiles.count(n) for n in sorted(set(compiles))},
        "progress": [ln for ln in progress if "Compiling" not in ln][-40:],
        "load_average_start": load0,
        "load_average_end": load_average(),
    }
    if proc.returncode:
        res["stderr_tail"] = proc.stderr[-2000:]
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
