"""Flax causal-LM zoo: exact JAX ports of GPT-2, Llama (2/3, Mistral, Qwen2, SmolLM2), OPT and
GPT-NeoX, loaded from Hugging Face safetensors (single or sharded), GGUF, or the local HF cache.

    m = models.load("path/or/org/name_or_file.gguf")
    logits = m.apply(m.params, tokens)                 # pure; jit/grad/jvp-able
    losses = models.per_example_loss(m.apply, m.params, {"tokens": t, "loss_mask": lm})
"""

from lensllm_jax.errors import ModelConfigError, ModelLoadError

from .config import FAMILY_OF_MODEL_TYPE, LMConfig, config_from_hf
from .loading import CausalLM, ModelInfo, from_config, inspect, load, resolve_cached_repo
from .losses import count_params, greedy_generate, per_example_loss, token_logprobs

__all__ = [
    "FAMILY_OF_MODEL_TYPE",
    "CausalLM",
    "LMConfig",
    "ModelConfigError",
    "ModelInfo",
    "ModelLoadError",
    "config_from_hf",
    "count_params",
    "from_config",
    "greedy_generate",
    "inspect",
    "load",
    "per_example_loss",
    "resolve_cached_repo",
    "token_logprobs",
]
