"""Checkpoint tensors -> params pytree, all-or-nothing.

A *tensor source* maps canonical Hugging Face names (family prefix such as "model." stripped) to
`TensorRef`s that know their file, shape and how to read themselves. `build_params` checks the
whole set of names and every shape against the family's params structure *before* reading any
data, then reads, transposes (nn.Linear (out, in) -> kernel (in, out)), stacks layers, and checks
every value is finite. Any problem raises one `ModelLoadError` naming the file and tensor.

The safetensors reader is our own (≈40 lines, format: u64 header size, JSON header, raw data) so
that bf16 works without torch and a truncated file is reported with the tensor that is cut off.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lensllm_jax.data._files import load_json, open_regular, read_regular
from lensllm_jax.errors import ModelLoadError

from .config import LMConfig

__all__ = [
    "TensorRef",
    "build_params",
    "check_refs",
    "hf_leaf_name",
    "read_safetensors_index",
    "safetensors_refs",
]


# (leaf path, leaf shape, one reader per tensor, stacked per layer?, dtype) -> the leaf
Placer = Callable[
    [tuple[str, ...], tuple[int, ...], list[Callable[[], np.ndarray]], bool, Any], Any
]


class TensorRef(NamedTuple):
    file: str
    name: str  # the name as stored in the file
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    dtype: str = ""  # the stored type ("F32", "BF16", "I64", ...; "float" for GGUF; "" unknown)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "float")


def hf_leaf_name(
    path: tuple[str, ...], top: Mapping[str, str], layer: Mapping[str, str], layer_prefix: str
) -> tuple[str, bool]:
    """Map a params leaf path to (HF name, transpose?).

    ("layers", module, leaf) -> layer_prefix + layer[module] + suffix (with "{i}" for the layer);
    (module, leaf) -> top[module] + suffix. Kernels of linears are transposed.
    """
    *mods, leaf = path
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    if mods[0] == "layers":
        name = layer_prefix + layer[mods[1]] + "." + suffix
    else:
        name = top[mods[0]] + "." + suffix
    return name, leaf == "kernel"


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header (the format's own limit)
MAX_INDEX = 64 << 20  # bytes of a shard index


def safetensors_refs(path: Path) -> dict[str, TensorRef]:
    """Parse a .safetensors header and return lazy refs, without reading tensor data.

    Checked against the header and the file's real size: a regular file; the header length;
    bounded JSON (no duplicate keys); every entry's dtype, shape (whole numbers >= 0) and
    byte range (as long as shape x itemsize, inside the data, not overlapping another
    tensor). Each failure is one `ModelLoadError` line naming the file and the tensor."""
    path = Path(path)
    fd, size = open_regular(path, what="safetensors file", error=ModelLoadError)
    try:
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise ModelLoadError(
                f"{path}: corrupted or truncated safetensors header (claims {n} bytes, "
                f"file has {size}); re-download or re-save the checkpoint"
            )
        text = os.pread(fd, n, 8)
    except OSError as e:
        raise ModelLoadError(f"{path}: unreadable safetensors header ({e.strerror})") from e
    finally:
        os.close(fd)
    try:
        header = load_json(text, where=path, error=ModelLoadError, unique_keys=True)
    except ModelLoadError as e:
        raise ModelLoadError(f"unreadable safetensors header ({e.what})", file=path) from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    refs: dict[str, TensorRef] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code, shape, begin, end = _entry(path, name, info)
        itemsize = np.dtype(_ST_DTYPES[code]).itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: header offsets ({end - begin} bytes) do not match its "
                f"shape {list(shape)} and dtype {code}"
            )
        if end > data_size:
            raise ModelLoadError(
                f"{path}: tensor {name!r} lies past the end of the file (truncated: "
                f"{data_size} data bytes, needs {end}); re-download the checkpoint"
            )
        spans.append((begin, end, name))

        def read(begin=begin, shape=shape, code=code) -> np.ndarray:
            dtype = np.dtype(_ST_DTYPES[code])
            count = math.prod(shape) * dtype.itemsize
            if count == 0:
                return np.zeros(shape, dtype)
            mm = np.memmap(
                path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(count,)
            )
            return np.asarray(mm).view(dtype).reshape(shape)

        refs[name] = TensorRef(str(path), name, shape, read, code)
    last_end, last = 0, ""
    for begin, end, name in sorted(spans):
        if begin < last_end:
            raise ModelLoadError(f"{path}: tensor {name!r} overlaps tensor {last!r} in the data")
        if end > begin:
            last_end, last = end, name
    return refs


def _entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one header entry, each checked for its type."""

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: tensor {name!r} has a corrupted header entry ({what})")

    if not isinstance(info, dict):
        raise bad("not an object")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in _ST_DTYPES:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has unsupported dtype {code!r} "
            f"(supported: {', '.join(_ST_DTYPES)})"
        )

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(whole(d) for d in shape):
        raise bad(f"shape {shape!r:.60} is not a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r:.60} is not two whole numbers >= 0")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets {offsets} end before they begin")
    return code, tuple(shape), begin, end


