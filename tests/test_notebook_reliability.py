"""Execute notebooks/reliability.ipynb (the reliability figure of LensLLM's "how sure") in a
fresh kernel of this venv; its numbers are the leave-one-dataset-out evidence of issue 11."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "reliability.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


@pytest.mark.slow
def test_reliability_notebook_runs(fts_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LENSLLM_DATA", str(fts_dir))
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                for line in out["text"].splitlines():
                    if line.startswith("{"):
                        found.update(json.loads(line))
    assert found["c_optimal"]["flan"] > found["c_optimal"]["gigaword"]
    for name, cell in found["lodo"].items():
        assert len(cell["coverage_by_target"]) == 4
        assert min(cell["coverage_by_target"].values()) >= 0.9, (name, cell)
        assert 1 <= cell["mean_set_size"] < 15
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
