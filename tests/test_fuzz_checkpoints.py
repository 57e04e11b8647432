"""Fuzzing checkpoints: corrupt configs, safetensors and GGUF files, written byte by byte
(tests/hostile_fixtures.py). `models.inspect` checks a candidate completely without
reading tensor data, so whatever a file holds it either describes a loadable model or is
one `ModelLoadError` line naming the file; and a checkpoint that passes is then loaded
whole or refused in one line, never half-read into a crash. The memory bombs run in a
subprocess under an address-space limit."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import hostile_fixtures as H
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensllm_jax import models
from lensllm_jax.errors import ModelConfigError, ModelLoadError
from lensllm_jax.models import config as config_mod

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
GPT2 = H.GPT2_CONFIG


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


gpt2_arrays, hf_folder = H.gpt2_arrays, H.hf_folder


def inspect_then_load(path: Path) -> None:
    """The property: inspect refuses in one line or passes; what passes loads whole (every
    leaf finite, of the config's shapes) or is refused in one line by `load`."""
    try:
        info = models.inspect(path)
    except ModelLoadError as err:
        assert one_line(err).startswith(str(path))
        return
    try:
        m = models.load(path)
    except ModelLoadError as err:
        one_line(err)
        assert "NaN or inf" in str(err), err  # the one thing only the data can show
        return
    import jax

    assert m.config == info.config
    for leaf in jax.tree.leaves(m.params):
        assert np.isfinite(np.asarray(leaf)).all()


@pytest.mark.slow
def test_the_unfuzzed_fixtures_load(tmp_path):
    d = hf_folder(tmp_path / "m", H.st_from_arrays(gpt2_arrays()))
    assert models.load(d).num_params > 0
    (tmp_path / "t.gguf").write_bytes(H.tiny_gguf().to_bytes())
    m = models.load(tmp_path / "t.gguf")
    assert m.config.num_layers == 1 and m.num_params > 0


# ----------------------------------------------------------------------------- configs

config_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 4), max_size=2),
    st.dictionaries(st.sampled_from(["rope_type", "factor", "rope_theta"]), st.integers(0, 9)),
)
BASES = {
    "gpt2": GPT2,
    "llama": {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 14,
    },
}


@FUZZ
@given(
    st.sampled_from(sorted(BASES)),
    st.dictionaries(
        st.sampled_from(
            [
                "n_embd",
                "n_layer",
                "n_head",
                "n_positions",
                "vocab_size",
                "n_inner",
                "activation_function",
                "layer_norm_epsilon",
                "tie_word_embeddings",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rope_theta",
                "rope_parameters",
                "rope_scaling",
                "partial_rotary_factor",
                "hidden_act",
                "rms_norm_eps",
                "max_position_embeddings",
                "model_type",
            ]
        ),
        config_value,
        max_size=4,
    ),
)
def test_config_parses_to_a_sane_model_or_one_line(base, edits):
    try:
        cfg = models.config_from_hf({**BASES[base], **edits}, where="c.json")
    except ModelConfigError as err:
        assert one_line(err).startswith("c.json: ")
        return
    for name, top in config_mod.LIMITS.items():
        v = getattr(cfg, name)
        assert v is None or (name == "word_embed_proj_dim" and v == 0) or 1 <= v <= top
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.activation in config_mod.KNOWN_ACTIVATIONS
    assert np.isfinite(cfg.norm_eps) and cfg.norm_eps > 0
    if cfg.family == "llama":
        assert 2 <= cfg.rotary_dim <= cfg.head_dim and cfg.rotary_dim % 2 == 0
    hash(cfg)  # a static jit argument


