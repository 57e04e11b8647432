"""`load(path)`: local Hugging Face directory, `.gguf` file, or a repo id in the local HF cache.

Never touches the network. Pickle (`pytorch_model.bin`) only through `torch.load(...,
weights_only=True)` and only with `allow_pickle=True`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lensllm_jax.data._files import file_kind, load_json, read_regular
from lensllm_jax.errors import ModelLoadError

from .config import LMConfig, config_from_hf
from .losses import count_params, per_example_loss, token_logprobs
from .weights import (
    TensorRef,
    build_params,
    check_refs,
    read_safetensors_index,
    safetensors_refs,
)

__all__ = [
    "CausalLM",
    "ModelInfo",
    "family_module",
    "from_config",
    "inspect",
    "load",
    "resolve_cached_repo",
]

Array = jax.Array


def family_module(cfg: LMConfig):
    """The module (`gpt2`, `llama`, `opt`, `gpt_neox`) implementing `cfg.family`."""
    return importlib.import_module(f"{__package__}.{cfg.family}")


@dataclasses.dataclass
class CausalLM:
    """A loaded model: `config`, `params` (pytree) and the pure `apply(params, tokens, mask)`.

    `apply` is a plain function (jit/grad/vmap/jvp-able): logits f32 (batch, seq, vocab) for
    int32 tokens (batch, seq) and an optional attention mask (1 = real token).
    """

    config: LMConfig
    params: Any
    apply: Callable[..., Array]
    source: str = ""
    _tokenizer_loader: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """transformers tokenizer from the checkpoint (None if there is none); loaded lazily."""
        return None if self._tokenizer_loader is None else self._tokenizer_loader()

    def per_example_loss(self, params: Any, batch: Mapping[str, Array]) -> Array:
        """`losses.per_example_loss` bound to this model's `apply`."""
        return per_example_loss(self.apply, params, batch)

    def token_logprobs(self, params: Any, tokens: Array, attention_mask: Array | None = None):
        """`losses.token_logprobs` bound to this model's `apply`."""
        return token_logprobs(self.apply, params, tokens, attention_mask)

    @property
    def num_params(self) -> int:
        return count_params(self.params)


@functools.lru_cache(maxsize=64)
def _make_apply(cfg: LMConfig, scan_layers: bool, remat: bool) -> Callable[..., Array]:
    # One function object per architecture: checkpoints of the same architecture share it,
    # so programs jitted with `apply` as a static argument (fine-tuning steps, evaluation,
    # Hessian programs) compile once for all of them.
    fwd = family_module(cfg).forward

    def apply(params: Any, tokens: Array, attention_mask: Array | None = None) -> Array:
        return fwd(cfg, params, tokens, attention_mask, scan_layers=scan_layers, remat=remat)

    apply.__doc__ = fwd.__doc__
    return apply


