"""Tiny random transformers models (the PyTorch reference) for the model-zoo tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 97
SEQ = 12

# name -> (config class name, kwargs); covers every family and the options the loader must honour.
TINY: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2_untied_inv_layer": (
        "GPT2Config",
        dict(
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            n_inner=40,
            activation_function="gelu",
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
        ),
    ),
    "llama3_gqa_head_dim_tied": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "llama2_untied": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama_linear_rope_bias": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
    ),
    "mistral_sliding": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=5,
        ),
    ),
    "qwen2_bias_tied": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    ),
    "opt_350m_style": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            do_layer_norm_before=False,
            word_embed_proj_dim=16,
        ),
    ),
    "neox_partial_rotary": (
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25
            ),
        ),
    ),
    "neox_sequential": (
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            use_parallel_residual=False,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5
            ),
        ),
    ),
}


def tiny_torch_model(name: str, seed: int = 0):
    """A tiny transformers model with every weight (norms and biases too) randomised."""
    cls_name, kw = TINY[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_name)(
        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save(model, d: Path, **kw) -> Path:
    model.save_pretrained(str(d), **kw)
    return d


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def rel_err(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b) if where is None else np.abs(a - b)[where]
    return float(d.max() / np.abs(b).max())


def to_v4_dialect(config_path: Path) -> dict:
    """Rewrite a 5.x config.json the way transformers 4.x wrote it (top-level rope keys)."""
    d = json.loads(config_path.read_text())
    rp = d.pop("rope_parameters", None) or {}
    if "rope_theta" in rp:
        key = "rotary_emb_base" if d["model_type"] == "gpt_neox" else "rope_theta"
        d[key] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        d["rotary_pct"] = rp.pop("partial_rotary_factor")
    kind = rp.pop("rope_type", "default")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    config_path.write_text(json.dumps(d))
    return d
