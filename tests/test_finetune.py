"""finetune: evaluation against PyTorch, optimizer steps against hand-written updates, and
curves that learn, nest, repeat, and report divergence as a status."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from models_helpers import save, tiny_torch_model
from test_textdata import char_tokenizer

from lensllm_jax import models
from lensllm_jax.data.text import Example, TokenData, split_examples, tokenize
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.runner import finetune as ft

torch = pytest.importorskip("torch")  # the PyTorch references (dev extra)

TINY_GPT2 = dict(model_type="gpt2", vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def synthetic_examples(n: int, seed: int) -> list[Example]:
    """A learnable task: prompt = 3 random letters + " ", target = them reversed, then copied."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = "".join(rng.choice(list("abcdefgh"), 3))
        out.append(Example(a + " ", a[::-1] + a))
    return out


# One recipe for the curve tests and the AdamW check: the train step compiles once for all.
RECIPE = ft.FinetuneConfig(
    learning_rate=3e-3,
    min_steps=30,
    weight_decay=0.1,
    max_grad_norm=0.5,
    adam_eps=1e-4,  # Adam divides by √v + ε: a larger ε keeps float rounding of tiny gradients
)  # (|g| ≪ ε) from being amplified to a full lr-sized step in the comparison with optax


@pytest.fixture(scope="module")
def task():
    """(model, pool, test) shared by the tests, so each kernel compiles once per module."""
    m = models.from_config(TINY_GPT2, 0)
    data = tokenize(synthetic_examples(330, seed=1), char_tokenizer(adds_bos=True), max_length=16)
    split = split_examples(data.num_examples, num_test=64, num_probe=0, seed=0)
    return m, data.take(split.pool), data.take(split.test)


@pytest.fixture(scope="module")
def reference_grad():
    return jax.jit(jax.value_and_grad(_reference_loss, argnums=1), static_argnums=0)


