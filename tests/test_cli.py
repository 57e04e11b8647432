"""`lensllm reproduce`: outputs, the csv contract, bad input (exit 2, one line, --out
untouched), failed fits, and finding the data. Toy methods with transparent scores are
checked against metrics recomputed here with scipy."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lensllm_jax import cli
from lensllm_jax.benchmark import download, protocol
from lensllm_jax.data.curves import read_curve_table
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection import registry
from lensllm_jax.selection.base import Selection

TARGET = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)
BUDGETS = [f"1/{r}" for r in RATIOS]
REPO = Path(__file__).resolve().parents[1]


def last_point(table, budget_size, target):
    """Score = loss at the largest size within budget (lower = better)."""
    j = int(np.searchsorted(table.sizes, budget_size, side="right")) - 1
    used = tuple(float(s) for s in table.sizes[: j + 1])
    return Selection(
        table.losses[:, j].copy(), ("ok",) * table.num_models, (used,) * table.num_models
    )


def flaky(table, budget_size, target):
    """`last_point`, but the first model's curve "could not be fitted"."""
    sel = last_point(table, budget_size, target)
    scores = sel.scores.copy()
    scores[0] = np.nan
    status = ("failed",) + ("ok",) * (table.num_models - 1)
    return sel._replace(scores=scores, status=status)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No JAX cache side effects in this process, and never the user's cache."""
    monkeypatch.setenv("LENSLLM_JIT_CACHE", "0")
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LENSLLM_DATA", raising=False)


@pytest.fixture
def toy_methods(monkeypatch):
    """Register LastPoint and Flaky in the method registry."""
    monkeypatch.setitem(registry.METHODS, "LastPoint", last_point)
    monkeypatch.setitem(registry.METHODS, "Flaky", flaky)
    return registry


def _expected(table, ratio, scores):
    """Independent metrics: scipy for correlations, the definitions for RelAcc and cost."""
    truth = table.losses[:, -1]
    ok = np.isfinite(scores)
    pear = 100 * stats.pearsonr(scores[ok], truth[ok]).statistic
    kendall = 100 * stats.kendalltau(scores[ok], truth[ok]).statistic
    chosen = truth[ok][np.argmin(scores[ok])]
    relacc = 100 * (truth.max() - chosen) / (truth.max() - truth.min())
    used = table.sizes[table.sizes <= TARGET / ratio].sum()
    cost = 100 * used / TARGET  # every model fine-tuned on the same sizes
    return {"PearCorr": pear, "RelAcc": relacc, "KendallTau": kendall, "CostPercent": cost}


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- outputs -------------------------------------------------------------------------------


def test_csv_contract_and_values(tmp_path, fts_dir, toy_methods, capsys):
    out = tmp_path / "rows.csv"
    argv = ["reproduce", "--data", str(fts_dir / "flan.csv"), "--methods", "LastPoint"]
    code, stdout, err = _run([*argv, "--format", "csv", "--out", str(out)], capsys)
    assert code == 0 and stdout == "" and err == ""
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]  # no temp file left
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dataset", "budget", "method", "metric", "value_percent"]
    body = rows[1:]
    assert len(body) == len(RATIOS) * 4
    assert [r[1] for r in body[::4]] == BUDGETS
    assert {r[0] for r in body} == {"flan"} and {r[2] for r in body} == {"LastPoint"}
    assert [r[3] for r in body[:4]] == ["PearCorr", "RelAcc", "KendallTau", "CostPercent"]
    table = read_curve_table(fts_dir / "flan.csv")
    for i, ratio in enumerate(RATIOS):
        sel = last_point(table, TARGET / ratio, TARGET)
        want = _expected(table, ratio, sel.scores)
        for r in body[4 * i : 4 * i + 4]:
            assert float(r[4]) == pytest.approx(want[r[3]], abs=1e-3), r
    # Cross-check two cells against Lin et al.'s SubTuning, which is this same score.
    assert float(body[0][4]) == pytest.approx(60.9, abs=0.2)  # flan 1/8 PearCorr


def test_json_and_table_formats(fts_dir, toy_methods, capsys):
    argv = ["reproduce", "--data", str(fts_dir), "--methods", "LastPoint", "Flaky"]
    code, out_csv, _ = _run([*argv, "--format", "csv"], capsys)
    assert code == 0
    code, out_json, _ = _run([*argv, "--format", "json"], capsys)
    assert code == 0
    items = json.loads(out_json)
    rows = list(csv.DictReader(io.StringIO(out_csv)))
    assert len(items) == len(rows) == 2 * len(RATIOS) * 2 * 4  # datasets x budgets x methods
    for it, row in zip(items, rows, strict=True):
        assert set(it) == set(protocol.COLUMNS)
        assert [it[k] for k in protocol.COLUMNS[:4]] == [row[k] for k in protocol.COLUMNS[:4]]
        assert it["value_percent"] == pytest.approx(float(row["value_percent"]), abs=1e-4)
    code, text, _ = _run(argv, capsys)
    assert code == 0
    for ds in ("flan", "gigaword"):
        for metric in ("PearCorr", "RelAcc", "KendallTau", "CostPercent"):
            assert f"{ds} · {metric}" in text
    assert "LastPoint" in text and "mean" in text and "1/512" in text and "*" in text
    # mean column of flan PearCorr for LastPoint = mean of the seven csv values
    vals = [
        float(r["value_percent"])
        for r in rows
        if (r["dataset"], r["method"], r["metric"]) == ("flan", "LastPoint", "PearCorr")
    ]
    flan_pear = text.split("flan · PearCorr")[1].split("flan · RelAcc")[0]
    line = next(ln for ln in flan_pear.splitlines() if "LastPoint" in ln)
    assert line.replace("│", " ").split()[-1].lstrip("*") == f"{np.mean(vals):.1f}"


