"""The hostile inputs of `hostile_inputs.py`: one `Case` per input, grouped by area.

Each case writes its inputs into its own folder and returns the command line (a `lensllm`
call, or a Python snippet for the API area). `expect` says what a correct program does:
"error" (refuse with one line), "ok" (succeed; `check` may look closer) or "either" (a
borderline input: succeeding or refusing cleanly are both right; a traceback, a hang or a
write on refusal are still wrong).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostile_fixtures as H

Setup = Callable[[Path, "Fixtures"], list[str]]


@dataclass
class Case:
    area: str
    name: str
    setup: Setup
    expect: str = "error"
    check: Callable[[Path, Any], str | None] | None = None  # a problem with an "ok" run
    timeout: float | None = None
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: writes past it fail (a full disk)
    before: list[Setup] = field(default_factory=list)  # earlier commands that must succeed
    between: Callable[[Path, Fixtures], None] | None = None  # runs after `before`


@dataclass
class Fixtures:
    root: Path
    gpt2: Path
    llama: Path
    gguf: H.GGUFSpec
    task: Path


RUN_OPTS = [
    *("--sizes", "4", "8", "16", "--test-size", "4", "--probe-size", "2"),
    *("--max-length", "24", "--epochs", "1", "--min-steps", "1", "--batch-size", "4"),
    *("--lr", "1e-3", "--no-ntk", "-q", "--format", "csv"),
]


def run_argv(d: Path, models: list[Path | str], data: Path | str, *extra: str) -> list[str]:
    return [
        "run",
        "--models",
        *map(str, models),
        "--data",
        str(data),
        *RUN_OPTS,
        "--out-dir",
        str(d / "out"),
        *extra,
    ]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def zero_link(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def fake_device(path: Path) -> Path:
    """A character device node equal to /dev/null, made inside the case folder (root only)."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def copy_model(fx: Fixtures, src: Path, d: Path, name: str = "bad") -> Path:
    dst = d / name
    shutil.copytree(src, dst)
    return dst