def random_token_data(n: int, seq: int, vocab: int, seed: int) -> TokenData:
    """Right-padded random sequences with a prompt/target split per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, n)
    starts = rng.integers(1, seq // 2, n)
    pos = np.arange(seq)[None]
    attention = (pos < lengths[:, None]).astype(np.int32)
    loss_mask = ((pos >= starts[:, None]) & (pos < lengths[:, None])).astype(np.int32)
    tokens = np.where(attention == 1, tokens, 0).astype(np.int32)
    return TokenData(tokens, loss_mask, attention, rng.integers(5, 50, n).astype(np.int64))


@pytest.mark.slow
def test_evaluate_matches_torch_masked_cross_entropy(tmp_path):
    model = tiny_torch_model("gpt2")
    m = models.load(save(model, tmp_path))
    data = random_token_data(5, 11, 97, seed=0)
    res = ft.evaluate(m.apply, m.params, data, batch_size=2)  # 3 batches, the last padded
    with torch.no_grad():
        logits = model(
            torch.tensor(data.tokens, dtype=torch.long),
            attention_mask=torch.tensor(data.attention_mask),
        ).logits
        labels = torch.tensor(data.tokens[:, 1:], dtype=torch.long)
        labels[torch.tensor(data.loss_mask[:, 1:]) == 0] = -100
        nll_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 97).double(), labels.reshape(-1), reduction="sum"
        ).item()
    count = int(data.loss_mask[:, 1:].sum())
    assert res.num_tokens == count
    assert abs(res.nats_per_token - nll_sum / count) < 1e-5
    assert abs(res.nats_per_byte - nll_sum / data.target_bytes.sum()) < 1e-5
    again = ft.evaluate(m.apply, m.params, data, batch_size=16)  # one batch, no padding
    assert abs(again.nats_per_token - res.nats_per_token) < 1e-6
    # standard errors: a bootstrap-free reference, the ratio estimator's delta method written
    # out on torch's per-example sums
    with torch.no_grad():
        per_tok = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 97).double(), labels.reshape(-1), reduction="none"
        )
        s = per_tok.reshape(5, -1).sum(1).numpy()
    for den, got in (
        (data.loss_mask[:, 1:].sum(1), res.nats_per_token_se),
        (data.target_bytes, res.nats_per_byte_se),
    ):
        d = np.asarray(den, np.float64)
        r = s.sum() / d.sum()
        ref = np.sqrt(np.sum((s - r * d) ** 2) / (5 * 4)) / d.mean()
        np.testing.assert_allclose(got, ref, rtol=1e-5)


def _reference_loss(apply, params, batch):
    """Token-weighted mean NLL written out independently of lensllm_jax.models.losses."""
    logits = apply(params, batch["tokens"], batch["attention_mask"])[:, :-1]
    logz = jax.scipy.special.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    return jnp.sum((logz - picked) * mask) / jnp.sum(mask)


def _max_abs_diff(a, b) -> float:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    return float(max(leaves))


@pytest.mark.slow
def test_one_sgd_step_is_params_minus_lr_grad(task, reference_grad):
    """6 examples in a batch of 8: the two padding rows must not change the step."""
    m, pool, _ = task
    data = pool.take(np.arange(6))
    cfg = ft.FinetuneConfig(
        learning_rate=0.05,
        batch_size=8,
        epochs=1,
        min_steps=1,
        optimizer="sgd",
        warmup_steps=0,
        max_grad_norm=0.0,
    )
    res = ft.finetune(m.apply, m.params, data, cfg, seed=0)
    assert res.num_steps == 1 and res.status == "ok"
    batch = {k: jnp.asarray(v) for k, v in data.batch().items()}
    loss, grad = reference_grad(m.apply, m.params, batch)
    expect = jax.tree.map(lambda p, g: p - 0.05 * g, m.params, grad)
    assert _max_abs_diff(res.params, expect) < 1e-6
    assert abs(float(res.train_losses[0]) - float(loss)) < 1e-6
    # the pretrained params were not consumed by the donated step
    assert _max_abs_diff(m.params, models.from_config(TINY_GPT2, 0).params) == 0.0


@pytest.mark.slow
def test_adamw_steps_match_optax_adamw_with_clipping(task, reference_grad):
    m, pool, _ = task
    data = pool.take(np.arange(6))
    cfg = RECIPE._replace(
        learning_rate=1e-2, epochs=3, min_steps=0, warmup_steps=0, decay="constant"
    )
    res = ft.finetune(m.apply, m.params, data, cfg, seed=0)
    assert res.num_steps == 3
    adamw = optax.adamw(1e-2, eps=RECIPE.adam_eps, weight_decay=RECIPE.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(RECIPE.max_grad_norm), adamw)
    params, state = m.params, tx.init(m.params)
    batch = {k: jnp.asarray(v) for k, v in data.batch().items()}  # full batch: order is moot
    norms = []
    for _ in range(3):
        _, grad = reference_grad(m.apply, params, batch)
        norms.append(float(optax.tree.norm(grad)))
        updates, state = tx.update(grad, state, params)
        params = optax.apply_updates(params, updates)
    assert max(norms) > RECIPE.max_grad_norm  # clipping was exercised
    assert _max_abs_diff(res.params, params) < 1e-6


def test_schedule_and_step_count():
    cfg = ft.FinetuneConfig(learning_rate=1.0, batch_size=8, epochs=2, min_steps=5)
    assert ft.num_train_steps(3, cfg) == 5  # 2 epochs of 1 step < min_steps
    assert ft.num_train_steps(20, cfg) == 6  # 2 epochs × ⌈20/8⌉
    assert ft.num_train_steps(20, cfg._replace(max_steps=4)) == 4
    lr = ft.learning_rates(cfg._replace(warmup_steps=2), 6)
    # warmup (s+1)/2, then cosine over the remaining 4 steps: p = 0, 1/4, 2/4, 3/4
    np.testing.assert_allclose(
        lr, [0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]
    )
    lin = ft.learning_rates(cfg._replace(warmup_ratio=0.0, decay="linear"), 4)
    np.testing.assert_allclose(lin, [1.0, 0.75, 0.5, 0.25])


def test_each_epoch_visits_every_example_once():
    order = ft._batch_order(10, 4, 7, seed=3)  # 3 batches per epoch, last one half padding
    assert order.shape == (7, 4)
    for epoch in (order[0:3], order[3:6]):
        real = epoch[epoch >= 0]
        assert sorted(real) == list(range(10)) and (epoch < 0).sum() == 2
    np.testing.assert_array_equal(order, ft._batch_order(10, 4, 7, seed=3))
    assert not np.array_equal(order, ft._batch_order(10, 4, 7, seed=4))


@pytest.mark.slow
def test_curve_learns_more_with_more_data_and_compiles_once(task):
    m, pool, test = task
    cfg = RECIPE
    before = ft._train_step._cache_size(), ft._eval_sums._cache_size()
    points = []
    curve = ft.loss_curve(
        m.apply, m.params, pool, test, [16, 64, 250], cfg, seed=0,
        on_point=lambda *p: points.append(p),
    )  # fmt: skip
    assert ft._train_step._cache_size() - before[0] <= 1
    assert ft._eval_sums._cache_size() - before[1] <= 1
    assert [p[0] for p in points] == [16, 64, 250] and points[2][1] == curve.losses[2]
    assert curve.status == ("ok", "ok", "ok")
    np.testing.assert_array_equal(curve.sizes, [16, 64, 250])
    np.testing.assert_array_equal(curve.num_steps, [30, 30, 96])  # min_steps, min, 3 × ⌈250/8⌉
    assert curve.zero_shot > curve.losses[0] + 0.5
    assert curve.losses[2] < min(curve.losses[:2]) - 0.3
    # the unit: nats per byte = nats per token × tokens / bytes on the same fine-tune
    tok_curve = ft.loss_curve(
        m.apply, m.params, pool, test, [16], cfg, seed=0, loss_unit="nats_per_token"
    )
    ratio = test.num_target_tokens / test.target_bytes.sum()
    assert abs(tok_curve.losses[0] * ratio - curve.losses[0]) < 1e-9  # one point = same fine-tune
    assert abs(tok_curve.zero_shot * ratio - curve.zero_shot) < 1e-9


def test_same_seed_same_curve_and_divergence_is_a_status(task):
    m, pool, test = task
    cfg = RECIPE._replace(min_steps=4, epochs=1)
    a = ft.loss_curve(m.apply, m.params, pool, test, [8, 24], cfg, seed=5)
    b = ft.loss_curve(m.apply, m.params, pool, test, [8, 24], cfg, seed=5)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.zero_shot == b.zero_shot and a.status == ("ok", "ok")
    c = ft.loss_curve(m.apply, m.params, pool, test, [8, 24], cfg, seed=6)
    assert not np.array_equal(a.losses, c.losses)
    boom = ft.loss_curve(
        m.apply, m.params, pool, test, [8, 24], cfg._replace(learning_rate=1e8), seed=5
    )
    assert boom.status == ("diverged", "diverged")
    assert np.isnan(boom.losses).all() and boom.zero_shot == a.zero_shot
    res = ft.finetune(m.apply, m.params, pool, cfg._replace(learning_rate=1e8), seed=5)
    assert res.status == "diverged" and res.num_steps < ft.num_train_steps(pool.num_examples, cfg)


@pytest.mark.parametrize(
    ("sizes", "expect"),
    [
        ([], "no subset sizes given"),
        ([0, 10], "subset size 0 is not a positive integer"),
        ([10, 2.5], "subset size 2.5 is not a positive integer"),
        ([10, 10], "subset sizes 10, 10 are not strictly increasing"),
        ([10, 9999], "subset size 9999 exceeds the fine-tuning pool of 266 examples"),
    ],
)
def test_bad_sizes_are_one_line_errors(task, sizes, expect):
    m, pool, test = task
    with pytest.raises(LensLLMInputError, match=expect) as err:
        ft.loss_curve(m.apply, m.params, pool, test, sizes, ft.FinetuneConfig(), seed=0)
    assert "\n" not in str(err.value) and "; " in str(err.value)


def test_bad_config_and_unit(task):
    m, pool, test = task
    with pytest.raises(LensLLMInputError, match="unknown optimizer 'adam'; use 'adamw' or 'sgd'"):
        ft.finetune(m.apply, m.params, pool, ft.FinetuneConfig(optimizer="adam"), seed=0)
    with pytest.raises(LensLLMInputError, match="unknown loss unit 'bits'"):
        ft.loss_curve(m.apply, m.params, pool, test, [4], ft.FinetuneConfig(), seed=0,
                      loss_unit="bits")  # fmt: skip


def test_same_architecture_shares_compiled_programs(task):
    """A second checkpoint of the same architecture (other weights) gets the same `apply`,
    so fine-tuning and evaluating it compiles nothing new."""
    m, pool, test = task
    other = models.from_config(TINY_GPT2, 1)
    assert other.apply is m.apply
    ft.loss_curve(m.apply, m.params, pool, test, [16], RECIPE, seed=0)
    before = ft._train_step._cache_size(), ft._eval_sums._cache_size()
    curve = ft.loss_curve(other.apply, other.params, pool, test, [16], RECIPE, seed=0)
    assert (ft._train_step._cache_size(), ft._eval_sums._cache_size()) == before
    assert curve.status == ("ok",)