def from_config(
    config: LMConfig | Mapping[str, Any],
    key: Array | int = 0,
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = True,
    remat: bool = False,
) -> CausalLM:
    """A randomly initialised model (Flax init) from an `LMConfig` or a config.json dict."""
    cfg = config if isinstance(config, LMConfig) else config_from_hf(config)
    key = jax.random.key(key) if isinstance(key, int) else key
    init = jax.jit(family_module(cfg).init_params, static_argnums=(0, 2))
    params = init(cfg, key, dtype)
    return CausalLM(cfg, params, _make_apply(cfg, scan_layers, remat), source="random init")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `inspect` learns about a checkpoint without reading its weights."""

    location: Path  # the resolved HF folder (a cache snapshot for a repo id) or .gguf file
    config: LMConfig
    tokenizer_loader: Callable[[], Any] | None  # None: the checkpoint carries no tokenizer
    files: tuple[Path, ...] = ()  # every file the model is read from (config, weights, tokenizer)


MAX_CONFIG = 16 << 20  # bytes of a config.json
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "merges.txt",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def inspect(
    path: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None
) -> ModelInfo:
    """Resolve `path` as `load` does and check it completely without reading tensor data:
    the config (`config.check_config`), every tensor's name, dtype, shape and byte range
    against the headers and the config (`weights.check_refs`), and that the tokenizer files
    are regular files.

    Raises `ModelLoadError` (one line naming the file and field) for a missing path, a
    folder without config.json or weights, a config the zoo cannot run, a weight file whose
    header or tensors do not match it, a FIFO or device where a file belongs.
    Cost: O(header bytes) plus one `jax.eval_shape` of the family's init.
    """
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and (p.exists() or p.is_symlink()) and not p.is_dir():
        from . import llama
        from .gguf_file import gguf_config, gguf_name, gguf_refs, open_gguf

        reader = open_gguf(p)
        cfg = gguf_config(reader, p)
        refs, _ = gguf_refs(reader, p, cfg)
        check_refs(cfg, llama, refs, where=str(p), display=gguf_name)
        return ModelInfo(p, cfg, _gguf_tokenizer(p, reader), (p,))
    if not p.is_dir():
        if p.exists():
            raise ModelLoadError(f"{p}: not a model directory or .gguf file")
        looks_like_file = p.suffix.lower() in (".gguf", ".safetensors", ".json", ".bin")
        if looks_like_file or str(path).count("/") > 1 or str(path).startswith((".", "/", "~")):
            raise ModelLoadError(f"{p}: no such file or folder")
        p = resolve_cached_repo(str(path), revision)
    cfg = _hf_config(p)
    refs = _hf_refs(p, allow_pickle)
    check_refs(cfg, family_module(cfg), refs, where=str(p))
    tokenizer_files = _checked_tokenizer_files(p)
    weight_files = sorted({Path(r.file) for r in refs.values()})
    index = p / "model.safetensors.index.json"
    files = (p / "config.json", *([index] if index.is_file() else []), *weight_files)
    return ModelInfo(p, cfg, _tokenizer_from_dir(p), (*files, *tokenizer_files))


def load(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = True,
    remat: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    mesh: Any = None,
) -> CausalLM:
    """Load a causal LM for JAX.

    path: a local HF directory (config.json + model.safetensors, or sharded safetensors with
    `model.safetensors.index.json`), a `.gguf` file, or a repo id ("org/name") already in the
    local Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub).
    dtype: parameter (and compute) dtype, jnp.float32 or jnp.bfloat16.
    Raises `ModelLoadError` (a ValueError) with one line naming the file and tensor at fault.
    mesh: a `jax.sharding.Mesh` (`lensllm_jax.parallel.make_mesh`): each tensor goes straight
    to its shards as it is read (`parallel.loading`; the sharding rules of `parallel.rules`),
    so no device holds the whole model and the host holds one tensor at a time.
    Cost: reads every tensor once; peak host memory ≈ 2× the f32 model (one layer's tensor
    with a mesh).
    """
    info = inspect(path, allow_pickle=allow_pickle, revision=revision)
    place = None
    if mesh is not None:
        from lensllm_jax.parallel.loading import placer

        place = placer(mesh)
    if info.location.suffix == ".gguf":
        return _load_gguf(info, dtype, scan_layers, remat, place)
    return _load_hf_dir(info, dtype, scan_layers, remat, allow_pickle, place)


def hf_cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def resolve_cached_repo(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot directory of `repo_id` in the local HF cache (offline; no download ever)."""
    cache = hf_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir() or ".." in repo_id.split("/"):
        raise ModelLoadError(
            f"{repo_id}: not a local path and not in the Hugging Face cache {cache}; download it "
            f"first (e.g. `hf download {repo_id}`) — lensllm never downloads"
        )
    rev = revision or "main"
    ref = repo / "refs" / rev
    if ref.exists():
        raw = read_regular(ref, limit=4096, what="cache reference", error=ModelLoadError)
        commit = raw.decode("utf-8", "replace").strip()
    else:
        commit = rev
    if not commit or Path(commit).name != commit or commit in (".", ".."):
        raise ModelLoadError(f"{ref}: names no snapshot ({commit[:60]!r})")
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        raise ModelLoadError(f"{repo}: revision {rev!r} has no snapshot in the local cache")
    return snap


