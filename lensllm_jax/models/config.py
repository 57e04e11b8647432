"""One frozen, hashable `LMConfig` for every family, parsed from a Hugging Face config.json.

config.json comes in two dialects and both are read:
- transformers 4.x: top-level `rope_theta`, `rope_scaling` ({"type"|"rope_type": ...}),
  `rotary_pct` / `rotary_emb_base` (GPT-NeoX), `partial_rotary_factor`;
- transformers 5.x: `rope_parameters` = {"rope_theta", "rope_type", "partial_rotary_factor", ...}.
`save_pretrained` omits every value equal to the class default, so missing keys fall back to the
transformers defaults of that `model_type` (tables below).

Every value is read strictly (a dimension is a whole number >= 1, a bool is a bool, an
epsilon or a rope base a finite number > 0) and the result is checked as a whole
(`check_config`: divisibility of heads, a rotary part that fits the head, known activation
and rope type, sane upper limits on every dimension), so a config that describes no
runnable model is one `ModelConfigError` line naming the file and the field, before any
weight is read or allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from lensllm_jax.errors import ModelConfigError

__all__ = ["FAMILY_OF_MODEL_TYPE", "KNOWN_ACTIVATIONS", "LIMITS", "LMConfig", "check_config",
           "config_from_hf"]  # fmt: skip

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
# The activation names `layers.ACTIVATIONS` implements (kept equal by a test).
KNOWN_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")
# Upper limits of a config's dimensions: far above any released model, far below what
# would exhaust memory while checking it (a 1 KB config claiming 10^9 layers).
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "num_layers": 1 << 12,
    "num_heads": 1 << 12,
    "num_kv_heads": 1 << 12,
    "head_dim": 1 << 12,
    "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 27,
    "word_embed_proj_dim": 1 << 17,
    "sliding_window": 1 << 27,
}


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


class _Reader:
    """Typed, strict access to a config's values; every failure names `where` and the key."""

    def __init__(self, g: Mapping[str, Any], where: str):
        self.g, self.where = g, where

    def fail(self, key: str, value: Any, want: str) -> ModelConfigError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return ModelConfigError(f"{self.where}: field {key!r} is {shown}; it must be {want}")

    def whole(self, key: str, value: Any = None, *, minimum: int = 1) -> int:
        v = self.g.get(key) if value is None else value
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, v, f"a whole number >= {minimum}")
        return v

    def opt_int(self, key: str) -> int | None:
        v = self.g.get(key)
        return None if v is None else self.whole(key, v)

    def number(self, key: str, value: Any = None, *, positive: bool = True) -> float:
        v = self.g.get(key) if value is None else value
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self.fail(key, v, "a finite number" + (" > 0" if positive else ""))
        if positive and v <= 0:
            raise self.fail(key, v, "a finite number > 0")
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.g.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
        raise self.fail(key, v, "true or false")

    def text(self, key: str) -> str:
        v = self.g.get(key)
        if not isinstance(v, str):
            raise self.fail(key, v, "a string")
        return v


