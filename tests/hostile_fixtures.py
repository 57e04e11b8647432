"""Builders of well-formed and deliberately broken inputs, shared by the fuzz tests
(tests/test_fuzz_*.py) and the hostile-input driver (benchmarks/hostile_inputs.py).

Everything here writes bytes by hand from the formats' specifications, so a corruption can
be placed exactly: a GGUF file (magic, version, counts, key/value pairs, tensor infos,
aligned data), a safetensors file (u64 header length, JSON header, raw data), and tiny
Hugging Face checkpoints with their own tokenizers (those need torch + transformers).
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- GGUF

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {
    U8: "<B",
    I8: "<b",
    U16: "<H",
    I16: "<h",
    U32: "<I",
    I32: "<i",
    F32: "<f",
    BOOL: "<?",
    U64: "<Q",
    I64: "<q",
    F64: "<d",
}
GGML_F32, GGML_F16 = 0, 1


@dataclass
class Raw:
    """Bytes written as they are where a value would go (after its type tag)."""

    data: bytes


@dataclass
class Arr:
    """A GGUF array: item type and items (`count` overrides the length written)."""

    item_type: int
    items: list[Any]
    count: int | None = None


def _gguf_str(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def _gguf_value(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype == STR:
        return _gguf_str(value)
    if vtype == ARR:
        assert isinstance(value, Arr)
        n = len(value.items) if value.count is None else value.count
        body = b"".join(_gguf_value(value.item_type, v) for v in value.items)
        return struct.pack("<IQ", value.item_type, n) + body
    return struct.pack(_SCALAR[vtype], value)


@dataclass
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: fastest-varying first
    ggml_type: int
    data: bytes
    offset: int | None = None  # None: the next aligned offset


@dataclass
class GGUFSpec:
    kvs: list[tuple[Any, int, Any]] = field(default_factory=list)
    tensors: list[GGUFTensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    tensor_count: int | None = None
    kv_count: int | None = None

    def set(self, key: str, vtype: int, value: Any) -> GGUFSpec:
        self.kvs = [kv for kv in self.kvs if kv[0] != key] + [(key, vtype, value)]
        return self

    def drop(self, key: str) -> GGUFSpec:
        self.kvs = [kv for kv in self.kvs if kv[0] != key]
        return self

    def tensor(self, name: str) -> GGUFTensor:
        return next(t for t in self.tensors if t.name == name)

    def to_bytes(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        nt = len(self.tensors) if self.tensor_count is None else self.tensor_count
        nk = len(self.kvs) if self.kv_count is None else self.kv_count
        out += struct.pack("<QQ", nt, nk)
        for key, vtype, value in self.kvs:
            head = key.data if isinstance(key, Raw) else _gguf_str(key)
            out += head + struct.pack("<I", vtype) + _gguf_value(vtype, value)
        offsets, pos = [], 0
        for t in self.tensors:
            pos = -(-pos // self.alignment) * self.alignment
            offsets.append(pos if t.offset is None else t.offset)
            pos += len(t.data)
        for t, off in zip(self.tensors, offsets, strict=True):
            out += _gguf_str(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.ggml_type, off)
        out += b"\0" * (-len(out) % self.alignment)
        start = len(out)
        for t, off in zip(self.tensors, offsets, strict=True):
            if t.offset is not None:
                continue
            out += b"\0" * (start + off - len(out))
            out += t.data
        return bytes(out)


TINY_TOKENS = ["<unk>", "<s>", "</s>", *"abcdefgh", "Ġ", "=", ">", "ab"]


def tiny_gguf(
    *,
    hidden: int = 16,
    layers: int = 1,
    heads: int = 2,
    kv: int = 1,
    ff: int = 32,
    ctx: int = 64,
    seed: int = 0,
    tokenizer: bool = True,
) -> GGUFSpec:
    """A complete llama GGUF (F32 tensors, tied embeddings) with a byte-level BPE tokenizer
    that transformers can load in well under a second; vocabulary `TINY_TOKENS`."""
    spec = GGUFSpec()
    a = "llama"
    spec.kvs = [
        ("general.architecture", STR, a),
        (f"{a}.block_count", U32, layers),
        (f"{a}.context_length", U32, ctx),
        (f"{a}.embedding_length", U32, hidden),
        (f"{a}.feed_forward_length", U32, ff),
        (f"{a}.attention.head_count", U32, heads),
        (f"{a}.attention.head_count_kv", U32, kv),
        (f"{a}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        (f"{a}.rope.freq_base", F32, 10000.0),
    ]
    if tokenizer:
        n = len(TINY_TOKENS)
        spec.kvs += [
            ("tokenizer.ggml.model", STR, "gpt2"),
            ("tokenizer.ggml.pre", STR, "default"),
            ("tokenizer.ggml.tokens", ARR, Arr(STR, list(TINY_TOKENS))),
            ("tokenizer.ggml.scores", ARR, Arr(F32, [0.0] * n)),
            ("tokenizer.ggml.token_type", ARR, Arr(I32, [3, 3, 3] + [1] * (n - 3))),
            ("tokenizer.ggml.merges", ARR, Arr(STR, ["a b"])),
            ("tokenizer.ggml.bos_token_id", U32, 1),
            ("tokenizer.ggml.eos_token_id", U32, 2),
            ("tokenizer.ggml.unknown_token_id", U32, 0),
            ("tokenizer.ggml.padding_token_id", U32, 2),
        ]
    rng = np.random.default_rng(seed)
    hd = hidden // max(heads, 1)

    def t(name: str, shape: tuple[int, ...]) -> None:
        arr = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        spec.tensors.append(GGUFTensor(name, tuple(reversed(shape)), GGML_F32, arr.tobytes()))

    t("token_embd.weight", (len(TINY_TOKENS), hidden))
    t("output_norm.weight", (hidden,))
    for i in range(layers):
        t(f"blk.{i}.attn_norm.weight", (hidden,))
        t(f"blk.{i}.ffn_norm.weight", (hidden,))
        t(f"blk.{i}.attn_q.weight", (hidden, hidden))
        t(f"blk.{i}.attn_k.weight", (kv * hd, hidden))
        t(f"blk.{i}.attn_v.weight", (kv * hd, hidden))
        t(f"blk.{i}.attn_output.weight", (hidden, hidden))
        t(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        t(f"blk.{i}.ffn_up.weight", (ff, hidden))
        t(f"blk.{i}.ffn_down.weight", (hidden, ff))
    return spec


def nested_array(depth: int) -> Raw:
    """A GGUF array of arrays `depth` deep (the innermost holds one u8)."""
    head = struct.pack("<IQ", ARR, 1) * (depth - 1)
    return Raw(head + struct.pack("<IQ", U8, 1) + b"\x07")


# ----------------------------------------------------------------------------- safetensors


def st_read(path: Path) -> tuple[dict[str, Any], bytes]:
    return st_read_bytes(Path(path).read_bytes())


def st_read_bytes(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data buffer) of a well-formed safetensors file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_bytes(header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file: `header` (a dict, or raw header bytes) and the data buffer."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def st_from_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name, a in arrays.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": codes[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [len(data), len(data) + len(b)],
        }
        data += b
    return st_bytes(header, bytes(data))


# ----------------------------------------------------------------------------- task data

LETTERS = "abcdefgh"


def task_lines(n: int, seed: int = 0) -> list[str]:
    """prompt "c a h b =>", completion " d b a c": every letter shifted by one."""
    rng = random.Random(seed)
    shift = {c: LETTERS[(i + 1) % len(LETTERS)] for i, c in enumerate(LETTERS)}
    lines = []
    for _ in range(n):
        w = [rng.choice(LETTERS) for _ in range(4)]
        prompt, completion = " ".join(w) + " =>", " " + " ".join(shift[c] for c in w)
        lines.append(json.dumps({"prompt": prompt, "completion": completion}))
    return lines


def curve_table_text(names: list[str], *, seed: int = 0, sizes=(200, 400, 800, 1600)) -> str:
    """A well-formed curve table: falling curves L = 2/(1 + D^0.3) + 1 + noise per model."""
    rng = np.random.default_rng(seed)
    head = ["config name", "0", *(str(s) for s in sizes), "size", "family"]
    rows = [",".join(head)]
    for i, name in enumerate(names):
        b = 2.0 + 0.3 * i + 0.05 * rng.standard_normal()
        vals = [b + 1.0] + [b / (1 + s**0.3) + 1.0 for s in sizes]
        rows.append(",".join([name, *(f"{v:.6f}" for v in vals), str(1000 * (i + 1)), "F"]))
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- HF checkpoints

GPT2_CONFIG = {
    "model_type": "gpt2",
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "n_positions": 64,
    "vocab_size": 14,
}


def gpt2_arrays(cfg: dict[str, Any] = GPT2_CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor a GPT-2 of this config needs, under its Hugging Face name (random)."""
    from lensllm_jax import models
    from lensllm_jax.models import gpt2, weights

    c = models.config_from_hf(cfg)
    rng = np.random.default_rng(seed)
    name = weights._hf_display(gpt2)
    out = {}
    for _, per_layer, shape, tpl, transpose in weights._expected(c, gpt2):
        s = shape[1:] if per_layer else shape
        hf = tuple(reversed(s)) if transpose else s
        for i in range(c.num_layers) if per_layer else [None]:
            out[name(tpl.format(i=i))] = (0.1 * rng.standard_normal(hf)).astype(np.float32)
    return out


def hf_folder(root: Path, st: bytes, cfg: dict[str, Any] = GPT2_CONFIG) -> Path:
    """A Hugging Face folder without a tokenizer: config.json and model.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "model.safetensors").write_bytes(st)
    return root


def tiny_hf(folder: Path, arch: str = "gpt2", seed: int = 0, **config: Any) -> Path:
    """A tiny random transformers checkpoint saved with a character-level tokenizer, as
    `save_pretrained` writes them (model.safetensors, config.json, tokenizer files)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in LETTERS + " =>":
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=1)
    if arch == "gpt2":
        kw = dict(n_embd=16, n_layer=1, n_head=2, n_positions=64) | config
        cfg = transformers.GPT2Config(**kw, **common)
    else:
        kw = (
            dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=64,
            )
            | config
        )
        cfg = transformers.LlamaConfig(**kw, **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return Path(folder)
