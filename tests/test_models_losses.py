"""per_example_loss / token_logprobs against torch, and the meaning of the masks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from models_helpers import rel_err, save, tiny_torch_model, tokens

from lensllm_jax import models

torch = pytest.importorskip("torch")  # the PyTorch references (dev extra)


def test_token_logprobs_match_torch(tmp_path):
    model = tiny_torch_model("gpt2")
    m = models.load(save(model, tmp_path))
    x = tokens(2, 9, seed=2)
    ours = jax.jit(m.token_logprobs)(m.params, x)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor(x, dtype=torch.long)).logits[:, :-1], -1)
        ref = torch.gather(lp, -1, torch.tensor(x[:, 1:, None], dtype=torch.long))[..., 0]
    assert ours.shape == (2, 8)
    assert rel_err(ours, ref.numpy()) < 1e-5


def test_right_padding_and_prompt_mask(tmp_path):
    """A right-padded example with pad excluded from the loss equals the unpadded example, and
    the loss counts only the target tokens."""
    m = models.load(save(tiny_torch_model("opt"), tmp_path))
    x = tokens(1, 10, seed=3)
    short = {"tokens": x[:, :7], "loss_mask": np.array([[0, 0, 0, 1, 1, 1, 1]])}
    padded_tokens = x.copy()
    padded_tokens[:, 7:] = 5
    padded = {
        "tokens": padded_tokens,
        "loss_mask": np.array([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0]]),
        "attention_mask": np.array([[1] * 7 + [0] * 3]),
    }
    a = m.per_example_loss(m.params, short)
    b = m.per_example_loss(m.params, padded)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    lp = np.asarray(m.token_logprobs(m.params, x[:, :7]))
    np.testing.assert_allclose(a, -lp[:, 2:].mean(axis=1), rtol=1e-6)
    empty = {"tokens": x, "loss_mask": np.zeros_like(x)}
    assert float(m.per_example_loss(m.params, empty)[0]) == 0.0


@pytest.mark.slow
def test_per_example_loss_vmaps_to_per_example_gradients(tmp_path):
    """The NTK/Hessian helpers differentiate per example: vmap(grad) equals a loop of grads."""
    m = models.load(save(tiny_torch_model("mistral_sliding"), tmp_path))
    x = tokens(3, 8, seed=4)
    mask = np.ones_like(x)

    def one(params, t, lm):
        return m.per_example_loss(params, {"tokens": t[None], "loss_mask": lm[None]})[0]

    g = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(m.params, x, mask)
    g1 = jax.jit(jax.grad(one))(m.params, x[1], mask[1])
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(a[1], b, rtol=1e-4, atol=1e-7)
