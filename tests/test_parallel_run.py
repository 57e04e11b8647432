"""A whole tiny `lensllm run` sharded on 8 forced host devices, and as two processes of 4
devices on JAX's distributed runtime (gloo CPU collectives over 127.0.0.1), equals the
one-device run (f32, <= 1e-5 relative); only process 0 writes; an interrupted two-process
run resumes. Each run is a child process, so XLA_FLAGS never reaches this one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from parallel_tools import device_env

from lensllm_jax import cli
from lensllm_jax.data.curves import read_curve_table

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_pipeline import _candidate, _shared_dir, _task

pytestmark = pytest.mark.slow  # whole fine-tuning runs in child processes
RTOL = 1e-5
ARGS = (
    *("--sizes", "8", "16", "32", "--test-size", "16", "--probe-size", "8", "--max-length"),
    *("32", "--lr", "3e-3", "--epochs", "2", "--min-steps", "4", "--hessian", "2", "-q"),
    *("--format", "csv"),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two candidates (GPT-2 with a character tokenizer, Llama with a word tokenizer), the
    task, and the one-device reference run (in this process: one CPU device)."""
    with _shared_dir(tmp_path_factory, "parallel_run_world") as root:
        models = [root / "gpt2-char", root / "llama-word"]
        if not (root / "ready").exists():
            _candidate(models[0], "gpt2", "char", 0)
            _candidate(models[1], "llama", "word", 1)
            _task(root / "task.jsonl", n=80)
            mp = pytest.MonkeyPatch()
            mp.setenv("LENSLLM_JIT_CACHE", "0")
            try:
                argv = _argv(models, root / "task.jsonl", root / "ref")
                assert cli.main(argv) == 0
            finally:
                mp.undo()
            (root / "ready").touch()
    return {"models": models, "data": root / "task.jsonl", "ref": root / "ref"}


def _argv(models, data, out_dir):
    return [
        "run",
        "--models",
        *map(str, models),
        "--data",
        str(data),
        *ARGS,
        "--out-dir",
        str(out_dir),
    ]


def _start(world, out_dir, *extra, devices):
    """A child `lensllm run`, its output in files beside out_dir (never a pipe that a
    process blocked on a full buffer would wait on while its peer waits for it)."""
    cmd = [sys.executable, "-m", "lensllm_jax.cli"]
    cmd += [*_argv(world["models"], world["data"], out_dir), *extra]
    logs = [open(f"{out_dir}.{name}", "w") for name in ("out", "err")]
    proc = subprocess.Popen(cmd, env=device_env(devices), stdout=logs[0], stderr=logs[1])
    proc.logs = [Path(f.name) for f in logs]  # type: ignore[attr-defined]
    for f in logs:
        f.close()
    return proc


def _finish(proc, timeout=2400):
    proc.wait(timeout=timeout)
    out, err = (path.read_text() for path in proc.logs)
    assert proc.returncode == 0, err[-4000:]
    return out, err


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = np.nanmax(np.abs(a))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= rtol * scale, (np.nanmax(np.abs(a - b)), scale)


def _same_results(ref: Path, got: Path) -> None:
    """Curves, standard errors, NTK, Hessian traces and the rankings of two run folders."""
    t1, t2 = read_curve_table(ref / "curves.csv"), read_curve_table(got / "curves.csv")
    assert t1.models == t2.models
    for field in ("losses", "zero_shot", "loss_se"):
        _close(getattr(t1, field), getattr(t2, field))
    files = sorted(p.name for p in (ref / "candidates").iterdir())
    assert files == sorted(p.name for p in (got / "candidates").iterdir()) and len(files) == 2
    for name in files:
        with np.load(ref / "candidates" / name) as a, np.load(got / "candidates" / name) as b:
            for key in ("theta", "residual", "eigenvalues", "losses", "ft_hessian_trace"):
                _close(a[key], b[key])
            _close(a["hessian_trace"], b["hessian_trace"])
    rank1 = [line.split(",")[:3] for line in (ref / "ranking.csv").read_text().splitlines()]
    rank2 = [line.split(",")[:3] for line in (got / "ranking.csv").read_text().splitlines()]
    assert rank1 == rank2  # method, rank, model


def test_run_on_eight_devices_equals_one_device(world, tmp_path):
    out_dir = tmp_path / "eight"
    out, _err = _finish(_start(world, out_dir, "--mesh", "data=2,fsdp=4", devices=8))
    _same_results(world["ref"], out_dir)
    assert out.splitlines()[0] == "method,rank,model,score,status,p_best"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(world, out0, out1, port):
    """Process 0 and 1 of a two-process run, 4 CPU devices each (8 in the mesh)."""
    common = ["--mesh", "data=2,fsdp=4", "--distributed", "--coordinator", f"127.0.0.1:{port}"]
    return [
        _start(world, out, *common, "--num-processes", "2", "--process-id", str(i), devices=4)
        for i, out in enumerate((out0, out1))
    ]


def test_interrupted_two_process_run_resumes_and_equals_one(world, tmp_path):
    """Two processes killed after the first candidate is saved, then restarted: the result
    equals the one-device run, the first candidate is read back, and process 1 neither
    prints nor writes (its --out-dir is never created)."""
    out0, out1 = tmp_path / "p0", tmp_path / "p1"
    procs = _pair(world, out0, out1, _port())
    deadline = time.time() + 2400
    first = out0 / "candidates"
    while not (first.is_dir() and any(first.glob("000_*.npz"))):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.5)
    for p in procs:  # killed mid-run: the second candidate is not finished
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not any(first.glob("001_*.npz"))
    (done,) = first.glob("000_*.npz")
    before = (done.stat().st_ino, done.stat().st_mtime_ns)
    procs = _pair(world, out0, out1, _port())
    (o1, _), (o0, _) = _finish(procs[1]), _finish(procs[0])
    _same_results(world["ref"], out0)
    assert o0.splitlines()[0] == "method,rank,model,score,status,p_best" and o1 == ""
    # report.json has no 'resumed' field (issue 12: a rerun rewrites it byte for byte): the
    # first candidate was read back (its file untouched), the second measured and saved
    assert (done.stat().st_ino, done.stat().st_mtime_ns) == before
    assert len(list(first.glob("001_*.npz"))) == 1
    assert not out1.exists()
