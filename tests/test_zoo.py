"""The offline model zoo (benchmarks/zoo/): the smoke preset end to end (pretrain, measure,
assemble, verdict; interrupted and resumed), `lensllm select` on its curves, the committed
results, and the verdict notebook on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lensllm_jax.cli.main import main as cli_main
from lensllm_jax.data.curves import read_curve_table
from lensllm_jax.data.spectra import EXTRA_COLUMNS, read_spectra

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo"
RESULTS = ZOO / "results"


def _build(*args: str, cwd: Path = ZOO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ZOO / "build.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _check_results(out: Path, num_models: int) -> None:
    table = read_curve_table(out / "curves.csv")
    manifest = json.loads((out / "manifest.json").read_text())
    assert table.num_models == num_models
    assert table.sizes[-1] == manifest["full"] >= 16 * table.sizes[-2]  # the ground truth
    assert table.loss_se is not None and np.all(np.isfinite(table.loss_se))
    assert np.all(table.losses[:, -1] < table.zero_shot)  # the full fine-tune helps
    spectra = read_spectra(out / "ntk_features.csv")
    assert set(spectra) == set(table.models)
    assert all(set(v) == set(EXTRA_COLUMNS) for v in spectra.extras.values())
    by_seed = np.genfromtxt(out / "curves_by_seed.csv", delimiter=",", skip_header=1)
    assert by_seed.shape == (num_models * len(manifest["seeds"]), table.sizes.size + 3)
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["decision"]["default"] in verdict["arms"]
    for arm in ("LensLLM", "LensLLM-NTK", "LensLLM-cap", "LensLLM-NTK-steps", "LensLLM-kernel"):
        for cell in verdict["arms"][arm].values():
            if isinstance(cell, dict):
                assert cell["PearCorr"]["lo"] <= cell["PearCorr"]["hi"]
    # select reads every column (the ground truth too), so it predicts one doubling beyond
    target = str(int(2 * table.sizes[-1]))
    rc = cli_main(
        [
            "select",
            str(out / "curves.csv"),
            "--target",
            target,
            "--ntk",
            str(out / "ntk_features.csv"),
            "--methods",
            "LensLLM",
            "LensLLM-NTK-steps",
            "LensLLM-kernel",
            "--format",
            "csv",
        ]
    )
    assert rc == 0


@pytest.mark.slow
def test_smoke_zoo_builds_resumes_and_selects(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--preset", "smoke", "--work", str(work), "--out", str(out)]
    done = _build(*common, "--stages", "corpus", "pretrain")
    assert done.returncode == 0, done.stderr[-2000:]
    # a measure call out of time stops cleanly (exit 3) after a few points; the next resumes
    done = _build(*common, "--stages", "measure", "--max-seconds", "5")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "out of time" in done.stderr
    first_points = sorted((work / "points").rglob("*.json"))
    assert len(first_points) < 4 * 2 * 4
    done = _build(*common, "--stages", "measure")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(sorted((work / "points").rglob("*.json"))) == 4 * 2 * 4
    done = _build(*common, "--stages", "assemble", "verdict", "--bootstrap", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    first = (out / "curves.csv").read_bytes()
    # a rerun finds everything done and writes the same curves
    done = _build(*common, "--stages", "pretrain", "measure", "assemble")
    assert done.returncode == 0 and "D = " not in done.stderr
    assert (out / "curves.csv").read_bytes() == first
    _check_results(out, 4)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_committed_results(preset):
    out = RESULTS / preset
    if not (out / "verdict.json").exists():
        pytest.skip(f"no committed {preset} results")
    _check_results(out, 4 if preset == "smoke" else 14)


@pytest.mark.slow
def test_verdict_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ZOO_RESULTS", str(RESULTS / "smoke"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    path = ROOT / "notebooks" / "ntk_verdict.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    found = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and '{"zoo_verdict"' in o.get("text", ""):
                line = next(x for x in o["text"].splitlines() if x.startswith('{"zoo_verdict"'))
                found = json.loads(line)["zoo_verdict"]
    assert found["candidates"] == 4 and "LensLLM-NTK-steps" in found["arms"]
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # curves with fits, spectra, the verdict's intervals
