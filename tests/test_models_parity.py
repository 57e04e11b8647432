"""Our JAX models equal transformers' PyTorch models (f32, 1e-4 relative) after a round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_helpers import (
    TINY,
    VOCAB,
    rel_err,
    save,
    tiny_torch_model,
    to_v4_dialect,
    tokens,
    torch,
    torch_logits,
)

from lensllm_jax import models

TOL = 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_match_torch_after_safetensors_round_trip(name, tmp_path):
    model = tiny_torch_model(name)
    m = models.load(save(model, tmp_path))
    x = tokens()
    apply = jax.jit(m.apply)
    assert rel_err(apply(m.params, x, np.ones_like(x)), torch_logits(model, x)) < TOL
    # Left padding: real-token logits still match (positions, key mask).
    mask = np.ones_like(x)
    mask[1, :4] = 0
    ours = apply(m.params, x, mask)
    assert rel_err(ours, torch_logits(model, x, mask), where=mask > 0) < TOL


@pytest.mark.parametrize(
    "name", ["llama3_gqa_head_dim_tied", "neox_partial_rotary", "qwen2_bias_tied", "gpt2"]
)
def test_transformers_v4_config_dialect(name, tmp_path):
    model = tiny_torch_model(name)
    d = save(model, tmp_path)
    v5 = models.load(d).config
    legacy = to_v4_dialect(d / "config.json")
    assert "rope_parameters" not in legacy
    m = models.load(d)
    assert m.config == v5
    x = tokens()
    assert rel_err(jax.jit(m.apply)(m.params, x), torch_logits(model, x)) < TOL


def test_config_dialects_parse_alike():
    llama32_v4 = {  # as in meta-llama/Llama-3.2-1B config.json (transformers 4.45)
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    }
    llama32_v5 = {k: v for k, v in llama32_v4.items() if k not in ("rope_theta", "rope_scaling")}
    llama32_v5["rope_parameters"] = {**llama32_v4["rope_scaling"], "rope_theta": 500000.0}
    a, b = models.config_from_hf(llama32_v4), models.config_from_hf(llama32_v5)
    assert a == b
    assert (a.rope_theta, a.rope_type, a.num_kv_heads, a.head_dim) == (5e5, "llama3", 8, 64)
    pythia_v4 = {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_hidden_layers": 6,
        "intermediate_size": 2048,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "vocab_size": 50304,
        "use_parallel_residual": True,
    }
    c = models.config_from_hf(pythia_v4)
    assert (c.rotary_dim, c.rope_theta, c.tie_word_embeddings) == (16, 1e4, False)


@pytest.mark.parametrize("name", ["llama3_gqa_head_dim_tied", "opt_350m_style"])
def test_sharded_checkpoint(name, tmp_path):
    model = tiny_torch_model(name)
    d = save(model, tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").exists()
    m = models.load(d)
    x = tokens()
    assert rel_err(jax.jit(m.apply)(m.params, x), torch_logits(model, x)) < TOL


@pytest.mark.slow
def test_gradients_match_torch_backward(tmp_path):
    """jax.grad of the masked mean loss equals torch autograd, leaf by leaf (Llama, GQA)."""
    model = tiny_torch_model("llama3_gqa_head_dim_tied").train(False)
    m = models.load(save(model, tmp_path))
    x = tokens(3, 10, seed=1)
    loss_mask = np.ones_like(x)
    loss_mask[:, :4] = 0  # prompt of 4 tokens excluded
    loss_mask[2, 8:] = 0

    def loss(params):
        return models.per_example_loss(
            m.apply, params, {"tokens": x, "loss_mask": loss_mask}
        ).mean()

    g = jax.jit(jax.grad(loss))(m.params)
    logits = model(torch.tensor(x, dtype=torch.long)).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB),
        torch.tensor(x[:, 1:], dtype=torch.long).reshape(-1),
        reduction="none",
    ).reshape(3, -1)
    mk = torch.tensor(loss_mask[:, 1:], dtype=torch.float32)
    tloss = ((nll * mk).sum(1) / mk.sum(1)).mean()
    model.zero_grad()
    tloss.backward()
    np.testing.assert_allclose(float(jax.jit(loss)(m.params)), float(tloss.detach()), rtol=1e-5)
    tg = {n: p.grad.numpy() for n, p in model.named_parameters()}
    pairs = {
        "model.embed_tokens.weight": g["embed"]["embedding"],
        "model.norm.weight": g["norm"]["scale"],
        "model.layers.1.self_attn.q_proj.weight": g["layers"]["q"]["kernel"][1].T,
        "model.layers.0.self_attn.k_proj.weight": g["layers"]["k"]["kernel"][0].T,
        "model.layers.0.mlp.down_proj.weight": g["layers"]["down"]["kernel"][0].T,
        "model.layers.1.input_layernorm.weight": g["layers"]["input_norm"]["scale"][1],
    }
    for n, ours in pairs.items():
        assert rel_err(ours, tg[n]) < 1e-4, n


@pytest.mark.slow
def test_scan_unrolled_and_remat_agree(tmp_path):
    d = save(tiny_torch_model("neox_partial_rotary"), tmp_path)
    scanned = models.load(d)
    unrolled = models.load(d, scan_layers=False, remat=True)
    x = tokens()
    np.testing.assert_allclose(
        jax.jit(scanned.apply)(scanned.params, x),
        jax.jit(unrolled.apply)(scanned.params, x),
        rtol=1e-5,
        atol=1e-6,
    )
    batch = {"tokens": x, "loss_mask": np.ones_like(x)}
    g1 = jax.jit(jax.grad(lambda p: scanned.per_example_loss(p, batch).sum()))(scanned.params)
    g2 = jax.jit(jax.grad(lambda p: unrolled.per_example_loss(p, batch).sum()))(scanned.params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_close_to_float32(tmp_path):
    model = tiny_torch_model("qwen2_bias_tied")
    d = save(model, tmp_path)
    m16 = models.load(d, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(m16.params))
    x = tokens()
    out = jax.jit(m16.apply)(m16.params, x)
    assert out.dtype == jnp.float32
    assert rel_err(out, torch_logits(model, x)) < 3e-2


def test_count_params_matches_torch(tmp_path):
    for name in ("gpt2_untied_inv_layer", "opt_350m_style", "neox_sequential"):
        model = tiny_torch_model(name)
        m = models.load(save(model, tmp_path / name))
        assert models.count_params(m.params) == sum(p.numel() for p in model.parameters())


def test_random_init_has_the_loaded_structure(tmp_path):
    m = models.load(save(tiny_torch_model("llama2_untied"), tmp_path))
    r = models.from_config(m.config, jax.random.key(3))
    same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, m.params, r.params)
    assert all(jax.tree_util.tree_leaves(same))
    logits = jax.jit(r.apply)(r.params, tokens())
    assert logits.shape == (2, 12, VOCAB) and bool(jnp.isfinite(logits).all())
