"""Shared fixtures. Benchmark data is read from ../shared (never committed)."""

from __future__ import annotations

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
