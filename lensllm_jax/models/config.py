"""One frozen, hashable `LMConfig` for every family, parsed from a Hugging Face config.json.

config.json comes in two dialects and both are read:
- transformers 4.x: top-level `rope_theta`, `rope_scaling` ({"type"|"rope_type": ...}),
  `rotary_pct` / `rotary_emb_base` (GPT-NeoX), `partial_rotary_factor`;
- transformers 5.x: `rope_parameters` = {"rope_theta", "rope_type", "partial_rotary_factor", ...}.
`save_pretrained` omits every value equal to the class default, so missing keys fall back to the
transformers defaults of that `model_type` (tables below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lensllm_jax.errors import ModelConfigError

__all__ = ["FAMILY_OF_MODEL_TYPE", "LMConfig", "config_from_hf"]

# model_type -> family module name (one file per family).
FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "gpt_neox": "gpt_neox",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static jit argument.

    `rotary_dim` = 0 means learned absolute positions (GPT-2, OPT); otherwise the first
    `rotary_dim` dims of each head are rotated (RoPE, `rotate_half` convention of transformers).
    `rope_scaling` holds the sorted (key, value) items of the rope-scaling dict, () if none.
    """

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    sliding_window: int | None = None
    # GPT-2
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # OPT
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    word_embed_proj_dim: int = 0
    layer_norm_affine: bool = True
    # GPT-NeoX
    parallel_residual: bool = False

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    def replace(self, **changes: Any) -> LMConfig:
        return dataclasses.replace(self, **changes)


# transformers' class defaults, used for keys that save_pretrained left out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        head_dim=None,
        rope_theta=10000.0,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        head_dim=None,
        rope_theta=10000.0,
        sliding_window=4096,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        use_sliding_window=False,
        sliding_window=None,
    ),
    "opt": dict(
        vocab_size=50272,
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        _remove_final_layer_norm=False,
        word_embed_proj_dim=None,
        num_attention_heads=12,
        activation_function="relu",
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=True,
    ),
    "gpt_neox": dict(
        vocab_size=50432,
        hidden_size=6144,
        num_hidden_layers=44,
        num_attention_heads=64,
        intermediate_size=24576,
        hidden_act="gelu",
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        attention_bias=True,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
    ),
}


def _rope(d: Mapping[str, Any], defaults: Mapping[str, Any], where: str):
    """(theta, partial_rotary_factor, scaling items) from either config.json dialect."""
    params = d.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or (
        params
        and "rope_theta" not in params
        and all(isinstance(v, Mapping) for v in params.values())
    ):
        raise ModelConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base")))
    theta = float(defaults.get("rope_theta", 10000.0) if theta is None else theta)
    partial = params.get(
        "partial_rotary_factor",
        d.get("partial_rotary_factor", d.get("rotary_pct", defaults.get("partial_rotary_factor"))),
    )
    partial = 1.0 if partial is None else float(partial)
    scaling = dict(d.get("rope_scaling") or {})
    if not scaling and params:
        scaling = {
            k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{where}: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    items: tuple[tuple[str, Any], ...] = ()
    if rope_type != "default":
        scaling.pop("rope_theta", None)
        scaling.pop("partial_rotary_factor", None)
        items = tuple(sorted({**scaling, "rope_type": rope_type}.items()))
    return theta, partial, items


def config_from_hf(d: Mapping[str, Any], where: str = "config.json") -> LMConfig:
    """Parse a config.json dict (either dialect) into an `LMConfig`.

    Raises `ModelConfigError` naming `where` for an unknown or unsupported `model_type`.
    """
    model_type = d.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ModelConfigError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))})"
        )
    defaults = _DEFAULTS[model_type]
    g = {**defaults, **{k: v for k, v in d.items() if v is not None or k not in defaults}}
    family = FAMILY_OF_MODEL_TYPE[model_type]
    try:
        return _PARSERS[family](g, defaults, model_type, where)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ModelConfigError(f"{where}: malformed {model_type} config ({e!r})") from e


