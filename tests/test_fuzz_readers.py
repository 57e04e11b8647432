"""Fuzzing the readers of user files: whatever bytes a file holds, a reader returns its
values or raises one `LensLLMInputError` line; it never blocks on a FIFO, never streams a
device, never follows nesting or digits into unbounded work, and never replaces anything
but a regular file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import string
from pathlib import Path

import hostile_fixtures as H
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensllm_jax.data import _files, curves, spectra, text
from lensllm_jax.errors import LensLLMInputError

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body blocks."""

    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


def refuses(fn, *args) -> str:
    with pytest.raises(LensLLMInputError) as info:
        fn(*args)
    return one_line(info.value)


# ----------------------------------------------------------------------------- bounded JSON

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**18), 10**18),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40), json_value.map(json.dumps)))
def test_load_json_returns_or_refuses_in_one_line(raw):
    try:
        _files.load_json(raw, where="x.json")
    except LensLLMInputError as err:
        assert one_line(err).startswith("x.json: ")


@FAST
@given(json_value)
def test_load_json_round_trips_what_json_writes(value):
    """No false refusal: anything json.dumps writes (shallow, short integers, valid text)
    reads back equal (NaN compared as NaN)."""
    text_ = json.dumps(value)
    got = _files.load_json(text_, where="x")
    assert json.dumps(got) == text_


@pytest.mark.parametrize(
    "raw, words",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[" * 70 + "]" * 70, "nested too deeply"),
        ('{"n": ' + "7" * 5000 + "}", "an integer of 5000 digits"),
        ('{"s": "a\\ud800b"}', "lone surrogate"),
        ('{"\\udfff": 1}', "lone surrogate"),
        (b'{"s": "\xff"}', "not UTF-8"),
        ('{"a": 1} x', "bad JSON"),
    ],
)
def test_load_json_refuses_bombs_and_invalid_text(raw, words):
    with pytest.raises(LensLLMInputError, match=words):
        _files.load_json(raw, where="f.json")


def test_duplicate_keys_are_refused_when_asked():
    assert _files.load_json('{"a": 1, "a": 2}', where="f") == {"a": 2}
    with pytest.raises(LensLLMInputError, match="gives the key 'a' twice"):
        _files.load_json('{"a": 1, "a": 2}', where="f", unique_keys=True)


# ----------------------------------------------------------------------------- special files


def _special(tmp_path: Path, kind: str, name: str) -> Path:
    p = tmp_path / name
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "zero":
        p.symlink_to("/dev/zero")
    elif kind == "dir":
        p.mkdir()
    elif kind == "loop":
        p.symlink_to(p.name)
    return p


READERS = {
    "data .jsonl": (text.read_examples, "t.jsonl"),
    "data .txt": (text.read_examples, "t.txt"),
    "curve table": (curves.read_curve_table, "c.csv"),
    "spectra": (spectra.read_spectra, "s.csv"),
}


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir", "loop"])
@pytest.mark.parametrize("reader", list(READERS))
def test_special_files_are_refused_without_blocking(tmp_path, reader, kind):
    fn, name = READERS[reader]
    path = _special(tmp_path, kind, name)
    with deadline(10):
        msg = refuses(fn, path)
    expected = {
        "fifo": "is a named pipe (FIFO), not a regular",
        "zero": "is a character device, not a regular",
        "dir": "is a folder",
        "loop": "cannot read (Too many levels of symbolic links)",
    }[kind]
    assert expected in msg and str(path) in msg


def test_size_limit_is_the_file_s_real_size(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_bytes(b"x" * 2000)
    with pytest.raises(LensLLMInputError, match=r"is 1.95 KiB, more than the 1 KiB"):
        _files.read_input(p, kind="data file", missing_hint="", folder_hint="", limit=1024)


# ----------------------------------------------------------------------------- data files

ok_line = st.builds(
    lambda p, c: json.dumps({"prompt": p, "completion": c}),
    st.text(string.ascii_letters + " ", max_size=10),
    st.text(string.ascii_letters, min_size=1, max_size=10),
)
any_line = st.one_of(
    ok_line,
    json_value.map(json.dumps),
    st.text(max_size=30),
    st.just('{"text": "a\\ud800"}'),
    st.just('{"text": ' + "[" * 40 + "]" * 40 + "}"),
)


@FAST
@given(st.lists(any_line, min_size=1, max_size=8), st.sampled_from([".jsonl", ".txt"]))
def test_read_examples_returns_or_refuses_in_one_line(tmp_path, lines, suffix):
    p = tmp_path / f"fuzz{suffix}"
    p.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        examples = text.read_examples(p)
    except LensLLMInputError as err:
        assert one_line(err).startswith(str(p))
        return
    for ex in examples:  # what is returned can be written as UTF-8 (no lone surrogate)
        (ex.prompt + ex.target).encode("utf-8")
        assert ex.target.strip()


@FAST
@given(st.binary(max_size=300))
def test_read_examples_on_random_bytes(tmp_path, raw):
    p = tmp_path / "raw.jsonl"
    p.write_bytes(raw)
    with contextlib.suppress(LensLLMInputError):
        text.read_examples(p)


# ----------------------------------------------------------------------------- curve tables

GOOD_TABLE = H.curve_table_text(["m0", "m1", "m2"])


@FAST
@given(st.data())
def test_read_curve_table_survives_cell_edits(tmp_path, data):
    """Replace random cells by hostile text: the table reads (values finite > 0) or is
    refused in one line naming the file."""
    rows = [r.split(",") for r in GOOD_TABLE.strip().split("\n")]
    cell = st.one_of(
        st.sampled_from(["nan", "inf", "-1", "0", "", "1e999", "9" * 5000, '"', "\x00", "x"]),
        st.text(max_size=8),
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(rows) - 1))
        j = data.draw(st.integers(0, len(rows[0]) - 1))
        rows[i][j] = data.draw(cell)
    p = tmp_path / "t.csv"
    p.write_text("\n".join(",".join(r) for r in rows), encoding="utf-8", errors="surrogatepass")
    try:
        table = curves.read_curve_table(p)
    except LensLLMInputError as err:
        assert one_line(err).startswith(str(p))
        return
    assert np.all(np.isfinite(table.losses) & (table.losses > 0))
    assert np.all(np.isfinite(table.n_params) & (table.n_params > 0))


# ----------------------------------------------------------------------------- outputs


def _targets(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "file.txt").write_text("keep me")
    out = {
        "symlink to a file": tmp_path / "l1",
        "symlink to /dev/null": tmp_path / "l2",
        "dangling symlink": tmp_path / "l3",
        "FIFO": tmp_path / "pipe",
        "folder": tmp_path / "dir",
    }
    out["symlink to a file"].symlink_to(tmp_path / "file.txt")
    out["symlink to /dev/null"].symlink_to("/dev/null")
    out["dangling symlink"].symlink_to(tmp_path / "nothing")
    os.mkfifo(out["FIFO"])
    out["folder"].mkdir()
    if os.geteuid() == 0:  # a device node inside the test's folder (equal to /dev/null)
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out["device node"] = tmp_path / "null"
    return out


def test_write_atomic_replaces_only_regular_files(tmp_path):
    for what, target in _targets(tmp_path).items():
        before = os.lstat(target)
        with pytest.raises(LensLLMInputError, match="lensllm replaces only regular files"):
            _files.write_atomic(target, "x")
        after = os.lstat(target)
        assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode), what
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*.part"))
    _files.write_atomic(tmp_path / "file.txt", "new")  # a regular file is replaced
    assert (tmp_path / "file.txt").read_text() == "new"