def test_failed_curve_warns_and_ranks_last(fts_dir, toy_methods, capsys):
    argv = ["reproduce", "--data", str(fts_dir / "gigaword.csv"), "--methods", "Flaky"]
    code, out, err = _run([*argv, "--format", "csv"], capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == len(RATIOS)
    assert lines[0] == (
        "lensllm: warning: gigaword 1/8 Flaky: 1 of 30 curves could not be fitted "
        "(MBZUAI/LaMini-GPT-124M); they rank last"
    )
    table = read_curve_table(fts_dir / "gigaword.csv")
    got = {
        r["metric"]: float(r["value_percent"])
        for r in csv.DictReader(io.StringIO(out))
        if r["budget"] == "1/8"
    }
    want = _expected(table, 8, flaky(table, TARGET / 8, TARGET).scores)
    for metric in ("PearCorr", "RelAcc"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-3)


# --- bad input ------------------------------------------------------------------------------


def _bad_tables(tmp_path: Path, fts_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bad csv, a fragment its error line must hold)."""
    with open(fts_dir / "flan.csv", newline="") as f:
        good = list(csv.reader(f))

    def write(name, rows):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        return path

    def edit(r, c, v):
        rows = [list(x) for x in good]
        rows[r][c] = v
        return rows

    def drop(col):
        j = good[0].index(col)
        return [r[:j] + r[j + 1 :] for r in good]

    cases = {
        "text": (edit(5, 3, "n/a"), "row 6, column '400': loss 'n/a'"),
        "nan": (edit(2, 4, "nan"), "row 3, column '800'"),
        "inf": (edit(2, 4, "inf"), "is infinite"),
        "zero": (edit(7, 9, "0"), "row 8, column '25600'"),
        "negative": (edit(7, 9, "-2.5"), "is not > 0"),
        "dupcol": ([[*r, r[3]] for r in good], "duplicated size column"),
        "hole": (drop("800"), "missing size column '800'"),
        "notarget": (drop("1638400"), "missing size column '1638400'"),
        "nozero": (drop("0"), "missing size column '0'"),
        "empty": ([], "empty file"),
        "notatable": ([["dataset", "budget"], ["flan", "1/8"]], "not a curve table"),
    }
    out = {}
    for name, (rows, frag) in cases.items():
        out[name] = (write(name, rows), frag)
    # Fewer than 3 points under 1/512 (D <= 3200): start the grid at 1600.
    keep = [0, *range(5, len(good[0]))]  # config name, then 1600 ... 1638400, size, family
    rows = [[r[0]] + [r[1]] + [r[j] for j in keep[1:]] for r in good]
    out["fewpoints"] = (write("fewpoints", rows), "budget 1/512 (D <= 3200) leaves 2 usable")
    return out


BAD = [
    "text",
    "nan",
    "inf",
    "zero",
    "negative",
    "dupcol",
    "hole",
    "notarget",
    "nozero",
    "empty",
    "notatable",
    "fewpoints",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exit_2(tmp_path, fts_dir, toy_methods, capsys, case):
    path, frag = _bad_tables(tmp_path, fts_dir)[case]
    out = tmp_path / "out.csv"
    out.write_text("previous results\n")
    argv = ["reproduce", "--data", str(fts_dir / "gigaword.csv"), str(path)]
    code, stdout, err = _run(
        [*argv, "--methods", "LastPoint", "--format", "csv", "--out", str(out)], capsys
    )
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("lensllm: error: "), err
    assert path.name in err and frag in err, err
    assert "Traceback" not in err
    assert out.read_text() == "previous results\n"
    assert not list(tmp_path.glob(".out.csv*"))


def test_library_checks_everything_before_running(tmp_path, fts_dir, toy_methods):
    """protocol.run raises the one-line error before any method runs."""
    calls = []

    def spy(table, budget_size, target):
        calls.append(table.name)
        return last_point(table, budget_size, target)

    good = read_curve_table(fts_dir / "flan.csv")
    bad_path, _ = _bad_tables(tmp_path, fts_dir)["fewpoints"]
    bad = read_curve_table(bad_path)
    with pytest.raises(LensLLMInputError, match=r"budget 1/512 .* need at least 3"):
        protocol.run([good, bad], {"Spy": spy})
    with pytest.raises(LensLLMInputError, match=r"unknown method 'Nope'"):
        protocol.run([good], ["LastPoint", "Nope"])
    with pytest.raises(LensLLMInputError, match="no curve tables"):
        protocol.run([], {"Spy": spy})
    assert calls == []


@pytest.mark.parametrize(
    ("extra", "frag"),
    [
        (["--methods", "LastPoint", "Oracle9"], "unknown method 'Oracle9'; choose from"),
        (["--data", "/nonexistent/x.csv"], "/nonexistent/x.csv: no such file or folder"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        (["--out", "/nonexistent/dir/out.csv"], "does not exist"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2(fts_dir, toy_methods, capsys, extra, frag):
    argv = ["reproduce", "--data", str(fts_dir / "flan.csv"), *extra]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lensllm"), err
    assert frag in err and "Traceback" not in err


def test_subprocess_bad_input_is_one_line(tmp_path):
    """A real process: exit 2, one line, no traceback, nothing written, fast (no jax)."""
    bad = tmp_path / "flan.csv"
    bad.write_text("config name,0,200,size\nm,1,x,5\n")
    out = tmp_path / "o.csv"
    env = {**os.environ, "LENSLLM_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lensllm_jax.cli",
            "reproduce",
            "--data",
            str(bad),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"lensllm: error: {bad}: row 2, column '200': loss 'x' of model 'm' is not a "
        "number; every loss must be a finite number > 0\n"
    )
    assert not out.exists()


# --- finding the data -----------------------------------------------------------------------


def test_no_arguments_uses_env_then_the_shipped_tables(
    tmp_path, fts_dir, toy_methods, monkeypatch, capsys
):
    monkeypatch.setenv("LENSLLM_DATA", str(fts_dir))
    code, out_env, _ = _run(["reproduce", "--methods", "LastPoint", "--format", "csv"], capsys)
    assert code == 0
    assert {r["dataset"] for r in csv.DictReader(io.StringIO(out_env))} == {"flan", "gigaword"}
    # No --data, no $LENSLLM_DATA: the FLAN and Gigaword tables inside the package, offline.
    monkeypatch.delenv("LENSLLM_DATA")

    def offline(url):
        raise OSError("network is unreachable")

    monkeypatch.setattr(download, "fetch_url", offline)
    code, out_shipped, err = _run(
        ["reproduce", "--methods", "LastPoint", "--format", "csv"], capsys
    )
    assert code == 0, err
    assert out_shipped == out_env
    # A dataset that is not shipped, offline and not cached: one clear line.
    code, out, err = _run(["reproduce", "--data", "wmt19", "--methods", "LastPoint"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "cannot download" in err and "LENSLLM_DATA" in err
    # ... downloaded once into $LENSLLM_CACHE/fts (fetcher faked: FLAN's bytes under the name).
    body = (fts_dir / "flan.csv").read_bytes()
    urls = []

    def fake_fetch(url):
        urls.append(url)
        return body

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    monkeypatch.setitem(download.BENCHMARK_SHA256, "wmt19.csv", hashlib.sha256(body).hexdigest())
    args = ["reproduce", "--data", "wmt19", "--methods", "LastPoint", "--format", "csv"]
    code, out_wmt, err = _run(args, capsys)
    assert code == 0, err
    assert urls == [download.benchmark_url("wmt19.csv")]
    assert (tmp_path / "cache" / "fts" / "wmt19.csv").read_bytes() == body
    assert {r["dataset"] for r in csv.DictReader(io.StringIO(out_wmt))} == {"wmt19"}


# --- end to end on the real benchmark -------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_reproduces_published(tmp_path, fts_dir, published_csv):
    """`lensllm reproduce` with no data arguments, all methods, in a real process (twice:
    the second run uses JAX's persistent compilation cache and must print the same)."""
    env = {**os.environ, "LENSLLM_DATA": str(fts_dir), "LENSLLM_CACHE": str(tmp_path / "c")}
    env.pop("LENSLLM_JIT_CACHE", None)
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.csv"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lensllm_jax.cli",
                "reproduce",
                "--format",
                "csv",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert any((tmp_path / "c" / "jax").iterdir())  # the compilation cache was filled
    rows = list(csv.DictReader(io.StringIO(outs[0])))
    methods = list(registry.method_names(ntk=False))
    assert len(rows) == 2 * len(RATIOS) * len(methods) * 4
    assert {r["method"] for r in rows} == set(methods)
    ours = {
        (r["dataset"], r["budget"], r["method"], r["metric"]): float(r["value_percent"])
        for r in rows
    }
    with open(published_csv, newline="") as f:
        published = list(csv.DictReader(f))
    exact = [p for p in published if p["method"] in ("AtS", "ZeroShot", "SubTuning", "ModelSize")]
    assert len(exact) == 112  # PearCorr and RelAcc, 2 datasets x 7 budgets, 4 methods
    for p in exact:
        key = (p["dataset"], p["budget"], p["method"], p["metric"])
        assert ours[key] == pytest.approx(float(p["value_percent"]), abs=0.2), key
