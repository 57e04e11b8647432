"""The CLI's one error boundary, its outputs, resume by content, and the Python API's
front doors, under hostile input: every expected failure is one ``lensllm: error:`` line
and exit code 2, a bug is a traceback plus a request for a report, `--out` replaces only
regular files, names are never read as markup, a resumed run recomputes exactly the
candidates whose files changed and rewrites report.json byte for byte."""

from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import shutil
import stat
from pathlib import Path

import hostile_fixtures as H
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensllm_jax.cli.render import render_ranking, render_table
from lensllm_jax.errors import HessianError, LensLLMInputError, NTKError

cli = importlib.import_module("lensllm_jax.cli.main")  # the module (the package exports main)
TABLE = H.curve_table_text(["m0", "m1", "m2"])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSLLM_JIT_CACHE", "0")
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if not x.startswith("lensllm: warning:")]
    assert len(lines) == 1 and lines[0].startswith("lensllm: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- the boundary


@pytest.mark.parametrize(
    "exc, words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/out.csv"), "/x/out.csv: No space"),
        (OSError(errno.EFBIG, "File too large"), "File too large"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (MemoryError(), "out of memory"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not valid Unicode"),
        (LensLLMInputError("bad\nthing", file="f.csv"), "f.csv: bad thing"),
    ],
)
def test_expected_failures_are_one_line_exit_2(monkeypatch, capsys, tmp_path, exc, words):
    def handler(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_select", handler)
    (tmp_path / "c.csv").write_text(TABLE)
    assert cli.main(["select", str(tmp_path / "c.csv"), "--target", "5000"]) == 2
    assert words in one_error_line(capsys)


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys, tmp_path):
    def handler(args):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(cli, "_cmd_select", handler)
    assert cli.main(["select", str(tmp_path / "c.csv"), "--target", "5000"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: a real bug" in err
    assert err.strip().splitlines()[-1].startswith("lensllm: internal error: this is a bug")


# ----------------------------------------------------------------------------- --out


def _out_targets(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "keep.txt").write_text("keep me")
    t = {
        "FIFO": tmp_path / "pipe",
        "symlink to a file": tmp_path / "l1",
        "symlink to /dev/null": tmp_path / "l2",
    }
    os.mkfifo(t["FIFO"])
    t["symlink to a file"].symlink_to(tmp_path / "keep.txt")
    t["symlink to /dev/null"].symlink_to("/dev/null")
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        t["device node"] = tmp_path / "null"
    return t


def test_out_refuses_what_is_not_a_regular_file(tmp_path, capsys):
    (tmp_path / "c.csv").write_text(TABLE)
    for what, target in _out_targets(tmp_path).items():
        before = os.lstat(target)
        argv = ["select", str(tmp_path / "c.csv"), "--target", "5000", "--out", str(target)]
        assert cli.main([*argv, "--methods", "ZeroShot"]) == 2, what
        line = one_error_line(capsys)
        assert "lensllm replaces only regular files" in line and str(target) in line
        assert (os.lstat(target).st_ino, os.lstat(target).st_mode) == (
            before.st_ino,
            before.st_mode,
        )
    assert (tmp_path / "keep.txt").read_text() == "keep me"


def test_out_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def full_disk(*a, **k):  # the temp file is created, then the write fails
        fd, name = real(*a, **k)
        os.close(fd)
        fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    (tmp_path / "c.csv").write_text(TABLE)
    out = tmp_path / "r.csv"
    argv = ["select", str(tmp_path / "c.csv"), "--target", "5000", "--out", str(out)]
    assert cli.main([*argv, "--methods", "ZeroShot"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(out) in line  # what, and where
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


# ----------------------------------------------------------------------------- names


NAMES = ["oops[/]", "[bold]x[/bold]", "[link=http://x]y", "a\\[b]", "[/]"]


def test_markup_in_names_is_printed_as_written():
    from lensllm_jax.selection.ranking import RankRow

    rows = [RankRow("LensLLM", i + 1, n, 1.0 + i, "ok", 0.5 / (i + 1)) for i, n in enumerate(NAMES)]
    text = render_ranking(rows, 1000.0)
    for n in NAMES:
        assert n in text
    from lensllm_jax.benchmark.protocol import Row

    rows2 = [Row("oops[/]", "1/8", "[bold]M", m, 1.0) for m in ("PearCorr", "RelAcc")]
    text2 = render_table(rows2)
    assert "oops[/]" in text2 and "[bold]M" in text2


def test_a_very_long_name_renders_quickly_and_stays_whole_in_csv():
    import time

    from lensllm_jax.selection.ranking import RankRow, rows_to_csv

    name = "x" * 50_000 + "[/]"
    rows = [RankRow("LensLLM", 1, name, 1.0, "ok", 0.6), RankRow("LensLLM", 2, "m", 1.1, "ok", 0.4)]
    t0 = time.perf_counter()
    text = render_ranking(rows, 1000.0)
    assert time.perf_counter() - t0 < 5  # rich alone: minutes (quadratic in a cell's length)
    assert "…" in text and "[/]" in text
    assert name in rows_to_csv(rows)


def test_select_with_markup_names_end_to_end(tmp_path, capsys):
    table = H.curve_table_text(["oops[/]", "[bold]x", "m2"])
    (tmp_path / "c.csv").write_text(table)
    assert (
        cli.main(
            [
                "select",
                str(tmp_path / "c.csv"),
                "--target",
                "5000",
                "--methods",
                "ZeroShot",
                "SubTuning",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "oops[/]" in out and "[bold]x" in out


def test_display_names_are_one_printable_line():
    from lensllm_jax.runner.checks import _unique_names

    names = _unique_names(["/a/gpt2 ", "/b/ lead", "/c/new\nline", "/d/bad\udcffbyte", "/e/t\tab"])
    assert names == ["gpt2", "lead", "new\\nline", "bad\\udcffbyte", "t\\tab"]
    assert _unique_names(["/x/a\nb", "/x/a\\nb"]) == ["x/a\\nb", "x/a\\nb#2"]
    for n in names:
        n.encode("utf-8")


# ----------------------------------------------------------------------------- API


def test_fit_law_refuses_bad_arguments_in_one_line():
    from lensllm_jax.core import fit

    d, loss = [200.0, 400.0, 800.0, 1600.0], [3.0, 2.6, 2.3, 2.1]
    for kw, words in [
        ({"fixed": {"beta": float("nan")}}, "fixed 'beta' must be finite and > 0"),
        ({"fixed": {"beta": float("inf")}}, "fixed 'beta' must be finite and > 0"),
        ({"fixed": {"beta": -1.0}}, "fixed 'beta' must be finite and > 0"),
        ({"fixed": {"beta": [0.5, 0.5]}}, "fixed 'beta' must be a number or 1 numbers"),
        ({"num_starts": 0}, "num_starts must be >= 1"),
        ({"num_starts": 2.5}, "num_starts must be a whole number"),
        ({"num_starts": True}, "num_starts must be a whole number"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"mask": [True, False]}, "mask does not match"),
    ]:
        with pytest.raises(LensLLMInputError, match=words) as info:
            fit.fit_law("rectified", d, loss, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(LensLLMInputError, match="loss_values must be numbers"):
        fit.fit_law("rectified", d, ["a", "b", "c", "d"])


@pytest.mark.slow
def test_fit_law_overflow_is_a_status_and_numpy_counts_work():
    from lensllm_jax.core import fit
    from lensllm_jax.core.fit import FitStatus

    d = [200.0, 400.0, 800.0, 1600.0]
    res = fit.fit_law("rectified", d, [1e308] * 4)
    assert res.status[0] == FitStatus.NONFINITE and np.isnan(res.params["B"][0])
    good = fit.fit_law("rectified", d, [3.0, 2.6, 2.3, 2.1], num_starts=np.int64(4))
    assert good.ok[0] and np.all(np.isfinite(good.raw))


def test_predict_refuses_sizes_and_parameters_out_of_range():
    from lensllm_jax.core import laws

    p = {"B": 10.0, "beta": 0.5, "E": 1.0, "D_l": 5.0}
    for args, words in [
        ((p, -5.0), "sizes d must be numbers >= 0"),
        ((p, np.array([-1.0, 2.0])), "sizes d must be numbers >= 0"),
        ((p, float("nan")), "sizes d must be numbers >= 0"),
        (({**p, "B": -1.0}, 10.0), "parameter 'B' must be finite and >= 0"),
        (({**p, "E": float("inf")}, 10.0), "parameter 'E' must be finite and >= 0"),
        (({"B": 1.0}, 10.0), "needs parameter 'beta'"),
        ((p, "x"), "must be numbers"),
    ]:
        with pytest.raises(LensLLMInputError, match=words):
            laws.predict("rectified", *args)


def test_predict_keeps_nan_for_failed_fits_and_computes_the_law():
    from lensllm_jax.core import laws

    p = {"B": 10.0, "beta": 0.5, "E": 1.0, "D_l": 5.0}
    assert np.isnan(laws.predict("rectified", {**p, "B": float("nan")}, 10.0))
    np.testing.assert_allclose(laws.predict("rectified", p, 100.0), 10.0 / 15.0 + 1.0, rtol=1e-12)


def test_ntk_test_loss_refuses_what_is_no_gram_matrix():
    from lensllm_jax.core import ntk_loss

    r = np.ones(2)
    for args, words in [
        ((np.array([[1.0, 2.0], [0.0, 1.0]]), r, 1.0, 0.1), "not symmetric"),
        ((np.array([[np.nan, 0.0], [0.0, 1.0]]), r, 1.0, 0.1), "non-finite"),
        ((np.ones((2, 3)), r, 1.0, 0.1), "must be \\(..., N, N\\)"),
        ((np.eye(2), np.ones(3), 1.0, 0.1), "residual has shape"),
        ((np.eye(2), r, -1.0, 0.1), "t must be finite and >= 0"),
        ((np.eye(2), r, 1.0, -0.1), "eta must be finite and >= 0"),
    ]:
        with pytest.raises(NTKError, match=words):
            ntk_loss.ntk_test_loss(*args)
    # Round-off asymmetry of a float32 Gram matrix passes; the value is exact.
    theta = (np.diag([1.0, 2.0]) + 1e-7 * np.array([[0, 1], [0, 0]])).astype(np.float32)
    got = float(ntk_loss.ntk_test_loss(theta, r.astype(np.float32), 1.0, 0.1))
    np.testing.assert_allclose(got, np.exp(-0.2) + np.exp(-0.4), rtol=1e-5)


def test_hessian_counts_accept_numpy_integers():
    import jax
    import jax.numpy as jnp

    from lensllm_jax.core import hessian

    c = jnp.arange(1.0, 5.0)
    params = {"w": jnp.ones(4)}

    def loss(p):
        return 0.5 * jnp.sum(c * p["w"] ** 2)  # Hessian diag(1, 2, 3, 4): trace 10

    est = hessian.hutchinson_trace(loss, params, jax.random.key(0), np.int64(4))
    np.testing.assert_allclose(float(est.mean), 10.0, rtol=1e-6)  # exact for a diagonal H
    for bad in (True, 2.0, 1, np.int64(0)):
        with pytest.raises(HessianError, match="num_probes must be an int >= 2"):
            hessian.hutchinson_trace(loss, params, jax.random.key(0), bad)
    with pytest.raises(HessianError, match="num_iters must be an int >= 1"):
        hessian.top_eigenvalue(loss, params, jax.random.key(0), 0)


# ----------------------------------------------------------------------------- Kendall τ


def _tau_pairs(s: np.ndarray, t: np.ndarray) -> float:
    """τ_b from its definition, pair by pair (the independent reference)."""
    num = n_s = n_t = 0
    for i, j in itertools.combinations(range(s.size), 2):
        a, b = np.sign(s[i] - s[j]), np.sign(t[i] - t[j])
        num += a * b
        n_s += a != 0
        n_t += b != 0
    return float("nan") if n_s == 0 or n_t == 0 else 100.0 * num / np.sqrt(n_s * n_t)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.one_of(st.integers(0, 5), st.just(None))),
        min_size=0,
        max_size=40,
    )
)
def test_kendall_tau_equals_its_pairwise_definition(pairs):
    from lensllm_jax.benchmark import metrics

    s = np.array([np.nan if b is None else float(b) for _, b in pairs])
    t = np.array([float(a) for a, _ in pairs])
    got = metrics.kendall_tau_percent(s, t)
    keep = np.isfinite(s)
    want = _tau_pairs(s[keep], t[keep]) if keep.sum() >= 2 else float("nan")
    assert (np.isnan(got) and np.isnan(want)) or abs(got - want) < 1e-9


def test_kendall_tau_of_many_models_in_small_memory():
    import tracemalloc

    from lensllm_jax.benchmark import metrics

    rng = np.random.default_rng(0)
    s, t = rng.integers(0, 300, 20_000).astype(float), rng.normal(size=20_000)
    tracemalloc.start()
    got = metrics.kendall_tau_percent(s, t)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20  # the pairwise form needed 20,000² entries (gigabytes)
    sub = slice(0, 300)  # the value, against the definition, on a subset
    assert abs(metrics.kendall_tau_percent(s[sub], t[sub]) - _tau_pairs(s[sub], t[sub])) < 1e-9
    assert np.isfinite(got) and abs(got) < 5  # independent draws: τ near 0


# ----------------------------------------------------------------------------- run, resume

RUN = [
    *("--sizes", "4", "8", "16", "--test-size", "4", "--probe-size", "2", "--max-length"),
    *("24", "--epochs", "1", "--min-steps", "1", "--batch-size", "4", "--lr", "1e-3"),
    *("--no-ntk", "-q", "--format", "csv"),
]


def test_a_short_position_table_is_refused_before_anything(tmp_path, capsys):
    """A GPT-2 whose table holds 8 positions, run with --max-length 24 (it would clamp)."""
    cfg = {**H.GPT2_CONFIG, "n_positions": 8}
    m = H.hf_folder(tmp_path / "short", H.st_from_arrays(H.gpt2_arrays(cfg)), cfg)
    (tmp_path / "task.jsonl").write_text("\n".join(H.task_lines(32)) + "\n")
    argv = ["run", "--models", str(m), "--data", str(tmp_path / "task.jsonl"), *RUN]
    assert cli.main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "its position table has 8 rows, fewer than the 24 tokens of --max-length" in line
    assert "give --max-length 8 or less" in line
    assert not (tmp_path / "out").exists()


def test_out_dir_outputs_that_are_not_regular_files_are_refused_first(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "report.json").symlink_to("/etc/hostname")
    argv = ["run", "--models", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), *RUN]
    assert cli.main([*argv, "--out-dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert "report.json: is a symbolic link; lensllm replaces only regular files" in line
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.json"]


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    H.tiny_hf(root / "a", "gpt2", 0)
    H.tiny_hf(root / "b", "llama", 1)
    (root / "task.jsonl").write_text("\n".join(H.task_lines(32)) + "\n")
    return root


def _argv(world: Path, models: list[Path], out: Path) -> list[str]:
    return [
        "run",
        "--models",
        *map(str, models),
        "--data",
        str(world / "task.jsonl"),
        *RUN,
        "--out-dir",
        str(out),
    ]


@pytest.mark.slow
def test_resume_is_by_content_and_rewrites_report_json_byte_for_byte(
    world, tmp_path, monkeypatch, capsys
):
    from lensllm_jax.runner import measure, store

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(world / "a", a)
    shutil.copytree(world / "b", b)
    out = tmp_path / "out"
    calls: list[str] = []
    real = measure.measure_candidate

    def counting(cand, *args, **kw):
        calls.append(cand.name)
        return real(cand, *args, **kw)

    monkeypatch.setattr(measure, "measure_candidate", counting)

    # 1. A full disk while saving the second result: one line that says how to resume.
    real_save = store.save_result

    def full(path, res):
        if res.name == "b":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, res)

    monkeypatch.setattr(store, "save_result", full)
    assert cli.main(_argv(world, [a, b], out)) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line
    assert f"1 of 2 candidates' results are saved in {out}: rerun the same command" in line
    monkeypatch.setattr(store, "save_result", real_save)

    # 2. Rerun: only b is measured; then a plain rerun measures nothing, same bytes.
    calls.clear()
    assert cli.main(_argv(world, [a, b], out)) == 0
    assert calls == ["b"]
    report = (out / "report.json").read_bytes()
    calls.clear()
    assert cli.main(_argv(world, [a, b], out)) == 0
    assert calls == [] and (out / "report.json").read_bytes() == report

    # 3. a's weights change in place: a alone is measured again, with another zero-shot.
    header, data = H.st_read(a / "model.safetensors")
    lo, hi = header["transformer.wte.weight"]["data_offsets"]
    buf = bytearray(data)
    buf[lo:hi] = (np.frombuffer(bytes(buf[lo:hi]), np.float32) * 3).astype(np.float32).tobytes()
    (a / "model.safetensors").write_bytes(H.st_bytes(header, bytes(buf)))
    calls.clear()
    capsys.readouterr()
    assert cli.main(_argv(world, [a, b], out)) == 0
    assert calls == ["a"]
    new = json.loads((out / "report.json").read_text())["candidates"]
    old = json.loads(report)["candidates"]
    assert new[0]["zero_shot"] != old[0]["zero_shot"] and new[1] == old[1]
    assert new[0]["digest"] != old[0]["digest"]


@pytest.mark.slow
def test_a_half_created_out_dir_is_recovered_and_names_are_escaped(world, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "candidates").mkdir(parents=True)
    (out / ".manifest.json.k1x9.part").write_text("{")
    # markup rich would eat ("[bold]") and a trailing space in the folder's name (a folder
    # name cannot hold "/", so "oops[/]" is tested through curve tables instead)
    m = tmp_path / "oops[bold]x "
    shutil.copytree(world / "a", m)
    argv = _argv(world, [m], out)
    argv[argv.index("--format") + 1] = "table"
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "oops[bold]x" in text  # not eaten as markup
    assert not list(out.glob(".*.part"))
    assert "oops[bold]x," in (out / "curves.csv").read_text()
