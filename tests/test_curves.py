"""Curve-table reading, protocol checks and benchmark location/download (no network)."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from lensllm_jax.benchmark import download
from lensllm_jax.data.curves import (
    CurveTable,
    check_budget,
    check_protocol,
    read_curve_table,
    read_curve_tables,
)
from lensllm_jax.errors import DataUnavailableError, LensLLMInputError

TARGET = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)
SIZES = [200 * 2**k for k in range(14)]  # 200 ... 1,638,400


def _grid(n_models: int = 4, sizes=SIZES) -> list[list[str]]:
    """A small valid FTS table as rows of cells: loss = 2 + 3 / (1 + D^0.3) + model offset."""
    header = ["config name", "0", *map(str, sizes), "size", "family"]
    rows = [header]
    for m in range(n_models):
        losses = [5.0 + m] + [2 + 0.1 * m + 3 / (1 + d**0.3) for d in sizes]
        rows.append([f"org/model-{m}", *(repr(v) for v in losses), str(10**8 * (m + 1)), "fam"])
    return rows


def _write(tmp_path: Path, rows, name="toy.csv", *, bom=False, newline="\n") -> Path:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=newline).writerows(rows)
    text = buf.getvalue()
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _plain_parse(path: Path):
    """Independent reference: split lines by hand."""
    lines = path.read_text().strip().split("\n")
    header = lines[0].split(",")
    body = [ln.split(",") for ln in lines[1:]]
    return header, body


# --- reading real and valid files -------------------------------------------------------


@pytest.mark.parametrize("name", ["flan", "gigaword"])
def test_reads_benchmark(fts_dir, name):
    path = fts_dir / f"{name}.csv"
    t = read_curve_table(path)
    header, body = _plain_parse(path)
    assert t.name == name and t.num_models == len(body) == 30
    np.testing.assert_array_equal(t.sizes, np.array(header[2:-2], dtype=float))
    assert t.sizes[0] == 200 and t.sizes[-1] == TARGET
    np.testing.assert_array_equal(t.zero_shot, [float(r[1]) for r in body])
    np.testing.assert_array_equal(t.losses, [[float(x) for x in r[2:-2]] for r in body])
    np.testing.assert_array_equal(t.n_params, [float(r[-2]) for r in body])
    assert t.models == tuple(r[0] for r in body)
    assert t.families == tuple(r[-1] for r in body)
    assert t.losses.dtype == np.float64 and t.losses.shape == (30, 14)
    np.testing.assert_array_equal(t.column(TARGET), t.losses[:, -1])
    np.testing.assert_array_equal(t.column(0), t.zero_shot)
    check_protocol(t, TARGET, RATIOS)


def _same(a: CurveTable, b: CurveTable) -> None:
    assert a.models == b.models and a.families == b.families
    for f in ("sizes", "losses", "zero_shot", "n_params"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_odd_but_valid_layouts(tmp_path):
    rows = _grid()
    ref = read_curve_table(_write(tmp_path, rows))
    # BOM + CRLF
    _same(ref, read_curve_table(_write(tmp_path, rows, "bom.csv", bom=True, newline="\r\n")))
    # extra columns anywhere, shuffled column order, blank lines, padded cells
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows[0]))
    shuffled = [[r[j] for j in order] for r in rows]
    extra = [
        ["notes", *shuffled[0], "source"],
        *[[f"n{i}", *r, "x"] for i, r in enumerate(shuffled[1:])],
    ]
    extra.insert(2, [])
    extra[3] = [f" {c} " for c in extra[3]]
    t = read_curve_table(_write(tmp_path, [*extra, [], []], "odd.csv"))
    _same(ref, t)
    assert t.name == "odd"
    # "1.6e6"-style headers and a missing family column are fine too
    no_family = [r[:-1] for r in rows]
    no_family[0][2] = "2e2"
    t = read_curve_table(_write(tmp_path, no_family, "nofam.csv"))
    np.testing.assert_array_equal(t.losses, ref.losses)
    assert t.families == ("",) * 4


def test_shuffled_real_file(tmp_path, fts_dir):
    ref = read_curve_table(fts_dir / "flan.csv")
    with open(fts_dir / "flan.csv", newline="") as f:
        rows = list(csv.reader(f))
    order = np.random.default_rng(1).permutation(len(rows[0]))
    t = read_curve_table(_write(tmp_path, [[r[j] for j in order] for r in rows], "flan.csv"))
    _same(ref, t)


# --- bad input: one line naming file, row and column --------------------------------------


def _bad(path: Path, *fragments: str) -> LensLLMInputError:
    with pytest.raises(LensLLMInputError) as info:
        read_curve_table(path)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return info.value


def _edit(rows, r, c, value):
    rows = [list(x) for x in rows]
    rows[r][c] = value
    return rows


@pytest.mark.parametrize(
    ("value", "which", "problem"),
    [
        ("abc", "'abc' of model 'org/model-", "is not a number"),
        ("", "loss of model", "is empty"),
        ("nan", "of model", "is NaN"),
        ("NaN", "of model", "is NaN"),
        ("inf", "of model", "is infinite"),
        ("-inf", "of model", "is infinite"),
        ("0", "'0' of model", "is not > 0"),
        ("-1.5", "of model", "is not > 0"),
    ],
)
def test_bad_loss_values(tmp_path, value, which, problem):
    rows = _edit(_grid(), 3, 3, value)  # row 4 of the file (model-2), column '400'
    err = _bad(_write(tmp_path, rows), "row 4", "column '400'", which, problem, "model-2'")
    assert (err.row, err.column) == (4, "400")
    # the zero-shot column and the parameter count are checked the same way
    _bad(_write(tmp_path, _edit(_grid(), 1, 1, value), "z.csv"), "row 2", "column '0'", problem)
    _bad(_write(tmp_path, _edit(_grid(), 2, -2, value), "p.csv"), "row 3", "column 'size'")


def test_bad_structure(tmp_path):
    g = _grid()
    _bad(_write(tmp_path, [], "empty.csv"), "empty file")
    (tmp_path / "blank.csv").write_text("\n \r\n")
    _bad(tmp_path / "blank.csv", "empty file")
    _bad(_write(tmp_path, g[:1], "header.csv"), "row 2", "no model rows")
    # not a curve table
    _bad(_write(tmp_path, [["a", "b"], ["1", "2"]], "other.csv"), "row 1", "not a curve table")
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    _bad(tmp_path / "bin.csv", "not a curve table")
    (tmp_path / "json.csv").write_text('{"config name": [1, 2]}')
    _bad(tmp_path / "json.csv", "not a curve table")

    # missing size columns
    def drop(rows, name):
        return [[c for c, h in zip(r, rows[0], strict=True) if h != name] for r in rows]

    _bad(_write(tmp_path, drop(g, "0"), "nozero.csv"), "row 1", "'0'", "zero-shot")
    _bad(_write(tmp_path, drop(g, "size"), "noparams.csv"), "row 1", "'size'")
    only_zero = [r[:2] + r[-2:] for r in g]
    _bad(_write(tmp_path, only_zero, "nosizes.csv"), "no positive size columns")
    # duplicated size columns, also when spelled differently
    dup = [[*r, r[3]] for r in g]
    _bad(_write(tmp_path, dup, "dup.csv"), "row 1", "column '400'", "duplicated size column")
    dup[0][-1] = "400.0"
    _bad(_write(tmp_path, dup, "dup2.csv"), "column '400.0'", "same size as column '400'")
    _bad(_write(tmp_path, _edit(g, 0, 3, "-200"), "neg.csv"), "column '-200'", ">= 0")
    dupname = [[*r, r[0]] for r in g]
    _bad(_write(tmp_path, dupname, "dupname.csv"), "column 'config name'", "duplicated column")
    # ragged rows and duplicated models
    ragged = [list(r) for r in g]
    ragged[2] = ragged[2][:-3]
    _bad(_write(tmp_path, ragged, "ragged.csv"), "row 3", "cells where the header has")
    twice = [*g, g[1]]
    _bad(_write(tmp_path, twice, "twice.csv"), "row 6", "already on row 2")
    _bad(tmp_path / "missing.csv", "file not found")
    _bad(tmp_path, "folder")


def test_published_table_is_not_a_curve_table(published_csv):
    with pytest.raises(LensLLMInputError, match="not a curve table"):
        read_curve_table(published_csv)


def test_same_dataset_name_twice(tmp_path):
    a = _write(tmp_path, _grid(), "flan.csv")
    (tmp_path / "sub").mkdir()
    b = _write(tmp_path / "sub", _grid(), "flan.csv")
    with pytest.raises(LensLLMInputError, match="already used"):
        read_curve_tables([a, b])


# --- protocol checks ------------------------------------------------------------------------


def test_check_budget_and_protocol(tmp_path):
    t = read_curve_table(_write(tmp_path, _grid()))
    check_protocol(t, TARGET, RATIOS)
    check_budget(t, TARGET / 512)  # 200 ... 3200: 5 sizes
    # Sizes from 1600 up: budget 1/512 (D <= 3200) keeps 1600 and 3200 only.
    t = read_curve_table(_write(tmp_path, _grid(sizes=SIZES[3:]), "short.csv"))
    check_budget(t, TARGET / 256)  # 1600, 3200, 6400
    with pytest.raises(LensLLMInputError) as info:
        check_protocol(t, TARGET, RATIOS)
    msg = str(info.value)
    assert "short.csv" in msg and "budget 1/512" in msg and "2 usable sizes (1600, 3200)" in msg
    assert "column '1600'" in msg and "\n" not in msg
    # target missing
    t = read_curve_table(_write(tmp_path, _grid(sizes=SIZES[:-1]), "notarget.csv"))
    with pytest.raises(LensLLMInputError, match=r"notarget.csv: row 1: missing .*'1638400'"):
        check_protocol(t, TARGET, RATIOS)
    # a hole in the doubling grid is a deleted column
    holed = [s for s in SIZES if s != 800]
    t = read_curve_table(_write(tmp_path, _grid(sizes=holed), "holed.csv"))
    with pytest.raises(LensLLMInputError, match=r"holed.csv: row 1: missing size column '800'"):
        check_protocol(t, TARGET, RATIOS)


# --- locating and downloading the benchmark -------------------------------------------------


def test_resolve_explicit_and_env(tmp_path, fts_dir):
    f = fts_dir / "flan.csv"
    assert download.resolve_data([f], env={}) == [f]
    assert download.resolve_data([fts_dir], env={}) == sorted(fts_dir.glob("*.csv"))
    assert download.resolve_data(None, env={"LENSLLM_DATA": str(fts_dir)}) == sorted(
        fts_dir.glob("*.csv")
    )
    with pytest.raises(LensLLMInputError, match="no such file"):
        download.resolve_data([tmp_path / "nope.csv"], env={})
    with pytest.raises(LensLLMInputError, match=r"no \.csv files"):
        download.resolve_data([tmp_path], env={})
    with pytest.raises(LensLLMInputError, match="LENSLLM_DATA is not a folder"):
        download.resolve_data(None, env={"LENSLLM_DATA": str(tmp_path / "nope")})


def test_checksums_match_shared_copies(fts_dir):
    for name in ("flan.csv", "gigaword.csv"):
        assert download.sha256_file(fts_dir / name) == download.BENCHMARK_SHA256[name]
    url = download.benchmark_url("wmt19.csv")
    assert url == (
        "https://raw.githubusercontent.com/linhaowei1/Fine-tuning-Scaling-Law/"
        f"{download.BENCHMARK_COMMIT}/benchmark/wmt19.csv"
    )
    assert len(download.BENCHMARK_COMMIT) == 40


class FakeFetcher:
    """Serves the shared copies (no network); records the URLs asked for."""

    def __init__(self, fts_dir: Path, corrupt: bool = False, fail: bool = False, serve=None):
        self.fts_dir, self.corrupt, self.fail, self.urls = fts_dir, corrupt, fail, []
        self.serve = serve or {}  # asked-for name -> shared file served in its place

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.fail:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        name = url.rsplit("/", 1)[1]
        body = (self.fts_dir / self.serve.get(name, name)).read_bytes()
        return body + b"tampered" if self.corrupt else body


FILES = ("flan.csv", "gigaword.csv")


def test_download_into_cache(tmp_path, fts_dir, monkeypatch):
    cache = tmp_path / "cache"
    fetch = FakeFetcher(fts_dir)
    paths = download.ensure_benchmark(cache, FILES, fetcher=fetch)
    assert paths == [cache / f for f in FILES]
    assert fetch.urls == [download.benchmark_url(f) for f in FILES]
    for p in paths:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == download.BENCHMARK_SHA256[p.name]
    assert sorted(x.name for x in cache.iterdir()) == list(FILES)  # no temp files left
    # second call: served from the cache
    download.ensure_benchmark(cache, FILES, fetcher=fetch)
    assert len(fetch.urls) == 2
    # a corrupted cached copy is fetched again
    (cache / "flan.csv").write_text("config name,0\n")
    download.ensure_benchmark(cache, FILES, fetcher=fetch)
    assert fetch.urls[2:] == [download.benchmark_url("flan.csv")]
    assert download.sha256_file(cache / "flan.csv") == download.BENCHMARK_SHA256["flan.csv"]
    # resolve_data fetches a dataset that is not shipped into $LENSLLM_CACHE/fts
    monkeypatch.setitem(
        download.BENCHMARK_SHA256, "wmt19.csv", download.BENCHMARK_SHA256["flan.csv"]
    )
    env = {"LENSLLM_CACHE": str(tmp_path / "root")}
    fetch = FakeFetcher(fts_dir, serve={"wmt19.csv": "flan.csv"})
    got = download.resolve_data(["wmt19"], env=env, fetcher=fetch)
    assert got == [tmp_path / "root" / "fts" / "wmt19.csv"]
    assert download.cache_root({"HOME": "/x", "XDG_CACHE_HOME": "/c"}) == Path("/c/lensllm_jax")


def test_download_failures_leave_nothing(tmp_path, fts_dir):
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError) as info:
        download.ensure_benchmark(cache, FILES, fetcher=FakeFetcher(fts_dir, corrupt=True))
    msg = str(info.value)
    assert "flan.csv" in msg and "SHA-256" in msg and "--data" in msg and "\n" not in msg
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(DataUnavailableError, match=r"cannot download .*name resolution.*--data"):
        download.ensure_benchmark(cache, FILES, fetcher=FakeFetcher(fts_dir, fail=True))
    assert not cache.exists() or not any(cache.iterdir())


def test_atomic_write_on_failure(tmp_path, fts_dir, monkeypatch):
    cache = tmp_path / "cache"

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(download.os, "replace", boom)
    with pytest.raises(DataUnavailableError, match="cannot write the cache"):
        download.ensure_benchmark(cache, FILES, fetcher=FakeFetcher(fts_dir))
    assert list(cache.iterdir()) == []  # neither the file nor its temp copy


def test_default_is_the_shipped_tables_byte_for_byte(tmp_path, fts_dir):
    env = {"LENSLLM_CACHE": str(tmp_path / "root")}
    got = download.resolve_data(None, env=env, fetcher=FakeFetcher(fts_dir, fail=True))
    assert [p.name for p in got] == ["flan.csv", "gigaword.csv"]
    for p in got:
        assert p.read_bytes() == (fts_dir / p.name).read_bytes()
        assert download.sha256_file(p) == download.BENCHMARK_SHA256[p.name]
    assert (got[0].parent / "LICENSE").is_file()  # the licence travels with the data
    assert download.resolve_data(["gigaword"], env=env) == got[1:]
    # a corrupt download is an error, never papered over
    with pytest.raises(DataUnavailableError, match="SHA-256"):
        download.resolve_data(
            ["wmt19"],
            env=env,
            fetcher=FakeFetcher(fts_dir, corrupt=True, serve={"wmt19.csv": "flan.csv"}),
        )


def test_standard_error_columns_round_trip_and_are_checked(tmp_path):
    from lensllm_jax.data.curves import CurveTable, write_curve_table

    table = CurveTable(
        name="t",
        models=("a", "b"),
        sizes=np.array([200.0, 400.0]),
        losses=np.array([[2.5, 2.25], [2.75, 2.5]]),
        zero_shot=np.array([3.0, 3.5]),
        n_params=np.array([1e6, 2e6]),
        families=("x", "y"),
        loss_se=np.array([[0.01, np.nan], [0.1 / 3, 0.0]]),
    )
    path = write_curve_table(table, tmp_path / "t.csv")
    assert path.read_text().splitlines()[0].endswith(",family,se_200,se_400")
    back = read_curve_table(path)
    np.testing.assert_array_equal(back.loss_se, table.loss_se)  # NaN where unknown
    np.testing.assert_array_equal(back.losses, table.losses)
    plain_path = tmp_path / "p.csv"
    plain_path.write_text("config name,0,200,size\na,3,2,5\n")
    plain = read_curve_table(plain_path)
    assert plain.loss_se is None
    bad = {
        "config name,0,200,size,se_400\na,3,2,5,0.1\n": "standard-error column without its size",
        "config name,0,200,size,se_200\na,3,2,5,-1\n": "standard error '-1' of model 'a'",
        "config name,0,200,size,se_200,se_2e2\na,3,2,5,1,1\n": "duplicated standard-error",
    }
    for i, (text, message) in enumerate(bad.items()):
        bad_path = tmp_path / f"bad{i}.csv"
        bad_path.write_text(text)
        with pytest.raises(LensLLMInputError, match=message):
            read_curve_table(bad_path)
