"""GGUF (llama.cpp) files: config from metadata, tensors dequantised to float32.

The header (key/value metadata and tensor infos) is parsed here from the specification,
bounded by the file's real size: every length, count and offset is checked against the
bytes that remain before anything is allocated (an array claiming 2^62 items, a string of
2^62 bytes, arrays nested 50,000 deep, a tensor past the end of the file or overlapping
another are each one `ModelLoadError` line naming the file and the field). The data is
read only when a tensor is (a memory map of its byte range).

Any type the `gguf` package can dequantise is read (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0 and
the k-quants). llama.cpp stores the q/k projections of the "llama" architecture with rows
permuted for its interleaved RoPE: per head, W[(h, half, j)] -> W[(h, j, half)]; we undo it so
the `rotate_half` RoPE of transformers applies. Qwen2 is stored unpermuted.
Llama-3 rope scaling arrives as a `rope_freqs.weight` tensor of per-frequency divisors.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax.data._files import open_regular
from lensllm_jax.errors import ModelConfigError, ModelLoadError

from .config import LMConfig, check_config
from .weights import TensorRef

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "gguf_config",
    "gguf_name",
    "gguf_refs",
    "open_gguf",
    "unpermute_qk",
]

SUPPORTED_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # arrays of arrays: real files nest at most 2
MAX_NAME_BYTES = 1 << 16
KEEP_ITEMS = 4096  # longer arrays of strings are skipped (counted), not decoded
MAX_FILE_BYTES = 1 << 40

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY, _BOOL = 8, 9, 7
_FLOAT_TYPES = {0: np.float32, 1: np.float16, 28: np.float64}  # F32, F16, F64
_INT_TYPES = (24, 25, 26, 27)  # I8, I16, I32, I64: not weights

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


class GGUFTensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order (the ggml dims reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class SkippedArray(NamedTuple):
    """A long array of strings, walked (bounds checked) but not decoded."""

    item_type: int
    length: int


class GGUFFile(NamedTuple):
    path: Path
    size: int
    version: int
    fields: dict[str, Any]  # key -> int | float | bool | str | list | np.ndarray | SkippedArray
    tensors: list[GGUFTensorInfo]


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: not a readable GGUF file ({what})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes, only {self.size - self.pos} remain; "
                "truncated or corrupted"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, *, keep: bool = True, limit: int | None = None) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} claims {n} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n]) if keep else b""
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype], f"the value of {key!r}")
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(f"the value of {key!r}")
        if vtype != _ARRAY:
            raise self.fail(f"{key!r} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item = self.unpack("<I", f"the item type of {key!r}")
        count = self.unpack("<Q", f"the length of {key!r}")
        least = {_STRING: 8, _ARRAY: 12}.get(item, struct.calcsize(_SCALARS.get(item, "<B")))
        if count * least > self.size - self.pos:
            raise self.fail(
                f"array {key!r} claims {count} items, more than the {self.size - self.pos} "
                "bytes left hold"
            )
        if item in _SCALARS:
            fmt = _SCALARS[item]
            arr = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos).copy()
            self.pos += count * struct.calcsize(fmt)
            return arr.astype(bool) if item == _BOOL else arr
        if item == _STRING and count > KEEP_ITEMS:
            for _ in range(count):
                self.string(f"an item of {key!r}", keep=False)
            return SkippedArray(item, count)
        return [self.value(item, key, depth + 1) for _ in range(count)]


def _type_sizes() -> tuple[dict[int, tuple[int, int]], set[int]]:
    """ggml type -> (block size, bytes per block), and the types `gguf` can dequantise."""
    from gguf import GGML_QUANT_SIZES, quants

    sizes = {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}
    readable = {0, 1, 28} | {int(k) for k in getattr(quants, "_type_traits", {})}
    return sizes, readable


def open_gguf(path: Path) -> GGUFFile:
    """Parse and check a GGUF file's header without reading tensor data. Raises
    `ModelLoadError` (one line naming the file) for anything malformed, a tensor type that
    cannot be dequantised, or a tensor whose bytes lie outside the file or overlap another.
    Cost: O(header bytes) (a memory map; long string arrays are walked, not decoded)."""
    path = Path(path)
    fd, size = open_regular(path, limit=MAX_FILE_BYTES, what="GGUF file", error=ModelLoadError)
    try:
        if size < 24:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({size} bytes, too short)")
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, size, path))
    finally:
        os.close(fd)


def _parse(c: _Cursor) -> GGUFFile:
    if bytes(c.buf[:4]) != b"GGUF":
        raise c.fail("bad magic: not a GGUF file")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in VERSIONS:
        raise c.fail(f"version {version}; supported: {', '.join(map(str, VERSIONS))}")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the metadata count")
    if n_kv * 13 > c.size or n_tensors * 32 > c.size:
        raise c.fail(f"claims {n_kv} metadata entries and {n_tensors} tensors")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key", limit=MAX_NAME_BYTES)
        if key in fields:
            raise c.fail(f"metadata key {key!r} appears twice")
        fields[key] = c.value(c.unpack("<I", f"the type of {key!r}"), key)
    align = fields.get("general.alignment", 32)
    if not (isinstance(align, int) and not isinstance(align, bool) and align > 0):
        raise c.fail(f"general.alignment is {align!r}, not a whole number")
    if align & (align - 1):
        raise c.fail(f"general.alignment {align} is not a power of two")
    sizes, readable = _type_sizes()
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name", limit=MAX_NAME_BYTES)
        n_dims = c.unpack("<I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [c.unpack("<Q", f"a dimension of {name!r}") for _ in range(n_dims)]
        gtype = c.unpack("<I", f"the type of {name!r}")
        offset = c.unpack("<Q", f"the offset of {name!r}")
        infos.append((name, dims, gtype, offset))
    data_start = -(-c.pos // align) * align
    tensors, names = [], set()
    for name, dims, gtype, offset in infos:
        if name in names:
            raise c.fail(f"tensor {name!r} appears twice")
        names.add(name)
        if gtype not in sizes or gtype not in readable:
            raise c.fail(f"tensor {name!r} has type {gtype}, which cannot be dequantised")
        block, type_size = sizes[gtype]
        n = math.prod(dims)
        if min(dims) < 1 or dims[0] % block:
            raise c.fail(f"tensor {name!r} has dimensions {dims} (type {gtype}, blocks of {block})")
        nbytes = n // block * type_size
        start = data_start + offset
        if offset % align or start + nbytes > c.size:
            raise c.fail(
                f"tensor {name!r} ({nbytes} bytes at data offset {offset}) lies outside the "
                f"file's {c.size - data_start} data bytes or is misaligned; truncated or corrupted"
            )
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), gtype, start, nbytes))
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise c.fail(f"tensor {t.name!r} overlaps the tensor before it")
        end = t.offset + t.nbytes
    return GGUFFile(c.path, c.size, version, fields, tensors)


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def gguf_config(reader: GGUFFile, path: Path) -> LMConfig:
    """LMConfig from `{arch}.*` metadata (head counts, dims, rope base, eps, context length),
    checked (`config.check_config`); a value of the wrong type is one `ModelConfigError`."""
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        raise ModelConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    by_name = {t.name: t for t in reader.tensors}

    def get(key: str, default: Any, kind: type) -> Any:
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata {arch}.{key} is missing")
        if kind is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok = isinstance(v, (int, float)) if kind is float else isinstance(v, kind)
        if isinstance(v, (bool, np.ndarray, list)) or not ok:
            raise ModelConfigError(
                f"{path}: GGUF metadata {arch}.{key} is {v!r:.40}, not a {kind.__name__}"
            )
        return kind(v)

    hidden, heads = get("embedding_length", None, int), get("attention.head_count", None, int)
    head_dim = get("attention.key_length", hidden // heads if heads > 0 else 0, int)
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        emb = by_name.get("token_embd.weight")
        if emb is None:
            raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing")
        vocab = int(emb.shape[0])
    else:
        vocab = get("vocab_size", None, int)
    scaling: tuple[tuple[str, Any], ...] = ()
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in by_name:
        factors = read_tensor(path, by_name["rope_freqs.weight"]).ravel()
        scaling = (
            ("factors", tuple(float(x) for x in factors[:4096])),
            ("rope_type", "freq_factors"),
        )
    elif kind == "linear":
        scaling = (("factor", get("rope.scaling.factor", None, float)), ("rope_type", "linear"))
        if not (math.isfinite(scaling[0][1]) and scaling[0][1] > 0):
            raise ModelConfigError(f"{path}: GGUF rope scaling factor {scaling[0][1]!r} is not > 0")
    elif kind not in (None, "none"):
        raise ModelConfigError(f"{path}: GGUF rope scaling {kind!r} is not supported")
    cfg = LMConfig(
        family="llama",
        model_type=SUPPORTED_ARCHS[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=get("block_count", None, int),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads, int),
        head_dim=head_dim,
        intermediate_size=get("feed_forward_length", None, int),
        max_position_embeddings=get("context_length", 2048, int),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
        activation="silu",
        tie_word_embeddings="output.weight" not in by_name,
        qkv_bias="blk.0.attn_q.bias" in by_name,
        o_bias="blk.0.attn_output.bias" in by_name,
        mlp_bias="blk.0.ffn_up.bias" in by_name,
        rope_theta=get("rope.freq_base", 10000.0, float),
        rotary_dim=get("rope.dimension_count", head_dim, int),
        rope_scaling=scaling,
    )
    return check_config(cfg, str(path))


def read_tensor(path: Path, t: GGUFTensorInfo) -> np.ndarray:
    """One tensor, dequantised to float32, from its checked byte range (a memory map)."""
    from gguf import GGMLQuantizationType, quants

    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
    if t.ggml_type in _FLOAT_TYPES:
        return np.asarray(raw.view(_FLOAT_TYPES[t.ggml_type]), np.float32).reshape(t.shape)
    qtype = GGMLQuantizationType(t.ggml_type)
    byte_shape = quants.quant_shape_to_byte_shape(t.shape, qtype)
    try:
        a = quants.dequantize(np.asarray(raw).reshape(byte_shape), qtype)
    except (NotImplementedError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: tensor {t.name!r} of type {qtype.name} cannot be dequantised ({e})"
        ) from e
    return np.asarray(a, dtype=np.float32).reshape(t.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (h, j, half) -> (h, half, j). Works on biases too."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(canonical: str) -> str:
    """Canonical HF name -> GGUF tensor name (for error messages)."""
    layer = {v: k for k, v in _LAYER.items()}
    top = {v: k for k, v in _TOP.items()}
    parts = canonical.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{layer.get('.'.join(parts[2:-1]), '?')}.{parts[-1]}"
    return f"{top.get(parts[0], parts[0])}.{parts[-1]}"


def _canonical(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER:
        return f"layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def gguf_refs(
    reader: GGUFFile, path: Path, cfg: LMConfig
) -> tuple[dict[str, TensorRef], dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """Canonical-named refs (dequantised on read) and the q/k un-permutations to apply.
    Integer tensor types are refused (a weight is a float, however quantised)."""
    refs: dict[str, TensorRef] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # consumed by gguf_config
        canon = _canonical(t.name)
        if canon is None:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r}")
        if t.ggml_type in _INT_TYPES:
            raise ModelLoadError(f"{path}: tensor {t.name!r} holds integers, not weights")
        refs[canon] = TensorRef(
            str(path), t.name, t.shape, lambda t=t: read_tensor(path, t), "float"
        )
    transforms: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if cfg.model_type in ("llama", "mistral"):
        for i in range(cfg.num_layers):
            for proj, nh in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
                for leaf in ("weight", "bias"):
                    transforms[f"layers.{i}.self_attn.{proj}.{leaf}"] = lambda a, nh=nh: (
                        unpermute_qk(a, nh)
                    )
    return refs, transforms
