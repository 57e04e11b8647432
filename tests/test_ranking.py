"""`lensllm select`: ranking a user's own candidates from their small fine-tunes."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from lensllm_jax import cli
from lensllm_jax.data.curves import read_curve_table
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.selection import confidence, ranking, registry

KEEP = ("config name", "0", "200", "400", "800", "1600", "3200", "6400", "size", "family")


@pytest.fixture(scope="module")
def small_table(fts_dir, tmp_path_factory):
    """FLAN cut to the sizes a user would have after cheap fine-tunes (D <= 6,400)."""
    path = tmp_path_factory.mktemp("select") / "mytask.csv"
    with open(fts_dir / "flan.csv", newline="") as src, open(path, "w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=KEEP)
        writer.writeheader()
        for row in csv.DictReader(src):
            writer.writerow({k: row[k] for k in KEEP})
    return path


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors exit from parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_rank_orders_by_each_methods_prediction(small_table):
    table = read_curve_table(small_table)
    rows = ranking.rank(table, 1_638_400, ["AtS", "LensLLM"])
    for name in ("AtS", "LensLLM"):
        scores = registry.METHODS[name](table, 6400.0, 1_638_400.0).scores
        got = [r for r in rows if r.method == name]
        assert [r.rank for r in got] == list(range(1, table.num_models + 1))
        assert [r.model for r in got] == [table.models[i] for i in np.argsort(scores)]
        np.testing.assert_allclose([r.score for r in got], np.sort(scores), rtol=1e-12)


def test_cli_select_formats_and_out(small_table, tmp_path, capsys):
    code, out, err = _run(
        ["select", str(small_table), "--target", "1638400", "--format", "csv"], capsys
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == ranking.COLUMNS
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 31)]
    assert {r["method"] for r in rows} == {"LensLLM"}
    dest = tmp_path / "rank.json"
    code, out, err = _run(
        ["select", str(small_table), "--target", "1e6", "--format", "json", "--out", str(dest)],
        capsys,
    )
    assert code == 0 and out == "", err
    items = json.loads(dest.read_text())
    assert items[0]["rank"] == 1 and items[0]["status"] == "ok"
    code, out, err = _run(["select", str(small_table), "--target", "1e6"], capsys)
    assert code == 0 and "LensLLM · predicted loss" in out and out.count("\n") > 30


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "3200"], "target 3200 must be larger than the largest fine-tuned size"),
        (["--target", "1e6", "--methods", "Nope"], "unknown method 'Nope'"),
        ([], "the following arguments are required: --target"),
    ],
)
def test_cli_select_bad_input_is_one_line(small_table, tmp_path, capsys, argv, message):
    dest = tmp_path / "never.csv"
    code, out, err = _run(["select", str(small_table), *argv, "--out", str(dest)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert "Traceback" not in err and not dest.exists()


def test_missing_file_and_too_few_sizes(tmp_path, capsys):
    code, _, err = _run(["select", str(tmp_path / "nope.csv"), "--target", "1e6"], capsys)
    assert code == 2 and "no such file" in err and err.count("\n") == 1
    two = tmp_path / "two.csv"
    two.write_text("config name,0,200,400,size,family\nm,4,3,2.9,100,f\nn,5,3.5,3.2,50,f\n")
    with pytest.raises(LensLLMInputError, match="need at least 3"):
        ranking.rank(read_curve_table(two), 1e6)


def _table_from(losses, zero_shot, tmp_path, name="flat"):
    sizes = (200, 400, 800, 1600)
    path = tmp_path / f"{name}.csv"
    lines = ["config name,0," + ",".join(map(str, sizes)) + ",size,family"]
    for i, (row, z) in enumerate(zip(losses, zero_shot, strict=True)):
        lines.append(f"m{i},{z}," + ",".join(f"{v:.6f}" for v in row) + f",{10**8 * (i + 1)},f")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("shape", ["rising", "flat"])
def test_curves_that_do_not_fall_are_marked_not_ranked_with_p_best(tmp_path, capsys, shape):
    # Issue 12, item 6: every curve rising (or flat) -> no scaling law applies.
    rng = np.random.default_rng(0)
    d = np.array([200.0, 400.0, 800.0, 1600.0])
    if shape == "rising":
        losses = [2.0 + 0.1 * i + 0.05 * np.log2(d / 200) for i in range(4)]
    else:
        losses = [2.0 + 0.1 * i + 1e-5 * rng.standard_normal(4) for i in range(4)]
    path = _table_from(losses, [3.0, 3.1, 3.2, 3.3], tmp_path, shape)
    table = read_curve_table(path)
    with pytest.warns(UserWarning, match="no candidate's loss falls"):
        rows = ranking.rank(table, 1e5, ["LensLLM", "AtS"])
    usable = [r for r in rows if r.status != "failed"]
    assert usable and all(r.status == "not falling" for r in usable)
    assert all(np.isnan(r.p_best) for r in rows)
    assert ranking.credible_set_text([r for r in rows if r.method == "LensLLM"]) == ""
    code, out, err = _run(
        ["select", str(path), "--target", "1e5", "--methods", "AtS", "LensLLM"], capsys
    )
    assert code == 0 and "P(best)" not in out and "not falling" in out
    assert err.count("\n") >= 1 and "lensllm: warning:" in err and "falls" in err


def test_one_falling_curve_keeps_the_ranking_and_its_p_best(tmp_path):
    d = np.array([200.0, 400.0, 800.0, 1600.0])
    losses = [2.0 - 0.1 * np.log2(d / 200), 2.1 + 0.0 * d, 2.2 + 0.01 * np.log2(d / 200)]
    table = read_curve_table(_table_from(losses, [3.0, 3.1, 3.2], tmp_path, "mixed"))
    falls = confidence.curve_falls(table, 1600.0)
    np.testing.assert_array_equal(falls, [True, False, False])
    rows = ranking.rank(table, 1e5)
    assert rows[0].model == "m0" and rows[0].status == "ok" and rows[0].p_best > 0.5
    assert "not falling" not in {r.status for r in rows}
    np.testing.assert_allclose(np.nansum([r.p_best for r in rows]), 1.0, rtol=1e-9)