def depth_bomb(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- config.json

BAD_NUMBERS: list[tuple[str, Any, str]] = [
    ("0", 0, "error"),
    ("-1", -1, "error"),
    ("1e9", 10**9, "error"),
    ("2.5", 2.5, "error"),
    ("list", [], "error"),
    ("object", {}, "error"),
    ("1e30", 10**30, "error"),
    ("inf", "@inf", "error"),
    ("nan", "@nan", "error"),
    ("string", "@str", "either"),
]


def _config_edit(base: str, edit: Callable[[dict], Any] | None = None, raw: str | None = None):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        src = fx.gpt2 if base == "gpt2" else fx.llama
        m = copy_model(fx, src, d)
        if raw is not None:
            (m / "config.json").write_text(raw, encoding="utf-8", errors="surrogatepass")
        elif edit is not None:
            cfg = json.loads((m / "config.json").read_text())
            edit(cfg)
            text = json.dumps(cfg, allow_nan=True)
            text = text.replace('"@inf"', "1e400").replace('"@nan"', "NaN")
            (m / "config.json").write_text(text)
        return run_argv(d, [m, fx.gpt2], fx.task)

    return setup


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        if value == "@str":
            cfg[key] = str(cfg.get(key, 16))
        else:
            cfg[key] = value

    return edit


def _config_file(kind: str):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        m = copy_model(fx, fx.gpt2, d)
        cfg = m / "config.json"
        cfg.unlink()
        if kind == "fifo":
            fifo(cfg)
        elif kind == "dir":
            cfg.mkdir()
        elif kind == "zero":
            zero_link(cfg)
        elif kind == "loop":
            cfg.symlink_to(cfg.name)
        return run_argv(d, [m, fx.gpt2], fx.task)

    return setup


def config_cases() -> list[Case]:
    out = []
    gpt2_keys = ["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "n_inner"]
    llama_keys = [
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "num_hidden_layers",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
    ]
    for base, keys in (("gpt2", gpt2_keys), ("llama", llama_keys)):
        for key in keys:
            for label, value, expect in BAD_NUMBERS:
                if key == "head_dim" and label == "0":
                    expect = "either"  # 0 means "hidden / heads", as in transformers
                out.append(
                    Case(
                        "config",
                        f"{base}.{key}={label}",
                        _config_edit(base, _set(key, value)),
                        expect,
                    )
                )
    for key, base in (("layer_norm_epsilon", "gpt2"), ("rms_norm_eps", "llama")):
        for label, value in (("-1", -1.0), ("inf", "@inf"), ("nan", "@nan"), ("list", [1])):
            out.append(
                Case("config", f"{base}.{key}={label}", _config_edit(base, _set(key, value)))
            )
    specific: list[tuple[str, str, Callable[[dict], Any], str]] = [
        ("model_type=list", "gpt2", _set("model_type", ["gpt2"]), "error"),
        ("model_type=int", "gpt2", _set("model_type", 5), "error"),
        ("model_type=object", "gpt2", _set("model_type", {"a": 1}), "error"),
        ("model_type=bert", "gpt2", _set("model_type", "bert"), "error"),
        ("model_type missing", "gpt2", lambda c: c.pop("model_type"), "error"),
        ("model_type=surrogate", "gpt2", _set("model_type", "gpt2\ud800"), "error"),
        ("n_head=3 (16 % 3)", "gpt2", _set("n_head", 3), "error"),
        ("heads=3 (16 % 3)", "llama", _set("num_attention_heads", 3), "error"),
        ("kv_heads=3 (2 % 3)", "llama", _set("num_key_value_heads", 3), "error"),
        ("activation=swishy", "gpt2", _set("activation_function", "swishy"), "error"),
        ("activation=123", "gpt2", _set("activation_function", 123), "error"),
        ("hidden_act=tanh", "llama", _set("hidden_act", "tanh"), "error"),
        ("rope yarn", "llama", _set("rope_parameters", {"rope_type": "yarn"}), "error"),
        ("rope type int", "llama", _set("rope_parameters", {"rope_type": 5}), "error"),
        ("rope_scaling string", "llama", _set("rope_scaling", "linear"), "error"),
        ("rope_scaling list", "llama", _set("rope_scaling", [1, 2]), "error"),
        (
            "rope linear factor 0",
            "llama",
            _set("rope_parameters", {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}),
            "error",
        ),
        (
            "rope linear factor str",
            "llama",
            _set("rope_parameters", {"rope_type": "linear", "factor": "x", "rope_theta": 1e4}),
            "error",
        ),
        (
            "rope linear no factor",
            "llama",
            _set("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}),
            "error",
        ),
        (
            "rope llama3 missing fields",
            "llama",
            _set("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
            "error",
        ),
        (
            "rope llama3 high == low",
            "llama",
            _set(
                "rope_parameters",
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8,
                    "rope_theta": 1e4,
                },
            ),
            "error",
        ),
        ("rope_theta=0", "llama", _set("rope_parameters", {"rope_theta": 0.0}), "error"),
        ("rope_theta=-1", "llama", _set("rope_parameters", {"rope_theta": -1.0}), "error"),
        ("partial_rotary=2", "llama", _set("partial_rotary_factor", 2.0), "error"),
        ("partial_rotary=-0.5", "llama", _set("partial_rotary_factor", -0.5), "error"),
        ("partial_rotary=0", "llama", _set("partial_rotary_factor", 0.0), "error"),
        (
            "per-layer rope",
            "llama",
            _set("rope_parameters", {"full": {"rope_theta": 1.0}}),
            "error",
        ),
        ("n_positions=8 < max length", "gpt2", _set("n_positions", 8), "error"),
        ("llama positions=8 < max length", "llama", _set("max_position_embeddings", 8), "either"),
        ("tie_word_embeddings='no'", "llama", _set("tie_word_embeddings", "no"), "error"),
        ("deep unused value", "gpt2", _set("extra", json.loads("[" * 50 + "]" * 50)), "either"),
        ("surrogate in unused value", "gpt2", _set("extra", "x\ud800"), "either"),
        ("null activation (default)", "gpt2", _set("activation_function", None), "either"),
    ]
    for name, base, edit, expect in specific:
        out.append(Case("config", name, _config_edit(base, edit), expect))
    good = json.dumps(
        {
            "model_type": "gpt2",
            "n_embd": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_positions": 64,
            "vocab_size": 14,
        }
    )
    raws = [
        ("not an object", "[1, 2]", "error"),
        ("a string", '"gpt2"', "error"),
        ("empty", "", "error"),
        ("garbage", "\x00\x01garbage\xff", "error"),
        ("depth bomb 100k", '{"model_type": "gpt2", "x": ' + depth_bomb() + "}", "error"),
        ("5000-digit unused int", good[:-1] + ', "x": ' + "7" * 5000 + "}", "either"),
        ("5000-digit n_layer", good.replace('"n_layer": 1', '"n_layer": ' + "1" * 5000), "error"),
        ("trailing garbage", good + " xyz", "error"),
        ("duplicate key", good[:-1] + ', "n_layer": 1}', "either"),
        ("BOM", "\ufeff" + good, "either"),
        (
            "n_layer 1e9 (1 KB config)",
            good.replace('"n_layer": 1', '"n_layer": 1000000000'),
            "error",
        ),
    ]
    for name, text, expect in raws:
        out.append(Case("config", f"json: {name}", _config_edit("gpt2", raw=text), expect))
    for kind in ("fifo", "dir", "zero", "loop"):
        out.append(Case("config", f"config.json is a {kind}", _config_file(kind), timeout=90))
    return out


# ----------------------------------------------------------------------------- safetensors

ST_NAME = "transformer.h.0.attn.c_attn.weight"  # F32 (16, 48)


def _st_case(mutate: Callable[[dict, bytes], bytes]):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        m = copy_model(fx, fx.gpt2, d)
        header, data = H.st_read(m / "model.safetensors")
        (m / "model.safetensors").write_bytes(mutate(header, data))
        return run_argv(d, [m, fx.gpt2], fx.task)

    return setup


def _entry(**changes: Any) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, data: bytes) -> bytes:
        h[ST_NAME].update(changes)
        return H.st_bytes(h, data)

    return mutate


def _poison(value: float) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, data: bytes) -> bytes:
        b = bytearray(data)
        begin = h[ST_NAME]["data_offsets"][0]
        b[begin + 40 : begin + 44] = struct.pack("<f", value)
        return H.st_bytes(h, bytes(b))

    return mutate


def _raw_header(text: bytes) -> Callable[[dict, bytes], bytes]:
    return lambda h, data: H.st_bytes(text, data)


def _st_file(kind: str):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        m = copy_model(fx, fx.gpt2, d)
        f = m / "model.safetensors"
        f.unlink()
        {"fifo": fifo, "zero": zero_link, "dir": Path.mkdir, "empty": Path.touch}[kind](f)
        return run_argv(d, [m, fx.gpt2], fx.task)

    return setup


def _index_case(index: Any, shard_setup: Callable[[Path], None] | None = None, raw=None):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        m = copy_model(fx, fx.gpt2, d)
        if shard_setup is not None:
            shard_setup(m)
        idx = m / "model.safetensors.index.json"
        if raw == "fifo":
            fifo(idx)
        elif raw == "dir":
            idx.mkdir()
        elif raw is not None:
            idx.write_text(raw)
        else:
            header, _ = H.st_read(m / "model.safetensors")
            names = [k for k in header if k != "__metadata__"]
            idx.write_text(json.dumps(index(names) if callable(index) else index))
        return run_argv(d, [m, fx.gpt2], fx.task)

    return setup


def safetensors_cases() -> list[Case]:
    c: list[tuple[str, Callable[[dict, bytes], bytes], str]] = [
        ("header length 2^60", lambda h, d: H.st_bytes(h, d, length=2**60), "error"),
        ("header length 0", lambda h, d: H.st_bytes(h, d, length=0), "error"),
        ("header length 7", lambda h, d: H.st_bytes(h, d, length=7), "error"),
        ("header not JSON", _raw_header(b"not json at all"), "error"),
        ("header a list", _raw_header(b"[1, 2, 3]"), "error"),
        ("header depth bomb", _raw_header(depth_bomb().encode()), "error"),
        ("header non-UTF-8", _raw_header(b'{"\xff\xfe": 1}'), "error"),
        ("dtype F32 -> I32 (same size)", _entry(dtype="I32"), "error"),
        ("dtype F32 -> U8", _entry(dtype="U8"), "error"),
        ("dtype F32 -> BOOL", _entry(dtype="BOOL"), "error"),
        ("dtype F32 -> F8_E4M3", _entry(dtype="F8_E4M3"), "error"),
        ("dtype F32 -> F64", _entry(dtype="F64"), "error"),
        ("dtype int", _entry(dtype=5), "error"),
        ("dtype missing", lambda h, d: (h[ST_NAME].pop("dtype"), H.st_bytes(h, d))[1], "error"),
        ("shape transposed", _entry(shape=[48, 16]), "error"),
        ("shape negative", _entry(shape=[-16, -48]), "error"),
        ("shape huge", _entry(shape=[2**40, 2**40]), "error"),
        ("shape string", _entry(shape="16x48"), "error"),
        ("shape 3-D", _entry(shape=[16, 48, 1]), "error"),
        ("offsets reversed", _entry(data_offsets=[3264, 192]), "error"),
        ("offsets past end", _entry(data_offsets=[10**6, 10**6 + 3072]), "error"),
        ("offsets negative", _entry(data_offsets=[-3072, 0]), "error"),
        ("offsets float", _entry(data_offsets=[192.5, 3264.5]), "error"),
        ("offsets 3 entries", _entry(data_offsets=[192, 3264, 4000]), "error"),
        (
            "offsets 5000 digits",
            _raw_header(
                b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}"
            ),
            "error",
        ),
        ("offsets overlap another tensor", _entry(data_offsets=[0, 3072]), "error"),
        ("tensor missing", lambda h, d: (h.pop(ST_NAME), H.st_bytes(h, d))[1], "error"),
        (
            "unknown extra tensor",
            lambda h, d: (
                h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
                H.st_bytes(h, d),
            )[1],
            "error",
        ),
        ("NaN in a weight", _poison(float("nan")), "error"),
        ("inf in a weight", _poison(float("inf")), "error"),
        ("truncated by 100 bytes", lambda h, d: H.st_bytes(h, d)[:-100], "error"),
        ("truncated to 8 bytes", lambda h, d: H.st_bytes(h, d)[:8], "error"),
        (
            "metadata a list",
            lambda h, d: (h.update(__metadata__=[1]), H.st_bytes(h, d))[1],
            "either",
        ),
        (
            "surrogate tensor name",
            lambda h, d: H.st_bytes(
                json.dumps(h).replace(ST_NAME, ST_NAME + "\\ud800").encode(), d
            ),
            "error",
        ),
        (
            "duplicate tensor key",
            lambda h, d: H.st_bytes(
                json.dumps(h)[:-1].encode()
                + b', "'
                + ST_NAME.encode()
                + b'": '
                + json.dumps(h[ST_NAME]).encode()
                + b"}",
                d,
            ),
            "either",
        ),
    ]
    out = [Case("safetensors", name, _st_case(m), e) for name, m, e in c]
    for kind in ("fifo", "zero", "dir", "empty"):
        out.append(Case("safetensors", f"model.safetensors is {kind}", _st_file(kind), timeout=90))
    shard = "model.safetensors"
    idx: list[tuple[str, Any, Any, Any, str]] = [
        ("index ok", lambda n: {"weight_map": {k: shard for k in n}}, None, None, "either"),
        ("weight_map a list", {"weight_map": [1, 2]}, None, None, "error"),
        ("weight_map a string", {"weight_map": "x"}, None, None, "error"),
        ("weight_map null", {"weight_map": None}, None, None, "error"),
        ("weight_map missing", {"metadata": {}}, None, None, "error"),
        ("index a list", [1], None, None, "error"),
        ("shard value int", lambda n: {"weight_map": {k: 5 for k in n}}, None, None, "error"),
        (
            "shard path traversal",
            lambda n: {"weight_map": {k: "../../gpt2/model.safetensors" for k in n}},
            None,
            None,
            "error",
        ),
        (
            "shard /dev/zero",
            lambda n: {"weight_map": {k: "/dev/zero" for k in n}},
            None,
            None,
            "error",
        ),
        (
            "shard missing",
            lambda n: {"weight_map": {k: "nope.safetensors" for k in n}},
            None,
            None,
            "error",
        ),
        (
            "shard is a FIFO",
            lambda n: {"weight_map": {k: "pipe.safetensors" for k in n}},
            lambda m: fifo(m / "pipe.safetensors"),
            None,
            "error",
        ),
        ("index depth bomb", None, None, '{"weight_map": ' + depth_bomb() + "}", "error"),
        ("index 5000 digits", None, None, '{"weight_map": {"a": ' + "9" * 5000 + "}}", "error"),
        ("index is a FIFO", None, None, "fifo", "error"),
        ("index is a folder", None, None, "dir", "error"),
        (
            "index lists a tensor the shard lacks",
            lambda n: {"weight_map": {**{k: shard for k in n}, "transformer.extra": shard}},
            None,
            None,
            "error",
        ),
        (
            "shard holds a tensor the index lacks",
            lambda n: {"weight_map": {k: shard for k in n[1:]}},
            None,
            None,
            "error",
        ),
    ]
    for name, index, shard_setup, raw, expect in idx:
        out.append(
            Case("safetensors", name, _index_case(index, shard_setup, raw), expect, timeout=120)
        )
    return out


