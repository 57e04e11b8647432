"""Public model shapes for planning without a checkpoint: `lensllm plan gpt2-small ...`.

The dimensions are those of the models' published Hugging Face config.json files
(openai-community/gpt2, HuggingFaceTB/SmolLM2-135M and -1.7B, meta-llama/Meta-Llama-3-8B),
written out here so that planning needs no download. Only shapes matter to a plan.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_config"]

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(  # 124M
        model_type="gpt2",
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
    ),
    "smollm2-135m": dict(  # 135M
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(  # 1.71B
        model_type="llama",
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=130000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(  # 8.03B
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


def preset_config(name: str) -> dict[str, Any] | None:
    """The config.json dict of a preset name (case-insensitive), or None."""
    return PRESETS.get(name.lower())
