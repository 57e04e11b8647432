"""GGUF (llama.cpp) files: config from metadata, tensors dequantised to float32.

Any type the `gguf` package can dequantise is read (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0 and
the k-quants). llama.cpp stores the q/k projections of the "llama" architecture with rows
permuted for its interleaved RoPE: per head, W[(h, half, j)] -> W[(h, j, half)]; we undo it so
the `rotate_half` RoPE of transformers applies. Qwen2 is stored unpermuted.
Llama-3 rope scaling arrives as a `rope_freqs.weight` tensor of per-frequency divisors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.errors import ModelConfigError, ModelLoadError

from .config import LMConfig
from .weights import TensorRef

__all__ = ["gguf_config", "gguf_name", "gguf_refs", "open_gguf", "unpermute_qk"]

SUPPORTED_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

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


def open_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted types on malformed input
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: Any, path: Path) -> LMConfig:
    """LMConfig from `{arch}.*` metadata (head counts, dims, rope base, eps, context length)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing")
        vocab = int(emb.shape[-1])
    scaling: tuple[tuple[str, Any], ...] = ()
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = (
            ("factors", tuple(float(x) for x in np.asarray(t.data).ravel())),
            ("rope_type", "freq_factors"),
        )
    elif _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = (("factor", float(need("rope.scaling.factor"))), ("rope_type", "linear"))
    elif _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        kind = _field(reader, f"{arch}.rope.scaling.type")
        raise ModelConfigError(f"{path}: GGUF rope scaling {kind!r} is not supported")
    return LMConfig(
        family="llama",
        model_type=SUPPORTED_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        activation="silu",
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rotary_dim=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_scaling=scaling,
    )


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
    reader: Any, path: Path, cfg: LMConfig
) -> tuple[dict[str, TensorRef], dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """Canonical-named refs (dequantised on read) and the q/k un-permutations to apply."""
    from gguf import GGMLQuantizationType, quants

    refs: dict[str, TensorRef] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # consumed by gguf_config
        canon = _canonical(t.name)
        if canon is None:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        qtype = GGMLQuantizationType(t.tensor_type)

        def read(t=t, qtype=qtype, shape=shape) -> np.ndarray:
            try:
                a = quants.dequantize(np.asarray(t.data), qtype)
            except (NotImplementedError, ValueError) as e:
                raise ModelLoadError(
                    f"{path}: tensor {t.name!r} of type {qtype.name} cannot be dequantised ({e})"
                ) from e
            return np.asarray(a, dtype=np.float32).reshape(shape)

        refs[canon] = TensorRef(str(path), t.name, shape, read)
    transforms: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if cfg.model_type in ("llama", "mistral"):
        for i in range(cfg.num_layers):
            for proj, nh in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
                for leaf in ("weight", "bias"):
                    transforms[f"layers.{i}.self_attn.{proj}.{leaf}"] = lambda a, nh=nh: (
                        unpermute_qk(a, nh)
                    )
    return refs, transforms
