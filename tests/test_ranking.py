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
from lensllm_jax.selection import ranking, registry

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