def _tokenizer_from_dir(d: Path) -> Callable[[], Any] | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((d / n).exists() for n in names):
        return None

    def load_tok():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)

    return load_tok


def _checked_tokenizer_files(d: Path) -> tuple[Path, ...]:
    """The tokenizer files present in `d`; each must be a regular file (a FIFO or a device
    would block or stream forever inside transformers)."""
    out = []
    for name in TOKENIZER_FILES:
        f = d / name
        try:
            st = f.stat()
        except FileNotFoundError:
            if f.is_symlink():
                raise ModelLoadError(f"{f}: a symbolic link to nothing") from None
            continue
        except OSError as e:
            raise ModelLoadError(f"{f}: unreadable ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{f}: is {file_kind(st.st_mode)}, not a regular file")
        out.append(f)
    return tuple(out)


def _hf_config(d: Path) -> LMConfig:
    cfg_path = d / "config.json"
    if not (cfg_path.exists() or cfg_path.is_symlink()):
        raise ModelLoadError(f"{d}: no config.json; not a Hugging Face model directory")
    raw = read_regular(cfg_path, limit=MAX_CONFIG, what="config.json", error=ModelLoadError)
    conf = load_json(raw, where=cfg_path, error=ModelLoadError, what="config.json")
    if not isinstance(conf, dict):
        raise ModelLoadError(f"{cfg_path}: not a JSON object")
    return config_from_hf(conf, where=str(cfg_path))


def _load_hf_dir(info: ModelInfo, dtype, scan_layers, remat, allow_pickle, place) -> CausalLM:
    d, cfg = info.location, info.config
    refs = _hf_refs(d, allow_pickle)
    params = build_params(cfg, family_module(cfg), refs, dtype=dtype, where=str(d), place=place)
    return CausalLM(
        cfg, params, _make_apply(cfg, scan_layers, remat), str(d), info.tokenizer_loader
    )


def _hf_refs(d: Path, allow_pickle: bool) -> dict[str, TensorRef]:
    for name, reader in (
        ("model.safetensors.index.json", read_safetensors_index),
        ("model.safetensors", safetensors_refs),
    ):
        if (d / name).exists() or (d / name).is_symlink():
            return reader(d / name)  # checks it is a regular file
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        if not allow_pickle:
            raise ModelLoadError(
                f"{bins[0]}: only a pickle checkpoint is present; convert it to safetensors or "
                f"pass allow_pickle=True (loads via torch.load(weights_only=True))"
            )
        return _torch_bin_refs(bins)
    raise ModelLoadError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _torch_bin_refs(files: list[Path]) -> dict[str, TensorRef]:
    import torch  # only on explicit request

    refs: dict[str, TensorRef] = {}
    for f in files:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{f}: unreadable torch checkpoint ({e})") from e
        for name, t in sd.items():
            arr = t.detach().to(torch.float32).numpy()
            refs[name] = TensorRef(str(f), name, tuple(arr.shape), lambda a=arr: a)
    return refs


def _gguf_tokenizer(p: Path, reader: Any) -> Callable[[], Any] | None:
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None

    def load_tok():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)

    return load_tok


def _load_gguf(info: ModelInfo, dtype, scan_layers, remat, place) -> CausalLM:
    from . import llama
    from .gguf_file import gguf_name, gguf_refs, open_gguf

    p, cfg = info.location, info.config
    refs, transforms = gguf_refs(open_gguf(p), p, cfg)
    params = build_params(
        cfg,
        llama,
        refs,
        dtype=dtype,
        where=str(p),
        transforms=transforms,
        display=gguf_name,
        place=place,
    )
    return CausalLM(
        cfg, params, _make_apply(cfg, scan_layers, remat), str(p), info.tokenizer_loader
    )
