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
import json
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

from lensllm_jax.errors import ModelLoadError

from .config import LMConfig

__all__ = [
    "TensorRef",
    "build_params",
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


def safetensors_refs(path: Path) -> dict[str, TensorRef]:
    """Parse a .safetensors header and return lazy refs; validates offsets against file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise ModelLoadError(
                    f"{path}: corrupted or truncated safetensors header (claims {n} bytes, "
                    f"file has {size}); re-download or re-save the checkpoint"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and info.get("dtype") not in _ST_DTYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r} "
                f"(supported: {', '.join(_ST_DTYPES)})"
            )
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: tensor {name!r} has a corrupted header entry") from e
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise ModelLoadError(f"{path}: tensor {name!r}: header offsets do not match its shape")
        if end > data_size:
            raise ModelLoadError(
                f"{path}: tensor {name!r} lies past the end of the file (truncated: "
                f"{data_size} data bytes, needs {end}); re-download the checkpoint"
            )

        def read(begin=begin, shape=shape, dtype=dtype) -> np.ndarray:
            mm = np.memmap(
                path,
                dtype=np.uint8,
                mode="r",
                offset=data_start + begin,
                shape=(int(np.prod(shape)) * dtype.itemsize,),
            )
            return np.asarray(mm).view(dtype).reshape(shape)

        refs[name] = TensorRef(str(path), name, shape, read)
    return refs


def read_safetensors_index(index_path: Path) -> dict[str, TensorRef]:
    """Refs of a sharded checkpoint; every tensor must sit in the shard the index names."""
    try:
        weight_map = json.loads(Path(index_path).read_text())["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_path}: unreadable shard index ({e!r})") from e
    refs: dict[str, TensorRef] = {}
    shards: dict[str, dict[str, TensorRef]] = {}
    for name, shard in weight_map.items():
        shard_path = Path(index_path).parent / shard
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
                    f"{Path(index_path).parent / shard}: tensor {name!r} is not in the index"
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


def _expected(cfg: LMConfig, family: ModuleType):
    """[(leaf path, per-layer?, params shape, HF name template, transpose?)] from eval_shape."""
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0)))
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in kp)
        name, transpose = family.hf_name(path)
        out.append((path, path[0] == "layers", tuple(leaf.shape), name, transpose))
    return out


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

    `transforms` maps a canonical name to a function applied after reading (GGUF un-permute);
    `display` turns a canonical name into the file's own naming for error messages.
    `place(path, shape, readers, per_layer, dtype)`, if given, makes each leaf from its
    readers (one per layer for stacked leaves; each returns that tensor as checked float32
    host data) instead of stacking them on the host: the hook through which
    `lensllm_jax.parallel.loading` puts every tensor straight onto its shards.
    Cost: one read of every tensor, O(N_params) memory in host RAM plus the device copy.
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
        if tuple(refs[n].shape) != hf_shape:
            raise ModelLoadError(
                f"{refs[n].file}: tensor {refs[n].name!r} has shape {tuple(refs[n].shape)}, "
                f"config implies {hf_shape}"
            )

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
