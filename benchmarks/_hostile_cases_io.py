"""Hostile inputs, part 2: task data, curve tables, output targets, resume, names, the
Python API and the metrics (see `_hostile_cases` for `Case`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import hostile_fixtures as H
from _hostile_cases import (
    Case,
    Fixtures,
    copy_model,
    depth_bomb,
    fake_device,
    fifo,
    run_argv,
    zero_link,
)

# ----------------------------------------------------------------------------- task data


def _data(name: str, content: bytes | str | None = None, kind: str | None = None):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        path = d / name
        if kind == "fifo":
            fifo(path)
        elif kind == "zero":
            zero_link(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "loop":
            path.symlink_to(path.name)
        else:
            assert content is not None
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return run_argv(d, [fx.gpt2], path)

    return setup


def _lines(extra: list[str], n: int = 32, at: int = 5) -> str:
    lines = H.task_lines(n)
    lines[at:at] = extra
    return "\n".join(lines) + "\n"


def data_cases() -> list[Case]:
    ok = "\n".join(H.task_lines(32)) + "\n"
    c: list[tuple[str, str, Any, str]] = [
        ("bad JSON line", "t.jsonl", _lines(['{"text": oops}']), "error"),
        ("lone surrogate in text", "t.jsonl", _lines(['{"text": "a \\ud800 b"}']), "error"),
        (
            "lone surrogate in an ignored key",
            "t.jsonl",
            _lines(['{"text": "a b", "x": "\\udfff"}']),
            "either",
        ),
        (
            "line nested 100,000 deep",
            "t.jsonl",
            _lines(['{"text": "a", "x": ' + depth_bomb() + "}"]),
            "error",
        ),
        (
            "5000-digit integer",
            "t.jsonl",
            _lines(['{"text": "a b", "n": ' + "3" * 5000 + "}"]),
            "either",
        ),
        (
            "NaN literal in an ignored key",
            "t.jsonl",
            _lines(['{"text": "a b", "x": NaN}']),
            "either",
        ),
        ("not UTF-8", "t.jsonl", ok.encode() + b"\xff\xfe\n", "error"),
        ("UTF-16", "t.jsonl", ok.encode("utf-16"), "error"),
        ("NUL bytes in .txt", "t.txt", "a b\x00c\n" * 40, "either"),
        ("empty", "t.jsonl", "", "error"),
        ("whitespace only", "t.jsonl", " \n\t\n\n", "error"),
        ("csv extension", "t.csv", ok, "error"),
        ("no extension", "t", ok, "error"),
        ("text is a number", "t.jsonl", _lines(['{"text": 5}']), "error"),
        ("text is null", "t.jsonl", _lines(['{"text": null}']), "error"),
        ("text is a list", "t.jsonl", _lines(['{"text": ["a"]}']), "error"),
        ("line is a list", "t.jsonl", _lines(["[1, 2]"]), "error"),
        ("line is a string", "t.jsonl", _lines(['"abc"']), "error"),
        ("no known key", "t.jsonl", _lines(['{"body": "a"}']), "error"),
        (
            "ambiguous keys",
            "t.jsonl",
            _lines(['{"text": "a", "prompt": "b", "completion": "c"}']),
            "error",
        ),
        ("prompt without completion", "t.jsonl", _lines(['{"prompt": "a"}']), "error"),
        ("empty target", "t.jsonl", _lines(['{"text": "   "}']), "error"),
        ("too few examples", "t.jsonl", "\n".join(H.task_lines(5)) + "\n", "error"),
        ("duplicate keys", "t.jsonl", _lines(['{"text": "a", "text": "b"}']), "either"),
        (
            "object with 10,000 keys",
            "t.jsonl",
            _lines([json.dumps({"text": "a b", **{f"k{i}": i for i in range(10_000)}})]),
            "either",
        ),
        ("BOM and CRLF", "t.jsonl", "\ufeff" + ok.replace("\n", "\r\n"), "ok"),
        ("U+2028 inside a string", "t.jsonl", _lines(['{"text": "a\u2028b"}']), "either"),
        (
            "1 MB single line",
            "t.txt",
            "a b " * 250_000 + "\n" + "\n".join("a b c" for _ in range(40)),
            "either",
        ),
    ]
    out = [Case("data", name, _data(fname, content), expect) for name, fname, content, expect in c]
    for kind in ("fifo", "zero", "dir", "loop"):
        out.append(Case("data", f"data file is a {kind}", _data("t.jsonl", kind=kind), timeout=90))
    return out


# ----------------------------------------------------------------------------- curve tables


def _select(
    text: str | bytes | None,
    *extra: str,
    kind: str | None = None,
    name: str = "c.csv",
    spectra: str | None = None,
):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        path = d / name
        if kind == "fifo":
            fifo(path)
        elif kind == "zero":
            zero_link(path)
        elif kind == "dir":
            path.mkdir()
        else:
            assert text is not None
            path.write_bytes(
                text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
            )
        argv = ["select", str(path), "--target", "3200", *extra]
        if spectra is not None:
            (d / "ntk.csv").write_text(spectra)
            argv += ["--ntk", str(d / "ntk.csv")]
        return argv

    return setup


def _has(*names: str):
    def check(d: Path, res: Any) -> str | None:
        missing = [n for n in names if n not in res.stdout]
        return f"output lacks {missing}" if missing else None

    return check


def curves_cases() -> list[Case]:
    names = ["m0", "m1", "m2", "m3"]
    good = H.curve_table_text(names)
    head, *rows = good.splitlines()

    def row(i: int, cell: int, value: str) -> str:
        lines = [head, *rows]
        cells = lines[i].split(",")
        cells[cell] = value
        lines[i] = ",".join(cells)
        return "\n".join(lines) + "\n"

    c: list[tuple[str, Any, tuple[str, ...], str]] = [
        ("loss NaN", row(1, 2, "nan"), (), "error"),
        ("loss inf", row(1, 2, "inf"), (), "error"),
        ("loss negative", row(1, 2, "-1"), (), "error"),
        ("loss zero", row(1, 2, "0"), (), "error"),
        ("loss empty", row(1, 2, ""), (), "error"),
        ("loss text", row(1, 2, "abc"), (), "error"),
        ("loss 5000 digits", row(1, 2, "9" * 5000), (), "error"),
        ("size text", row(1, 6, "big"), (), "error"),
        ("ragged row", good + "m9,1,2\n", (), "error"),
        ("duplicate model", good + rows[0] + "\n", (), "error"),
        ("duplicate column", good.replace("200,400", "200,200"), (), "error"),
        ("no zero column", good.replace("config name,0,", "config name,x,"), (), "error"),
        ("no size column", good.replace(",size,", ",params,"), (), "error"),
        ("header only", head + "\n", (), "error"),
        ("empty", "", (), "error"),
        ("binary", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), (), "error"),
        ("UTF-16", good.encode("utf-16"), (), "error"),
        ("NUL byte", good.replace("m1", "m\x001"), (), "error"),
        ("invalid UTF-8 in a name", good.encode().replace(b"m1", b"m\xff1"), (), "error"),
        ("unclosed quote", good.replace("m1", '"m1'), (), "error"),
        (
            "se negative",
            good.replace("family", "family,se_200").replace(",F", ",F,-1"),
            (),
            "error",
        ),
        (
            "se without size",
            good.replace("family", "family,se_300").replace(",F", ",F,0.1"),
            (),
            "error",
        ),
        ("100,000-character name", good.replace("m1", "x" * 100_000), (), "either"),
        ("name with markup oops[/]", good.replace("m1", "oops[/]"), (), "ok"),
        ("name with markup [bold]", good.replace("m1", "[bold]x[/bold]"), (), "ok"),
        ("name with link markup", good.replace("m1", "[link=http://x]y"), (), "ok"),
        ("name with markup, csv format", good.replace("m1", "oops[/]"), ("--format", "csv"), "ok"),
        (
            "name with markup, json format",
            good.replace("m1", "oops[/]"),
            ("--format", "json"),
            "ok",
        ),
        (
            "rising curves",
            "\n".join(
                [head]
                + [
                    ",".join([f"r{i}", "1", "1.1", "1.2", "1.3", "1.4", "10", "F"])
                    for i in range(3)
                ]
            )
            + "\n",
            (),
            "either",
        ),
        ("target NaN", good, ("--target", "nan"), "error"),
        ("target -5", good, ("--target", "-5"), "error"),
        ("unknown method", good, ("--methods", "Oracle"), "error"),
    ]
    out = []
    for name, text, extra, expect in c:
        check = None
        if "markup" in name:
            check = _has("oops[/]") if "oops" in name else None
        out.append(Case("curves", name, _select(text, *extra), expect, check=check, timeout=120))
    for kind in ("fifo", "zero", "dir"):
        out.append(Case("curves", f"table is a {kind}", _select(None, kind=kind), timeout=60))
    spec_head = "config name,eta,k,eigenvalue,projected_residual\n"
    spectra = [
        ("spectra negative eigenvalue", spec_head + "m0,0.1,0,-1,0.5\n", "error"),
        ("spectra eta 0", spec_head + "m0,0,0,1,0.5\n", "error"),
        ("spectra k gap", spec_head + "m0,0.1,0,1,0.5\nm0,0.1,2,1,0.5\n", "error"),
        ("spectra missing column", "config name,eta,k\nm0,1,0\n", "error"),
        ("spectra 5000-digit eigenvalue", spec_head + "m0,0.1,0," + "9" * 5000 + ",0.5\n", "error"),
        ("spectra markup name", spec_head + "oops[/],0.1,0,1,0.5\n", "either"),
    ]
    for name, text, expect in spectra:
        out.append(Case("curves", name, _select(good, spectra=text), expect, timeout=120))
    # reproduce: a dataset whose file name is markup, and one of 20,000 models (Kendall τ).
    sizes = [200 * 2**k for k in range(14)]
    protocol_table = H.curve_table_text(names, sizes=sizes)

    def reproduce(file: str, text: str, *methods: str):
        def setup(d: Path, fx: Fixtures) -> list[str]:
            (d / "data").mkdir()
            (d / "data" / file).write_text(text)
            return ["reproduce", "--data", str(d / "data"), "--methods", *methods]

        return setup

    out.append(
        Case(
            "curves",
            "reproduce: dataset named [bold]x (a file name holds no closing tag)",
            reproduce("[bold]x.csv", protocol_table, "ZeroShot"),
            "ok",
            check=_has("[bold]x"),
            timeout=120,
        )
    )
    many = H.curve_table_text([f"m{i}" for i in range(20_000)], sizes=sizes)
    out.append(
        Case(
            "metrics",
            "reproduce: 20,000 models (Kendall τ)",
            reproduce("big.csv", many, "ZeroShot", "ModelSize"),
            "ok",
            timeout=300,
        )
    )
    return out


# ----------------------------------------------------------------------------- outputs


def _select_out(make, *, fmt: str = "csv"):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        (d / "c.csv").write_text(H.curve_table_text(["m0", "m1", "m2"]))
        target = make(d)
        return [
            "select",
            str(d / "c.csv"),
            "--target",
            "3200",
            "--format",
            fmt,
            "--out",
            str(target),
        ]

    return setup


def _symlink(to: str | Path):
    def make(d: Path) -> Path:
        target = Path(to) if str(to).startswith("/") else d / to
        if not str(to).startswith("/") and to != "dangling":
            target.write_text("keep me")
        (d / "link").symlink_to(target)
        return d / "link"

    return make


def _regular(d: Path) -> Path:
    (d / "old.csv").write_text("old")
    return d / "old.csv"


def _run_out_dir(make):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        make(d / "out")
        return run_argv(d, [fx.gpt2], fx.task)

    return setup


def _replaced(name: str):
    def check(d: Path, res: Any) -> str | None:
        p = d / name
        return (
            None if p.is_file() and not p.is_symlink() and p.read_text() != "old" else "not written"
        )

    return check


def out_cases() -> list[Case]:
    c = [
        Case("out", "--out is a FIFO", _select_out(lambda d: fifo(d / "pipe")), timeout=60),
        Case("out", "--out is a symlink to a file", _select_out(_symlink("file.txt"))),
        Case("out", "--out is a symlink to a device", _select_out(_symlink(Path("/dev/null")))),
        Case("out", "--out is a dangling symlink", _select_out(_symlink("dangling"))),
        Case("out", "--out is a device node", _select_out(lambda d: fake_device(d / "null"))),
        Case("out", "--out is a folder", _select_out(lambda d: (d / "f").mkdir() or d / "f")),
        Case("out", "--out's folder is missing", _select_out(lambda d: d / "no" / "x.csv")),
        Case("out", "--out in /proc", _select_out(lambda d: Path("/proc/version"))),
        Case(
            "out",
            "--out replaces a regular file",
            _select_out(_regular),
            "ok",
            check=_replaced("old.csv"),
        ),
        Case("out", "--out, disk full (select)", _select_out(lambda d: d / "x.csv"), fsize=64),
        Case(
            "out",
            "--out, disk full (table)",
            _select_out(lambda d: d / "x.txt", fmt="table"),
            fsize=64,
        ),
        Case("out", "--out-dir is a FIFO", _run_out_dir(fifo), timeout=90),
        Case("out", "--out-dir is a device node", _run_out_dir(fake_device)),
        Case("out", "--out-dir is a file", _run_out_dir(lambda p: p.write_text("x"))),
        Case(
            "out",
            "run --out is a FIFO",
            lambda d, fx: [*run_argv(d, [fx.gpt2], fx.task), "--out", str(fifo(d / "pipe"))],
            timeout=90,
        ),
        Case(
            "out",
            "run --out is a device node",
            lambda d, fx: [*run_argv(d, [fx.gpt2], fx.task), "--out", str(fake_device(d / "null"))],
        ),
        Case(
            "out",
            "run, disk full while saving results",
            lambda d, fx: run_argv(d, [fx.gpt2], fx.task),
            fsize=1500,
            check=None,
        ),
    ]
    return c


# ----------------------------------------------------------------------------- resume


def _copy_run(d: Path, fx: Fixtures) -> list[str]:
    m = copy_model(fx, fx.gpt2, d, "m")
    return run_argv(d, [m], fx.task)


def _report_identical(d: Path, res: Any) -> str | None:
    a, b = d / "report1.json", d / "out" / "report.json"
    if not b.is_file():
        return "no report.json"
    return None if a.read_bytes() == b.read_bytes() else "report.json differs on a plain rerun"


def _keep_report(d: Path, fx: Fixtures) -> None:
    shutil.copy(d / "out" / "report.json", d / "report1.json")


def _change_weights(d: Path, fx: Fixtures) -> None:
    _keep_report(d, fx)
    f = d / "m" / "model.safetensors"
    header, data = H.st_read(f)
    begin, end = header["transformer.wte.weight"]["data_offsets"]
    b = bytearray(data)
    import numpy as np

    w = np.frombuffer(bytes(b[begin:end]), np.float32) * 3.0
    b[begin:end] = w.astype(np.float32).tobytes()
    f.write_bytes(H.st_bytes(header, bytes(b)))


def _recomputed(d: Path, res: Any) -> str | None:
    old = json.loads((d / "report1.json").read_text())["candidates"][0]["zero_shot"]
    p = d / "out" / "report.json"
    if not p.is_file():
        return "no report.json"
    new = json.loads(p.read_text())["candidates"][0]["zero_shot"]
    return "changed weights, old results reused" if new == old else None


def _prepare_out(make):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        (d / "out").mkdir()
        make(d / "out")
        return run_argv(d, [fx.gpt2], fx.task)

    return setup


def _npz(edit):
    def between(d: Path, fx: Fixtures) -> None:
        (npz,) = (d / "out" / "candidates").glob("*.npz")
        edit(npz)

    return between


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _to_fifo(p: Path) -> None:
    p.unlink()
    fifo(p)


def _candidates_file(d: Path, fx: Fixtures) -> None:
    shutil.rmtree(d / "out" / "candidates")
    (d / "out" / "candidates").write_text("x")


def _has_report(d: Path, res: Any) -> str | None:
    return None if (d / "out" / "report.json").is_file() else "no report.json"


def resume_cases() -> list[Case]:
    return [
        Case(
            "resume",
            "plain rerun: report.json byte-identical",
            _copy_run,
            "ok",
            check=_report_identical,
            before=[_copy_run],
            between=_keep_report,
        ),
        Case(
            "resume",
            "weights changed in place, rerun",
            _copy_run,
            "ok",
            check=_recomputed,
            before=[_copy_run],
            between=_change_weights,
        ),
        Case(
            "resume",
            "half-created out-dir (empty candidates/)",
            _prepare_out(lambda o: (o / "candidates").mkdir()),
            "ok",
            check=_has_report,
        ),
        Case(
            "resume",
            "leftover temp file of the manifest",
            _prepare_out(lambda o: (o / ".manifest.json.x1.part").write_text("{")),
            "ok",
            check=_has_report,
        ),
        Case(
            "resume",
            "manifest is garbage",
            _prepare_out(lambda o: (o / "manifest.json").write_text("xx")),
        ),
        Case(
            "resume",
            "manifest nested 100,000 deep",
            _prepare_out(lambda o: (o / "manifest.json").write_text(depth_bomb())),
        ),
        Case(
            "resume",
            "manifest 5000 digits",
            _prepare_out(
                lambda o: (o / "manifest.json").write_text('{"version": ' + "1" * 5000 + "}")
            ),
        ),
        Case(
            "resume",
            "manifest is a FIFO",
            _prepare_out(lambda o: fifo(o / "manifest.json")),
            timeout=90,
        ),
        Case(
            "resume", "manifest is a folder", _prepare_out(lambda o: (o / "manifest.json").mkdir())
        ),
        Case(
            "resume",
            "saved result truncated",
            _copy_run,
            "ok",
            check=_has_report,
            before=[_copy_run],
            between=_npz(_truncate),
        ),
        Case(
            "resume",
            "saved result replaced by a FIFO",
            _copy_run,
            "either",
            before=[_copy_run],
            between=_npz(_to_fifo),
            timeout=120,
        ),
        Case(
            "resume",
            "candidates/ replaced by a file",
            _copy_run,
            "either",
            before=[_copy_run],
            between=_candidates_file,
        ),
    ]


# ----------------------------------------------------------------------------- names


def _named(name: str | bytes):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        folder = os.fsdecode(os.path.join(os.fsencode(d), os.fsencode(name)))
        shutil.copytree(fx.gpt2, folder)
        argv = run_argv(d, [folder], fx.task)
        argv[argv.index("--format") + 1] = "table"
        return argv

    return setup


def name_cases() -> list[Case]:
    """A run rendered as tables: the display name must appear as written (no markup eaten,
    surrounding whitespace dropped, control characters escaped)."""
    names: list[tuple[str | bytes, str, str]] = [
        ("[red]x", "[red]x", "ok"),
        ("[bold]y", "[bold]y", "ok"),
        ("gpt2 ", "gpt2", "ok"),
        (" lead", "lead", "ok"),
        ("tab\tname", "tab\\tname", "ok"),
        ("new\nline", "new\\nline", "ok"),
        # transformers cannot open a path that is not UTF-8: a clear refusal is right
        (b"bad\xffbyte", "not UTF-8", "either"),
        ("a" * 200, "a" * 59, "ok"),
    ]
    out = []
    for folder, shown, expect in names:
        check = _has(shown) if expect == "ok" else None
        out.append(
            Case(
                "names",
                f"model folder {folder!r}",
                _named(folder),
                expect,
                check=check,
                timeout=400,
            )
        )
    return out


# ----------------------------------------------------------------------------- Python API

API_PRELUDE = "import numpy as np\nfrom lensllm_jax.core import fit, laws, ntk_loss, hessian\n"
D4 = "[200.0, 400.0, 800.0, 1600.0]"
L4 = "[3.0, 2.6, 2.3, 2.1]"
RECT = '{"B": 10.0, "beta": 0.5, "E": 1.0, "D_l": 5.0}'
QUAD = (
    "import jax, jax.numpy as jnp\nps = {'w': jnp.arange(1.0, 5.0)}\n"
    "lf = lambda p: 0.5 * jnp.sum(p['w'] ** 2 * jnp.arange(1.0, 5.0))\nkey = jax.random.key(0)\n"
)
KENDALL = (
    "from lensllm_jax.benchmark import metrics\nimport scipy.stats\nr = np.random.default_rng(0)\n"
)


def api_cases() -> list[tuple[str, str, str, str]]:
    """(name, code setting `result`, expression that is True for a right answer, expect)."""
    return [
        (
            "fit_law: losses 1e308",
            f"result = fit.fit_law('rectified', {D4}, [1e308] * 4)",
            "not (int(result.status[0]) == 0"
            " and not all(np.isfinite(v[0]) for v in result.params.values()))",
            "either",
        ),
        (
            "fit_law: fixed beta NaN",
            f"result = fit.fit_law('rectified', {D4}, {L4}, fixed={{'beta': float('nan')}})",
            "False",
            "error",
        ),
        (
            "fit_law: fixed beta inf",
            f"result = fit.fit_law('rectified', {D4}, {L4}, fixed={{'beta': float('inf')}})",
            "False",
            "error",
        ),
        (
            "fit_law: fixed beta -1",
            f"result = fit.fit_law('rectified', {D4}, {L4}, fixed={{'beta': -1.0}})",
            "False",
            "error",
        ),
        (
            "fit_law: fixed beta 0",
            f"result = fit.fit_law('rectified', {D4}, {L4}, fixed={{'beta': 0.0}})",
            "False",
            "error",
        ),
        (
            "fit_law: fixed of the wrong length",
            f"result = fit.fit_law('rectified', {D4}, {L4}, fixed={{'beta': [0.5, 0.5]}})",
            "False",
            "error",
        ),
        (
            "fit_law: num_starts 0",
            f"result = fit.fit_law('rectified', {D4}, {L4}, num_starts=0)",
            "False",
            "error",
        ),
        (
            "fit_law: num_starts -1",
            f"result = fit.fit_law('rectified', {D4}, {L4}, num_starts=-1)",
            "False",
            "error",
        ),
        (
            "fit_law: num_starts 2.5",
            f"result = fit.fit_law('rectified', {D4}, {L4}, num_starts=2.5)",
            "False",
            "error",
        ),
        (
            "fit_law: num_starts np.int64(4)",
            f"result = fit.fit_law('rectified', {D4}, {L4}, num_starts=np.int64(4))",
            "bool(result.ok[0])",
            "ok",
        ),
        (
            "fit_law: max_steps 0",
            f"result = fit.fit_law('rectified', {D4}, {L4}, max_steps=0)",
            "False",
            "error",
        ),
        (
            "fit_law: negative D",
            f"result = fit.fit_law('rectified', [-200.0, 400.0, 800.0, 1600.0], {L4})",
            "int(result.num_points[0]) == 3",
            "either",
        ),
        (
            "fit_law: D inf",
            f"result = fit.fit_law('rectified', [200.0, 400.0, 800.0, float('inf')], {L4})",
            "int(result.num_points[0]) == 3",
            "either",
        ),
        (
            "fit_law: loss -1",
            f"result = fit.fit_law('rectified', {D4}, [3.0, 2.6, -1.0, 2.1])",
            "int(result.num_points[0]) == 3",
            "either",
        ),
        (
            "fit_law: loss inf",
            f"result = fit.fit_law('rectified', {D4}, [3.0, 2.6, float('inf'), 2.1])",
            "int(result.num_points[0]) == 3",
            "either",
        ),
        (
            "fit_law: losses are text",
            f"result = fit.fit_law('rectified', {D4}, ['a', 'b', 'c', 'd'])",
            "False",
            "error",
        ),
        (
            "fit_law: NaN marks a missing point",
            f"result = fit.fit_law('rectified', [100.0] + {D4}, [float('nan')] + {L4})",
            "int(result.num_points[0]) == 4 and bool(result.ok[0])",
            "ok",
        ),
        ("predict: D < 0", f"result = laws.predict('rectified', {RECT}, -5.0)", "False", "error"),
        (
            "predict: D array with -1",
            f"result = laws.predict('rectified', {RECT}, np.array([-1.0, 2.0]))",
            "False",
            "error",
        ),
        (
            "predict: B = -1",
            f"result = laws.predict('rectified', {{**{RECT}, 'B': -1.0}}, 10.0)",
            "False",
            "error",
        ),
        (
            "predict: parameter missing",
            "result = laws.predict('rectified', {'B': 1.0}, 10.0)",
            "False",
            "error",
        ),
        (
            "predict: D is text",
            f"result = laws.predict('rectified', {RECT}, 'x')",
            "False",
            "error",
        ),
        (
            "predict: NaN parameter (failed fit)",
            f"result = laws.predict('rectified', {{**{RECT}, 'B': float('nan')}}, 10.0)",
            "bool(np.isnan(result))",
            "either",
        ),
        (
            "predict: right value",
            f"result = laws.predict('rectified', {RECT}, 100.0)",
            "abs(float(result) - (10.0 / (5.0 + 10.0) + 1.0)) < 1e-12",
            "ok",
        ),
        (
            "ntk_test_loss: non-symmetric kernel",
            "result = ntk_loss.ntk_test_loss(np.array([[1.0, 2.0], [0.0, 1.0]]),"
            " np.ones(2), 1.0, 0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: NaN kernel",
            "result = ntk_loss.ntk_test_loss(np.array([[np.nan, 0.0], [0.0, 1.0]]),"
            " np.ones(2), 1.0, 0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: kernel not square",
            "result = ntk_loss.ntk_test_loss(np.ones((2, 3)), np.ones(2), 1.0, 0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: t < 0",
            "result = ntk_loss.ntk_test_loss(np.eye(2), np.ones(2), -1.0, 0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: eta < 0",
            "result = ntk_loss.ntk_test_loss(np.eye(2), np.ones(2), 1.0, -0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: residual of the wrong length",
            "result = ntk_loss.ntk_test_loss(np.eye(2), np.ones(3), 1.0, 0.1)",
            "False",
            "error",
        ),
        (
            "ntk_test_loss: right value",
            "result = ntk_loss.ntk_test_loss(np.diag([1.0, 2.0]), np.ones(2), 1.0, 0.1)",
            "abs(float(result) - (np.exp(-0.2) + np.exp(-0.4))) < 1e-5",
            "ok",
        ),
        (
            "hutchinson_trace: np.int64(8) probes",
            QUAD + "result = hessian.hutchinson_trace(lf, ps, key, np.int64(8))",
            "abs(float(result.mean) - 10.0) < 1e-4",
            "ok",
        ),
        (
            "hutchinson_trace: probes True",
            QUAD + "result = hessian.hutchinson_trace(lf, ps, key, True)",
            "False",
            "error",
        ),
        (
            "hutchinson_trace: probes 2.0",
            QUAD + "result = hessian.hutchinson_trace(lf, ps, key, 2.0)",
            "False",
            "error",
        ),
        (
            "hutchinson_trace: probes 0",
            QUAD + "result = hessian.hutchinson_trace(lf, ps, key, 0)",
            "False",
            "error",
        ),
        (
            "hutchpp_trace: np.int64(12)",
            QUAD + "result = hessian.hutchpp_trace(lf, ps, key, np.int64(12))",
            "abs(float(result.mean) - 10.0) < 1e-3",
            "ok",
        ),
        (
            "top_eigenvalue: 0 iterations",
            QUAD + "result = hessian.top_eigenvalue(lf, ps, key, 0)",
            "False",
            "error",
        ),
        (
            "top_eigenvalue: np.int64(50)",
            QUAD + "result = hessian.top_eigenvalue(lf, ps, key, np.int64(50))",
            "abs(float(result.eigenvalue) - 4.0) < 1e-3",
            "ok",
        ),
        (
            "kendall τ: 20,000 models",
            KENDALL + "a, b = r.integers(0, 500, 20000).astype(float), r.normal(size=20000)\n"
            "result = metrics.kendall_tau_percent(a, b)",
            "abs(result - 100 * scipy.stats.kendalltau(a, b).statistic) < 1e-9",
            "ok",
        ),
        (
            "kendall τ: 200,000 models",
            KENDALL + "a, b = r.normal(size=200000), r.integers(0, 50, 200000).astype(float)\n"
            "result = metrics.kendall_tau_percent(a, b)",
            "abs(result - 100 * scipy.stats.kendalltau(a, b).statistic) < 1e-9",
            "ok",
        ),
    ]