def test_known_activations_are_the_implemented_ones():
    from lensllm_jax.models import layers

    assert set(config_mod.KNOWN_ACTIVATIONS) == set(layers.ACTIVATIONS)


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"model_type": ["gpt2"]}, "model_type 'list' is not supported"),
        ({"n_head": 3}, "3 attention heads do not divide the width 16"),
        ({"n_layer": 10**9}, "num_layers = 1000000000 is out of range"),
        ({"n_embd": 0}, "field 'n_embd' is 0; it must be a whole number >= 1"),
        ({"n_layer": 2.5}, "field 'n_layer' is 2.5"),
        ({"activation_function": "swishy"}, "activation 'swishy' is not supported"),
        ({"layer_norm_epsilon": float("nan")}, "field 'layer_norm_epsilon' is nan"),
        ({"tie_word_embeddings": "no"}, "field 'tie_word_embeddings' is 'no'; it must be true"),
    ],
)
def test_config_refusals_name_the_field(edit, words):
    with pytest.raises(ModelConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        models.config_from_hf({**GPT2, **edit}, where="c.json")


# ----------------------------------------------------------------------------- safetensors

ST_VALUES = {
    "dtype": st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "BOOL", "F8", "x"]),
        st.integers(),
        st.none(),
    ),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), st.text(max_size=3)),
    "data_offsets": st.one_of(
        st.lists(st.integers(-10, 10**7), min_size=0, max_size=3),
        st.lists(st.floats(0, 1e4), min_size=2, max_size=2),
    ),
}


@FUZZ
@given(st.data())
def test_safetensors_header_edits(tmp_path_factory, data):
    arrays = gpt2_arrays()
    raw = H.st_from_arrays(arrays)
    header, body = H.st_read_bytes(raw)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(sorted(ST_VALUES)))
        header[name][field] = data.draw(ST_VALUES[field])
    d = hf_folder(tmp_path_factory.mktemp("st"), H.st_bytes(header, body))
    inspect_then_load(d)


@FUZZ
@given(st.data())
def test_safetensors_byte_edits(tmp_path_factory, data):
    raw = bytearray(H.st_from_arrays(gpt2_arrays()))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 6))):
        if raw:
            raw[data.draw(st.integers(0, min(len(raw) - 1, 600)))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 7, 2**60, 2**64 - 1, 10**8])))
    d = hf_folder(tmp_path_factory.mktemp("sb"), bytes(raw))
    inspect_then_load(d)


def test_safetensors_nan_weight_is_found_when_read(tmp_path):
    arrays = gpt2_arrays()
    arrays["transformer.h.0.mlp.c_fc.weight"][1, 2] = np.nan
    d = hf_folder(tmp_path / "m", H.st_from_arrays(arrays))
    models.inspect(d)  # headers are fine: nothing read
    with pytest.raises(ModelLoadError, match=r"c_fc\.weight' holds NaN"):
        models.load(d)


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda h: h["transformer.wte.weight"].update(dtype="I32"),
            "stored as I32, not as floating",
        ),
        (lambda h: h["transformer.wte.weight"].update(data_offsets=[0, 896]), "overlaps tensor"),
        (lambda h: h.pop("transformer.ln_f.bias"), "'transformer.ln_f.bias' is missing"),
        (lambda h: h["transformer.wte.weight"].update(shape=[-14, -16]), "shape \\[-14, -16\\]"),
    ],
)
def test_safetensors_header_lies_are_refused_before_reading(tmp_path, edit, words):
    header, body = H.st_read_bytes(H.st_from_arrays(gpt2_arrays()))
    edit(header)
    d = hf_folder(tmp_path / "m", H.st_bytes(header, body))
    with pytest.raises(ModelLoadError, match=words):
        models.inspect(d)


