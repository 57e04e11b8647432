"""Run code on forced host devices in a child process: XLA_FLAGS is set in the child's
environment only, so the test process (and the rest of the suite) keeps its one device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_env(devices: int) -> dict[str, str]:
    """The environment of a child with `devices` CPU devices and this checkout importable."""
    env = dict(os.environ)
    keep = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*keep, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LENSLLM_JIT_CACHE"] = "0"
    return env


def run_worker(task: str, dest: Path, *args: str, devices: int = 8, timeout: float = 1800):
    """`tests/parallel_worker.py TASK DEST ARGS...` on `devices` devices; returns the npz."""
    import numpy as np

    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "parallel_worker.py"), task, str(dest), *args],
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
    return dict(np.load(dest))
