"""README's Python examples run as written and print what README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_has_the_two_api_examples():
    assert len(BLOCKS) == 2
    assert "ll.rank(" in BLOCKS[0] and "ll.loss_gradient_kernel(" in BLOCKS[1]


@pytest.mark.slow
def test_ranking_example_runs_and_prints_its_comment():
    out = _run(BLOCKS[0]).splitlines()
    # the first print is annotated in README with what it prints
    said = re.search(r"print\(rows\[0\]\.model, round\(rows\[0\]\.p_best, 2\)\)  # (.*)", BLOCKS[0])
    assert said is not None
    assert out[0] == said.group(1)


@pytest.mark.slow
def test_ntk_example_runs_on_smollm2(smollm2_gguf):
    out = _run(BLOCKS[1]).splitlines()
    f_value, trace, stderr = (float(x) for x in out[0].split())
    assert f_value > 0 and stderr > 0 and abs(trace) < 1e9
    assert out[1] == "32"  # a trace per layer (30), not per parameter kind, + embed and norm
