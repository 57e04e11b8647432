"""The notebooks run, top to bottom, in a fresh kernel of this venv (nbclient), and are
committed without outputs.

`kernel_name="python3"`: jupyter_client resolves the native kernel to ipykernel in the
running interpreter's environment (argv[0] "python" becomes sys.executable), so a fresh
venv with ipykernel installed needs no kernelspec registration. Each notebook prints its
results as one JSON line, which the tests check.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
CELL_TIMEOUT = int(os.environ.get("LENSLLM_NOTEBOOK_TIMEOUT", "1800"))  # a busy CPU is slow


def _execute(name: str, monkeypatch, tmp_path) -> dict:
    """Run notebooks/`name` (its folder as the working directory); return its JSON lines,
    after checking that no cell raised."""
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LENSLLM_JIT_CACHE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = FOLDER / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(FOLDER)}},
    )
    before = sorted(p.name for p in FOLDER.iterdir())
    client.execute()
    assert sorted(p.name for p in FOLDER.iterdir()) == before  # wrote nothing beside it
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    found: dict = {"_pngs": 0, "_text": ""}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            found["_pngs"] += "image/png" in out.get("data", {})
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                found["_text"] += out["text"]
                for line in out["text"].splitlines():
                    if line.startswith('{"'):  # a one-line JSON summary
                        found.update(json.loads(line))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs_and_open_with_their_question(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.id)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "**The question.**" in first.source, path.name


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {
        "choose_candidates.ipynb",
        "ntk_linearised.ipynb",
        "ntk_verdict.ipynb",  # executed by tests/test_zoo.py (on the committed results)
        "reliability.ipynb",  # executed by tests/test_notebook_reliability.py
        "reproduce_fts.ipynb",
        "two_phases.ipynb",
    }


@pytest.mark.slow
def test_reproduce_fts_notebook(fts_dir, monkeypatch, tmp_path):
    published = FOLDER.parents[1] / "shared" / "reference" / "published_fts.csv"
    monkeypatch.setenv("LENSLLM_DATA", str(fts_dir))  # the kernel inherits it
    out = _execute("reproduce_fts.ipynb", monkeypatch, tmp_path)
    diff = out["max_abs_diff_vs_published"]
    if published.exists():  # the shortcut methods are exact reproductions of Lin et al.
        for method in ("AtS", "ZeroShot", "SubTuning", "ModelSize"):
            assert diff[method] <= 0.2, (method, diff)
    else:  # a user without the reference table: skipped with a note, nothing read
        assert diff == {} and "skipped: no published table" in out["_text"]
    means = out["mean_over_budgets"]
    assert set(means) == {"flan", "gigaword"}
    assert means["flan"]["AtS"]["PearCorr"] == pytest.approx(62.7, abs=0.2)
    assert out["_pngs"] == 2  # one figure per dataset


@pytest.mark.slow
def test_choose_candidates_notebook(smollm2_gguf, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = _execute("choose_candidates.ipynb", monkeypatch, tmp_path)["choose_candidates"]
    # the real pretrained model beats two random ones, surely
    assert out["ranking"][0] == "SmolLM2-135M-Instruct.Q4_1" and out["p_best"][0] > 0.99
    assert out["plots"] == ["curves.png", "ntk.png", "ranking.png"]
    assert math.isclose(out["redrawn"], out["score"], rel_tol=1e-9)
    assert out["far_p_best_top"] <= out["p_best"][0]  # further is never surer
    # the two random models cannot be told apart: a coin toss, near and far
    assert all(0.4 < p < 0.7 for p in out["pairwise"].values()), out["pairwise"]


@pytest.mark.slow
def test_ntk_linearised_notebook(smollm2_gguf, monkeypatch, tmp_path):
    out = _execute("ntk_linearised.ipynb", monkeypatch, tmp_path)
    found = out["ntk_linearised"]
    assert out["_pngs"] == 3  # the spectra, and one comparison per model
    for name, res in found.items():
        rel = res["rel_error"]
        assert rel[0] < 1e-5, name  # t = 0: the same losses
        assert rel[1] < 0.05, (name, rel)  # one step: first order holds
        assert rel[-1] > rel[1], (name, rel)  # and drifts as θ leaves θ0


@pytest.mark.slow
def test_two_phases_notebook(smollm2_gguf, monkeypatch, tmp_path):
    out = _execute("two_phases.ipynb", monkeypatch, tmp_path)["two_phases"]
    assert out["sizes"] == [2, 4, 8, 16, 32] and out["tested"] is True
    assert all(math.isfinite(x) for x in out["distance"] + out["trace"])
    assert out["layers"] == 30  # SmolLM2-135M: a trace per layer, not per parameter kind
    assert out["layer_sum"] == pytest.approx(out["total"], rel=1e-4)


def test_kernel_is_this_interpreter():
    """The "python3" kernel runs in this venv, so the notebook imports this checkout."""
    import sys

    pytest.importorskip("nbclient")
    from jupyter_client import KernelManager

    cmd = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert cmd[:3] == [sys.executable, "-m", "ipykernel_launcher"]
