"""Execute notebooks/reproduce_fts.ipynb with nbclient in a fresh kernel of this venv.

`kernel_name="python3"`: jupyter_client resolves the native kernel to ipykernel in the
running interpreter's environment (argv[0] "python" becomes sys.executable), so a fresh
venv with ipykernel installed needs no kernelspec registration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "reproduce_fts.ipynb"


def _json_outputs(nb) -> dict:
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                for line in out["text"].splitlines():
                    if line.startswith("{"):
                        found.update(json.loads(line))
    return found


@pytest.mark.slow
def test_notebook_runs(fts_dir, published_csv, monkeypatch, tmp_path):
    monkeypatch.setenv("LENSLLM_DATA", str(fts_dir))  # the kernel inherits it: no download
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    out = _json_outputs(nb)
    # The shortcut methods are exact reproductions of Lin et al.'s table.
    diff = out["max_abs_diff_vs_published"]
    for method in ("AtS", "ZeroShot", "SubTuning", "ModelSize"):
        assert diff[method] <= 0.2, (method, diff)
    means = out["mean_over_budgets"]
    assert set(means) == {"flan", "gigaword"}
    assert means["flan"]["AtS"]["PearCorr"] == pytest.approx(62.7, abs=0.2)
    # Two figures (one per dataset) rendered as PNG.
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 2


def test_kernel_is_this_interpreter():
    """The "python3" kernel runs in this venv, so the notebook imports this checkout."""
    import sys

    from jupyter_client import KernelManager

    cmd = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert cmd[:3] == [sys.executable, "-m", "ipykernel_launcher"]