# ----------------------------------------------------------------------------- GGUF


def _gguf_case(
    edit: Callable[[H.GGUFSpec], Any] | None = None,
    *,
    cut: float | None = None,
    raw: Callable[[bytes], bytes] | None = None,
    kind: str | None = None,
):
    def setup(d: Path, fx: Fixtures) -> list[str]:
        path = d / "bad.gguf"
        if kind == "fifo":
            fifo(path)
        elif kind == "zero":
            zero_link(path)
        elif kind == "dir":
            path.mkdir()
        else:
            spec = H.tiny_gguf()
            if edit is not None:
                edit(spec)
            data = spec.to_bytes()
            if cut is not None:
                data = data[: int(len(data) * cut)]
            if raw is not None:
                data = raw(data)
            path.write_bytes(data)
        return run_argv(d, [path, fx.gpt2], fx.task)

    return setup


def _kv(key: str, vtype: int, value: Any) -> Callable[[H.GGUFSpec], Any]:
    return lambda s: s.set(key, vtype, value)


def _tensor(which: str, **changes: Any) -> Callable[[H.GGUFSpec], Any]:
    def edit(s: H.GGUFSpec) -> None:
        t = s.tensor(which)
        for k, v in changes.items():
            setattr(t, k, v)

    return edit


def _gguf_poison(value: float) -> Callable[[H.GGUFSpec], Any]:
    def edit(s: H.GGUFSpec) -> None:
        t = s.tensor("blk.0.attn_q.weight")
        b = bytearray(t.data)
        b[20:24] = struct.pack("<f", value)
        t.data = bytes(b)

    return edit