def _gpt2(g, defaults, model_type, where) -> LMConfig:
    h, nh = int(g["n_embd"]), int(g["n_head"])
    return LMConfig(
        family="gpt2",
        model_type=model_type,
        vocab_size=int(g["vocab_size"]),
        hidden_size=h,
        num_layers=int(g["n_layer"]),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=int(g["n_inner"] or 4 * h),
        max_position_embeddings=int(g["n_positions"]),
        norm_eps=float(g["layer_norm_epsilon"]),
        activation=str(g["activation_function"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        scale_attn_weights=bool(g["scale_attn_weights"]),
        scale_attn_by_inverse_layer_idx=bool(g["scale_attn_by_inverse_layer_idx"]),
    )


def _llama(g, defaults, model_type, where) -> LMConfig:
    h, nh = int(g["hidden_size"]), int(g["num_attention_heads"])
    head_dim = int(g.get("head_dim") or h // nh)
    theta, partial, scaling = _rope(g, defaults, where)
    qkv_bias = bool(g.get("attention_bias", False)) or model_type == "qwen2"
    window = None
    if model_type == "mistral":
        window = g.get("sliding_window")
    elif model_type == "qwen2" and g.get("use_sliding_window"):
        raise ModelConfigError(f"{where}: Qwen2 use_sliding_window=true is not supported")
    return LMConfig(
        family="llama",
        model_type=model_type,
        vocab_size=int(g["vocab_size"]),
        hidden_size=h,
        num_layers=int(g["num_hidden_layers"]),
        num_heads=nh,
        num_kv_heads=int(g.get("num_key_value_heads") or nh),
        head_dim=head_dim,
        intermediate_size=int(g["intermediate_size"]),
        max_position_embeddings=int(g["max_position_embeddings"]),
        norm_eps=float(g["rms_norm_eps"]),
        activation=str(g["hidden_act"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        qkv_bias=qkv_bias,
        o_bias=bool(g.get("attention_bias", False)),
        mlp_bias=bool(g.get("mlp_bias", False)),
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_scaling=scaling,
        sliding_window=None if window is None else int(window),
    )


def _opt(g, defaults, model_type, where) -> LMConfig:
    h, nh = int(g["hidden_size"]), int(g["num_attention_heads"])
    bias = bool(g["enable_bias"])
    pre = bool(g["do_layer_norm_before"])
    return LMConfig(
        family="opt",
        model_type=model_type,
        vocab_size=int(g["vocab_size"]),
        hidden_size=h,
        num_layers=int(g["num_hidden_layers"]),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=int(g["ffn_dim"]),
        max_position_embeddings=int(g["max_position_embeddings"]),
        norm_eps=1e-5,
        activation=str(g["activation_function"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        do_layer_norm_before=pre,
        final_layer_norm=pre and not bool(g["_remove_final_layer_norm"]),
        word_embed_proj_dim=int(g["word_embed_proj_dim"] or h),
        layer_norm_affine=bool(g["layer_norm_elementwise_affine"]),
    )


def _gpt_neox(g, defaults, model_type, where) -> LMConfig:
    h, nh = int(g["hidden_size"]), int(g["num_attention_heads"])
    theta, partial, scaling = _rope(g, defaults, where)
    bias = bool(g["attention_bias"])
    return LMConfig(
        family="gpt_neox",
        model_type=model_type,
        vocab_size=int(g["vocab_size"]),
        hidden_size=h,
        num_layers=int(g["num_hidden_layers"]),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=int(g["intermediate_size"]),
        max_position_embeddings=int(g["max_position_embeddings"]),
        norm_eps=float(g["layer_norm_eps"]),
        activation=str(g["hidden_act"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rope_theta=theta,
        rotary_dim=int((h // nh) * partial),
        rope_scaling=scaling,
        parallel_residual=bool(g["use_parallel_residual"]),
    )


_PARSERS = {"gpt2": _gpt2, "llama": _llama, "opt": _opt, "gpt_neox": _gpt_neox}