def test_shard_index_names_files_in_its_folder_only(tmp_path):
    d = hf_folder(tmp_path / "m", H.st_from_arrays(gpt2_arrays()))
    names = list(gpt2_arrays())
    for shard, words in [
        ("../m/model.safetensors", "is not a file name"),
        ("/dev/zero", "is not a file name"),
    ]:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: shard for n in names}})
        )
        with pytest.raises(ModelLoadError, match=words):
            models.inspect(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(ModelLoadError, match="'weight_map' is not an object"):
        models.inspect(d)


# ----------------------------------------------------------------------------- GGUF

GGUF_KEYS = [k for k, _, _ in H.tiny_gguf().kvs if not k.startswith("tokenizer")]
gguf_value = st.one_of(
    st.tuples(st.just(H.U32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(H.I32), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just(H.U64), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(H.F32), st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.tuples(st.just(H.STR), st.text(max_size=5)),
    st.tuples(st.just(H.BOOL), st.booleans()),
    st.tuples(
        st.just(H.ARR),
        st.builds(
            H.Arr,
            st.just(H.U32),
            st.lists(st.integers(0, 9), max_size=2),
            st.sampled_from([None, 2**62, 10**6]),
        ),
    ),
    st.tuples(st.just(H.ARR), st.integers(1, 60_000).map(H.nested_array)),
    st.tuples(st.integers(13, 2**32 - 1), st.just(H.Raw(b"\0" * 8))),
)


@FUZZ
@given(st.data())
def test_gguf_metadata_and_tensor_info_edits(tmp_path_factory, data):
    spec = H.tiny_gguf(tokenizer=False)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["kv", "dims", "type", "offset", "counts"]))
        t = data.draw(st.sampled_from(spec.tensors))
        if what == "kv":
            key = data.draw(st.sampled_from([*GGUF_KEYS, "general.alignment", "x.extra"]))
            vtype, value = data.draw(gguf_value)
            spec.set(key, vtype, value)
        elif what == "dims":
            t.dims = tuple(data.draw(st.lists(st.integers(0, 2**40), min_size=0, max_size=6)))
        elif what == "type":
            t.ggml_type = data.draw(st.sampled_from([0, 1, 2, 3, 8, 12, 24, 30, 99, 2**31]))
        elif what == "offset":
            t.offset = data.draw(st.sampled_from([0, 3, 32, 10**7, 2**63]))
        else:
            setattr(
                spec,
                data.draw(st.sampled_from(["tensor_count", "kv_count"])),
                data.draw(st.sampled_from([0, 1, 2**62, len(spec.kvs) + 1])),
            )
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    path.write_bytes(spec.to_bytes())
    inspect_then_load(path)


@FUZZ
@given(st.data())
def test_gguf_byte_edits_and_truncations(tmp_path_factory, data):
    raw = bytearray(H.tiny_gguf(tokenizer=False).to_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 8))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("gb") / "m.gguf"
    path.write_bytes(bytes(raw))
    inspect_then_load(path)


def test_gguf_tokenizer_arrays_are_walked_not_decoded(tmp_path):
    """A real-sized vocabulary (50,000 tokens) is bounds-checked but kept as a count."""
    spec = H.tiny_gguf()
    spec.set("tokenizer.ggml.tokens", H.ARR, H.Arr(H.STR, [f"t{i}" for i in range(50_000)]))
    (tmp_path / "m.gguf").write_bytes(spec.to_bytes())
    from lensllm_jax.models.gguf_file import SkippedArray, open_gguf

    f = open_gguf(tmp_path / "m.gguf")
    assert f.fields["tokenizer.ggml.tokens"] == SkippedArray(H.STR, 50_000)


# ----------------------------------------------------------------------------- bombs


@pytest.mark.slow
def test_memory_bombs_are_refused_in_bounded_memory(tmp_path):
    """Under a 3 GiB address-space limit (jax alone maps about 1 GiB), each bomb is one
    refusal within seconds; the process's peak RSS stays far below the limit."""
    limit = 3 << 30
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fuzz_bombs.py"), str(tmp_path), str(limit)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 10
    for r in results:
        assert r["out"].startswith("REFUSED"), r
        assert r["s"] < 60, r
    assert max(r["rss_mib"] for r in results) < 1024, results