def read_safetensors_index(index_path: Path) -> dict[str, TensorRef]:
    """Refs of a sharded checkpoint; every tensor must sit in the shard the index names, a
    shard is a file name in the index's own folder (no path), and each shard is checked as
    `safetensors_refs` checks it."""
    index_path = Path(index_path)
    raw = read_regular(index_path, limit=MAX_INDEX, what="shard index", error=ModelLoadError)
    index = load_json(raw, where=index_path, error=ModelLoadError, what="shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(
            f"{index_path}: unreadable shard index ('weight_map' is not an object naming each "
            "tensor's shard)"
        )
    refs: dict[str, TensorRef] = {}
    shards: dict[str, dict[str, TensorRef]] = {}
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or not shard
            or Path(shard).name != shard
            or shard
            in (
                ".",
                "..",
            )
        ):
            raise ModelLoadError(
                f"{index_path}: shard {shard!r:.60} of {name!r} is not a file name in the "
                "model's folder"
            )
        shard_path = index_path.parent / shard
        if shard not in shards:
            if not shard_path.exists():
                raise ModelLoadError(f"{index_path}: shard {shard} (holding {name!r}) is missing")
            shards[shard] = safetensors_refs(shard_path)
        if name not in shards[shard]:
            raise ModelLoadError(f"{shard_path}: tensor {name!r} listed in the index is missing")
        refs[name] = shards[shard][name]
    for shard, srefs in shards.items():
        for name in srefs:
            if name not in weight_map:
                raise ModelLoadError(
                    f"{index_path.parent / shard}: tensor {name!r} is not in the index"
                )
    return refs


# ---------------------------------------------------------------- params assembly


def canonical_refs(
    refs: Mapping[str, TensorRef], prefixes: tuple[str, ...]
) -> dict[str, TensorRef]:
    """Strip the first matching family prefix ("model.", "transformer.", ...) from each name."""
    out: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        canon = name
        for p in prefixes:
            if name.startswith(p):
                canon = name[len(p) :]
                break
        if canon in out:
            raise ModelLoadError(f"{ref.file}: tensor {name!r} appears twice")
        out[canon] = ref
    return out


def _hf_display(family: ModuleType) -> Callable[[str], str]:
    """Canonical name -> the name save_pretrained writes (family prefix restored)."""
    head = family.hf_name(("lm_head", "kernel"))[0]
    return lambda n: n if n == head else family.HF_PREFIXES[0] + n


@functools.lru_cache(maxsize=32)
def _expected(cfg: LMConfig, family: ModuleType):
    """[(leaf path, per-layer?, params shape, HF name template, transpose?)] from eval_shape."""
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0)))
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in kp)
        name, transpose = family.hf_name(path)
        out.append((path, path[0] == "layers", tuple(leaf.shape), name, transpose))
    return out