def _rope(r: _Reader, defaults: Mapping[str, Any]):
    """(theta, partial_rotary_factor, scaling items) from either config.json dialect."""
    d, where = r.g, r.where
    params = d.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise r.fail("rope_parameters", params, "an object")
    if (
        params
        and "rope_theta" not in params
        and all(isinstance(v, Mapping) for v in params.values())
    ):
        raise ModelConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base")))
    theta = r.number("rope_theta", defaults.get("rope_theta", 10000.0) if theta is None else theta)
    partial = params.get(
        "partial_rotary_factor",
        d.get("partial_rotary_factor", d.get("rotary_pct", defaults.get("partial_rotary_factor"))),
    )
    partial = 1.0 if partial is None else r.number("partial_rotary_factor", partial)
    if partial > 1.0:
        raise r.fail("partial_rotary_factor", partial, "a fraction in (0, 1]")
    raw = d.get("rope_scaling") or {}
    if not isinstance(raw, Mapping):
        raise r.fail("rope_scaling", raw, "an object")
    scaling = dict(raw)
    if not scaling and params:
        scaling = {
            k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{where}: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    items: tuple[tuple[str, Any], ...] = ()
    if rope_type != "default":
        scaling.pop("rope_theta", None)
        scaling.pop("partial_rotary_factor", None)
        scaling = _rope_scaling(_Reader(scaling, f"{where}: rope scaling"), rope_type)
        items = tuple(sorted({**scaling, "rope_type": rope_type}.items()))
    return theta, partial, items


def _rope_scaling(r: _Reader, rope_type: str) -> dict[str, Any]:
    """The scaling parameters a rope type needs, checked (factor > 0; llama3's band)."""
    out: dict[str, Any] = {k: v for k, v in r.g.items() if isinstance(v, (str, int, float))}
    out["factor"] = r.number("factor")
    if rope_type == "llama3":
        lo, hi = r.number("low_freq_factor"), r.number("high_freq_factor")
        if hi <= lo:
            raise r.fail("high_freq_factor", hi, f"larger than low_freq_factor ({lo:g})")
        out.update(low_freq_factor=lo, high_freq_factor=hi)
        out["original_max_position_embeddings"] = r.whole("original_max_position_embeddings")
    return out


def config_from_hf(d: Mapping[str, Any], where: str = "config.json") -> LMConfig:
    """Parse a config.json dict (either dialect) into an `LMConfig`, checked (`check_config`).

    Raises `ModelConfigError` naming `where` for an unknown or unsupported `model_type`, a
    value of the wrong type or out of range, or a combination no model has.
    """
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILY_OF_MODEL_TYPE:
        shown = model_type if isinstance(model_type, str) else f"{type(model_type).__name__}"
        raise ModelConfigError(
            f"{where}: model_type {shown!r} is not supported "
            f"(supported: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))})"
        )
    defaults = _DEFAULTS[model_type]
    g = {**defaults, **{k: v for k, v in d.items() if v is not None or k not in defaults}}
    family = FAMILY_OF_MODEL_TYPE[model_type]
    cfg = _PARSERS[family](_Reader(g, where), defaults, model_type)
    return check_config(cfg, where)


def check_config(cfg: LMConfig, where: str) -> LMConfig:
    """`cfg` if it describes a model the zoo can run, else one `ModelConfigError` line:
    every dimension within (0, `LIMITS`], heads dividing the width (when the head size is
    derived) and key/value heads dividing the heads, an even rotary part no wider than a
    head (RoPE families), a known activation and rope type, finite eps and rope base > 0.
    Cost O(1) (O(rotary_dim) for GGUF frequency factors)."""

    def bad(what: str) -> ModelConfigError:
        return ModelConfigError(f"{where}: {what}")

    if cfg.family != "llama" and cfg.hidden_size != cfg.num_heads * cfg.head_dim:
        raise bad(f"{cfg.num_heads} attention heads do not divide the width {cfg.hidden_size}")
    for name, top in LIMITS.items():
        v = getattr(cfg, name)
        if v is None or (name == "word_embed_proj_dim" and v == 0):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise bad(f"{name} = {v!r} is out of range (a whole number in 1..{top})")
    if cfg.num_heads % cfg.num_kv_heads:
        raise bad(
            f"{cfg.num_kv_heads} key/value heads do not divide {cfg.num_heads} attention heads"
        )
    if cfg.activation not in KNOWN_ACTIVATIONS:
        raise bad(
            f"activation {cfg.activation!r} is not supported "
            f"(supported: {', '.join(KNOWN_ACTIVATIONS)})"
        )
    if cfg.family in ("llama", "gpt_neox"):
        if not (2 <= cfg.rotary_dim <= cfg.head_dim and cfg.rotary_dim % 2 == 0):
            raise bad(
                f"rotary dimension {cfg.rotary_dim} must be even and in 2..{cfg.head_dim} "
                "(the head size)"
            )
        if not (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
            raise bad(f"rope base {cfg.rope_theta!r} must be a finite number > 0")
        factors = dict(cfg.rope_scaling).get("factors")
        if factors is not None and (
            len(factors) != cfg.rotary_dim // 2
            or not all(math.isfinite(f) and f > 0 for f in factors)
        ):
            raise bad(
                f"rope frequency factors must be {cfg.rotary_dim // 2} finite numbers > 0 "
                f"(got {len(factors)})"
            )
    if cfg.rope_type not in (*SUPPORTED_ROPE_TYPES, "freq_factors"):
        raise bad(f"rope type {cfg.rope_type!r} is not supported")
    if not (math.isfinite(cfg.norm_eps) and cfg.norm_eps > 0):
        raise bad(f"norm epsilon {cfg.norm_eps!r} must be a finite number > 0")
    return cfg


def _gpt2(r: _Reader, defaults, model_type) -> LMConfig:
    h, nh = r.whole("n_embd"), r.whole("n_head")
    return LMConfig(
        family="gpt2",
        model_type=model_type,
        vocab_size=r.whole("vocab_size"),
        hidden_size=h,
        num_layers=r.whole("n_layer"),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=r.opt_int("n_inner") or 4 * h,
        max_position_embeddings=r.whole("n_positions"),
        norm_eps=r.number("layer_norm_epsilon"),
        activation=r.text("activation_function"),
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        scale_attn_weights=r.flag("scale_attn_weights"),
        scale_attn_by_inverse_layer_idx=r.flag("scale_attn_by_inverse_layer_idx"),
    )


def _llama(r: _Reader, defaults, model_type) -> LMConfig:
    g, where = r.g, r.where
    h, nh = r.whole("hidden_size"), r.whole("num_attention_heads")
    head_dim = r.opt_int("head_dim") if g.get("head_dim") != 0 else None
    head_dim = head_dim or h // nh
    if g.get("head_dim") in (None, 0) and h % nh:
        raise ModelConfigError(f"{where}: {nh} attention heads do not divide the width {h}")
    theta, partial, scaling = _rope(r, defaults)
    qkv_bias = r.flag("attention_bias")
    window = None
    if model_type == "mistral":
        window = r.opt_int("sliding_window")
    elif model_type == "qwen2" and g.get("use_sliding_window"):
        raise ModelConfigError(f"{where}: Qwen2 use_sliding_window=true is not supported")
    return LMConfig(
        family="llama",
        model_type=model_type,
        vocab_size=r.whole("vocab_size"),
        hidden_size=h,
        num_layers=r.whole("num_hidden_layers"),
        num_heads=nh,
        num_kv_heads=r.opt_int("num_key_value_heads") or nh,
        head_dim=head_dim,
        intermediate_size=r.whole("intermediate_size"),
        max_position_embeddings=r.whole("max_position_embeddings"),
        norm_eps=r.number("rms_norm_eps"),
        activation=r.text("hidden_act"),
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        qkv_bias=qkv_bias or model_type == "qwen2",
        o_bias=qkv_bias,
        mlp_bias=r.flag("mlp_bias"),
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_scaling=scaling,
        sliding_window=window,
    )


def _opt(r: _Reader, defaults, model_type) -> LMConfig:
    h, nh = r.whole("hidden_size"), r.whole("num_attention_heads")
    bias = r.flag("enable_bias")
    pre = r.flag("do_layer_norm_before")
    return LMConfig(
        family="opt",
        model_type=model_type,
        vocab_size=r.whole("vocab_size"),
        hidden_size=h,
        num_layers=r.whole("num_hidden_layers"),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=r.whole("ffn_dim"),
        max_position_embeddings=r.whole("max_position_embeddings"),
        norm_eps=1e-5,
        activation=r.text("activation_function"),
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        do_layer_norm_before=pre,
        final_layer_norm=pre and not r.flag("_remove_final_layer_norm"),
        word_embed_proj_dim=r.opt_int("word_embed_proj_dim") or h,
        layer_norm_affine=r.flag("layer_norm_elementwise_affine"),
    )


def _gpt_neox(r: _Reader, defaults, model_type) -> LMConfig:
    h, nh = r.whole("hidden_size"), r.whole("num_attention_heads")
    theta, partial, scaling = _rope(r, defaults)
    bias = r.flag("attention_bias")
    return LMConfig(
        family="gpt_neox",
        model_type=model_type,
        vocab_size=r.whole("vocab_size"),
        hidden_size=h,
        num_layers=r.whole("num_hidden_layers"),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=r.whole("intermediate_size"),
        max_position_embeddings=r.whole("max_position_embeddings"),
        norm_eps=r.number("layer_norm_eps"),
        activation=r.text("hidden_act"),
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rope_theta=theta,
        rotary_dim=int((h // nh) * partial),
        rope_scaling=scaling,
        parallel_residual=r.flag("use_parallel_residual"),
    )


_PARSERS = {"gpt2": _gpt2, "llama": _llama, "opt": _opt, "gpt_neox": _gpt_neox}