def gguf_cases() -> list[Case]:
    a = "llama"
    U32, STR, F32, I32, ARR, U64, BOOL = H.U32, H.STR, H.F32, H.I32, H.ARR, H.U64, H.BOOL
    c: list[tuple[str, Callable[[H.GGUFSpec], Any], str]] = [
        ("head_count 0", _kv(f"{a}.attention.head_count", U32, 0), "error"),
        ("embedding_length 0", _kv(f"{a}.embedding_length", U32, 0), "error"),
        ("block_count 0", _kv(f"{a}.block_count", U32, 0), "error"),
        ("block_count 1e9", _kv(f"{a}.block_count", U32, 10**9), "error"),
        ("feed_forward_length 0", _kv(f"{a}.feed_forward_length", U32, 0), "error"),
        ("head_count_kv 0", _kv(f"{a}.attention.head_count_kv", U32, 0), "error"),
        ("head_count_kv 3 (2 % 3)", _kv(f"{a}.attention.head_count_kv", U32, 3), "error"),
        ("head_count 3 (16 % 3)", _kv(f"{a}.attention.head_count", U32, 3), "error"),
        ("context_length 8 < max length", _kv(f"{a}.context_length", U32, 8), "either"),
        ("context_length 0", _kv(f"{a}.context_length", U32, 0), "error"),
        ("rms eps NaN", _kv(f"{a}.attention.layer_norm_rms_epsilon", F32, float("nan")), "error"),
        ("rms eps -1", _kv(f"{a}.attention.layer_norm_rms_epsilon", F32, -1.0), "error"),
        ("rms eps inf", _kv(f"{a}.attention.layer_norm_rms_epsilon", F32, float("inf")), "error"),
        ("freq_base 0", _kv(f"{a}.rope.freq_base", F32, 0.0), "error"),
        ("freq_base NaN", _kv(f"{a}.rope.freq_base", F32, float("nan")), "error"),
        ("freq_base inf", _kv(f"{a}.rope.freq_base", F32, float("inf")), "error"),
        ("rope dims 7 (odd)", _kv(f"{a}.rope.dimension_count", U32, 7), "error"),
        ("rope dims 64 > head dim", _kv(f"{a}.rope.dimension_count", U32, 64), "error"),
        ("key_length 0", _kv(f"{a}.attention.key_length", U32, 0), "error"),
        ("vocab_size 5 (mismatch)", _kv(f"{a}.vocab_size", U32, 5), "error"),
        ("vocab_size 1e9", _kv(f"{a}.vocab_size", U32, 10**9), "error"),
        ("head_count a string", _kv(f"{a}.attention.head_count", STR, "2"), "error"),
        ("head_count a float", _kv(f"{a}.attention.head_count", F32, 2.0), "either"),
        ("head_count -2", _kv(f"{a}.attention.head_count", I32, -2), "error"),
        ("head_count an array", _kv(f"{a}.attention.head_count", ARR, H.Arr(U32, [2])), "error"),
        ("head_count a bool", _kv(f"{a}.attention.head_count", BOOL, True), "error"),
        ("block_count 2^63", _kv(f"{a}.block_count", U64, 2**63), "error"),
        ("architecture an int", _kv("general.architecture", U32, 5), "error"),
        ("architecture bert", _kv("general.architecture", STR, "bert"), "error"),
        ("architecture missing", lambda s: s.drop("general.architecture"), "error"),
        (
            "architecture bad UTF-8",
            _kv("general.architecture", STR, H.Raw(struct.pack("<Q", 2) + b"\xff\xfe")),
            "error",
        ),
        ("rope scaling yarn", _kv(f"{a}.rope.scaling.type", STR, "yarn"), "error"),
        ("rope scaling linear, no factor", _kv(f"{a}.rope.scaling.type", STR, "linear"), "error"),
        (
            "rope scaling linear, factor 0",
            lambda s: (
                s.set(f"{a}.rope.scaling.type", STR, "linear"),
                s.set(f"{a}.rope.scaling.factor", F32, 0.0),
            ),
            "error",
        ),
        (
            "no tokenizer",
            lambda s: [s.drop(k) for k, _, _ in list(s.kvs) if k.startswith("tokenizer")],
            "error",
        ),
        (
            "tokens length 2^62",
            lambda s: setattr(
                dict((k, v) for k, _, v in s.kvs)["tokenizer.ggml.tokens"], "count", 2**62
            ),
            "error",
        ),
        (
            "array of 1e6 u8 claimed, none given",
            _kv("x.arr", ARR, H.Arr(H.U8, [], count=10**6)),
            "error",
        ),
        ("arrays nested 50,000 deep", _kv("x.nested", ARR, H.nested_array(50_000)), "error"),
        ("arrays nested 3 deep", _kv("x.nested", ARR, H.nested_array(3)), "either"),
        (
            "key length 2^62",
            lambda s: s.kvs.insert(0, (H.Raw(struct.pack("<Q", 2**62) + b"k"), STR, "v")),
            "error",
        ),
        (
            "string length 2^62",
            _kv("x.str", STR, H.Raw(struct.pack("<Q", 2**62) + b"abc")),
            "error",
        ),
        ("unknown value type", _kv("x.weird", 99, H.Raw(b"\0" * 8)), "error"),
        ("tensor_count 2^62", lambda s: setattr(s, "tensor_count", 2**62), "error"),
        ("kv_count 2^62", lambda s: setattr(s, "kv_count", 2**62), "error"),
        ("kv_count + 1", lambda s: setattr(s, "kv_count", len(s.kvs) + 1), "error"),
        ("tensor n_dims 1000", _tensor("output_norm.weight", dims=(16,) + (1,) * 999), "error"),
        ("tensor dims 2^40 x 2^40", _tensor("output_norm.weight", dims=(2**40, 2**40)), "error"),
        ("tensor type 99", _tensor("output_norm.weight", ggml_type=99), "error"),
        ("tensor type Q4_0 (size mismatch)", _tensor("output_norm.weight", ggml_type=2), "error"),
        ("tensor offset past end", _tensor("output_norm.weight", offset=10**7), "error"),
        ("tensor offset misaligned", _tensor("output_norm.weight", offset=3), "error"),
        ("tensor offsets overlap", _tensor("blk.0.ffn_norm.weight", offset=0), "error"),
        (
            "tensor name duplicated",
            _tensor("blk.0.ffn_norm.weight", name="blk.0.attn_norm.weight"),
            "error",
        ),
        ("key duplicated", lambda s: s.kvs.append(s.kvs[1]), "error"),
        ("tensor missing", lambda s: s.tensors.remove(s.tensor("blk.0.ffn_up.weight")), "error"),
        (
            "tensor extra (layer 5)",
            _tensor("blk.0.ffn_up.weight", name="blk.5.ffn_up.weight"),
            "error",
        ),
        ("tensor unknown name", _tensor("output_norm.weight", name="foo.weight"), "error"),
        ("tensor mis-shaped", _tensor("token_embd.weight", dims=(len(H.TINY_TOKENS), 16)), "error"),
        ("NaN in a weight", _gguf_poison(float("nan")), "error"),
        ("inf in a weight", _gguf_poison(float("inf")), "error"),
        ("magic wrong", lambda s: setattr(s, "magic", b"GGUX"), "error"),
        ("version 1", lambda s: setattr(s, "version", 1), "error"),
        ("version 99", lambda s: setattr(s, "version", 99), "error"),
        ("alignment 0", _kv("general.alignment", U32, 0), "error"),
        ("alignment 3", _kv("general.alignment", U32, 3), "error"),
        ("alignment a string", _kv("general.alignment", STR, "32"), "error"),
    ]
    out = [Case("gguf", name, _gguf_case(e), x) for name, e, x in c]
    for frac in (0.0005, 0.01, 0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 0.9999):
        out.append(Case("gguf", f"truncated at {frac:g}", _gguf_case(cut=frac)))
    for seed in range(5):

        def noise(data: bytes, seed: int = seed) -> bytes:
            import random

            rng = random.Random(seed)
            return data[:8] + bytes(rng.randrange(256) for _ in range(4000))

        out.append(Case("gguf", f"random bytes after the header ({seed})", _gguf_case(raw=noise)))
    out.append(Case("gguf", "empty file", _gguf_case(raw=lambda d: b"")))
    for kind in ("fifo", "zero", "dir"):
        out.append(Case("gguf", f".gguf is a {kind}", _gguf_case(kind=kind), timeout=90))
    return out