def check_refs(
    cfg: LMConfig,
    family: ModuleType,
    refs: Mapping[str, TensorRef],
    *,
    where: str,
    display: Callable[[str], str] | None = None,
) -> tuple[dict[str, TensorRef], list, dict[str, tuple[tuple[int, ...], bool]]]:
    """Check a checkpoint's tensors against its config without reading their data: every
    tensor the family needs is present, none is unexpected, each has the shape the config
    implies and a floating-point dtype. Returns (canonical refs, expected leaves, wanted
    name -> (HF shape, transpose?)). Raises one `ModelLoadError` line naming the file and
    tensor. Cost: one `jax.eval_shape` of the family's init (cached per config), O(tensors).
    """
    refs = canonical_refs(refs, family.HF_PREFIXES)
    expected = _expected(cfg, family)
    wanted: dict[str, tuple[tuple[int, ...], bool]] = {}
    for _, per_layer, shape, tpl, transpose in expected:
        s = shape[1:] if per_layer else shape
        hf_shape = tuple(reversed(s)) if transpose else s
        for i in range(cfg.num_layers) if per_layer else [None]:
            wanted[tpl.format(i=i)] = (hf_shape, transpose)

    missing = [n for n in wanted if n not in refs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{where}: tensor {(display or _hf_display(family))(missing[0])!r} is missing{more}; "
            f"the checkpoint does not match "
            f"its config ({cfg.model_type}, {cfg.num_layers} layers)"
        )
    ignore = [re.compile(p) for p in family.HF_IGNORE]
    tied_head = family.hf_name(("lm_head", "kernel"))[0]
    for n, ref in refs.items():
        if n in wanted or any(p.fullmatch(n) for p in ignore):
            continue
        if cfg.tie_word_embeddings and n == tied_head:
            continue  # some tied checkpoints also store the (identical) head
        raise ModelLoadError(
            f"{ref.file}: unexpected tensor {ref.name!r}; the checkpoint does not match its "
            f"config ({cfg.model_type}, {cfg.num_layers} layers)"
        )
    for n, (hf_shape, _) in wanted.items():
        ref = refs[n]
        if tuple(ref.shape) != hf_shape:
            raise ModelLoadError(
                f"{ref.file}: tensor {ref.name!r} has shape {tuple(ref.shape)}, "
                f"config implies {hf_shape}"
            )
        if ref.dtype and ref.dtype not in FLOAT_DTYPES:
            raise ModelLoadError(
                f"{ref.file}: tensor {ref.name!r} is stored as {ref.dtype}, not as floating "
                "point; the header is wrong or this is no weight"
            )
    return refs, expected, wanted


def build_params(
    cfg: LMConfig,
    family: ModuleType,
    refs: Mapping[str, TensorRef],
    *,
    dtype: Any = jnp.float32,
    where: str,
    transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    display: Callable[[str], str] | None = None,
    place: Placer | None = None,
) -> dict:
    """Assemble the params pytree from canonical-named refs (see module docstring).

    `check_refs` first (names, shapes, dtypes), then each tensor is read, transformed,
    checked finite and transposed. `transforms` maps a canonical name to a function applied
    after reading (GGUF un-permute); `display` turns a canonical name into the file's own
    naming for error messages.
    `place(path, shape, readers, per_layer, dtype)`, if given, makes each leaf from its
    readers (one per layer for stacked leaves; each returns that tensor as checked float32
    host data) instead of stacking them on the host: the hook through which
    `lensllm_jax.parallel.loading` puts every tensor straight onto its shards.
    Cost: one read of every tensor, O(N_params) memory in host RAM plus the device copy.
    """
    refs, expected, _ = check_refs(cfg, family, refs, where=where, display=display)

    def read(n: str, transpose: bool) -> np.ndarray:
        ref = refs[n]
        try:
            a = ref.read()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{ref.file}: tensor {ref.name!r} unreadable ({e})") from e
        if transforms and n in transforms:
            a = transforms[n](a)
        a = np.asarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ModelLoadError(f"{ref.file}: tensor {ref.name!r} holds NaN or inf (corrupted)")
        return a.T if transpose else a

    params: dict = {}
    for path, per_layer, shape, tpl, transpose in expected:
        names = [tpl.format(i=i) for i in range(cfg.num_layers)] if per_layer else [tpl]
        readers = [functools.partial(read, n, transpose) for n in names]
        if place is not None:
            value = place(path, shape, readers, per_layer, dtype)
        elif per_layer:
            value = jnp.asarray(np.stack([r() for r in readers]), dtype=dtype)
        else:
            value = jnp.asarray(readers[0](), dtype=dtype)
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return params
