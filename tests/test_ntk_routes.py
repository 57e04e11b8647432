"""The NTK's routes and their automatic choice: the plan's rules (pure), matrix-free and
automatic kernels against the dense float64 jacrev reference, and the count sketch inside
its stated error bound across seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ntk import dense_ntk, lm_init, mlp_apply, mlp_init, per_example_loss, token_logprobs

from lensllm_jax.core import _ntk_routes, ntk
from lensllm_jax.core._ntk_layout import layout as _layout
from lensllm_jax.core._ntk_memory import JVP_COST


def test_plan_rules():
    per = 1000
    # all N gradients fit: one symmetric block, one pass, n · per bytes
    p = ntk.plan_ntk(8, 8, per, 8 * per)
    assert (p.route, p.chunk, p.gradient_passes, p.memory_bytes, p.exact) == (
        "jacobian_contraction", 8, 1.0, 8 * per, True,
    )  # fmt: skip
    # a cross kernel needs two blocks alive: the two-block rule
    p = ntk.plan_ntk(8, 8, per, 8 * per, symmetric=False)
    assert p.chunk == ntk.auto_chunk_size(8, per, 8 * per) == 4
    # blocks of 8 for N = 32: nb = 4, 1 + 6 chunk Jacobians = 56 gradients = 1.75 passes
    p = ntk.plan_ntk(32, 32, per, 16 * per)
    assert (p.route, p.chunk, p.gradient_passes) == ("jacobian_contraction", 8, 56 / 32)
    # the matrix-free route: one gradient pass, N tangent passes, k gradients alive
    m = ntk.plan_ntk(32, 32, per, 16 * per, route="ntk_vector_products")
    assert (m.chunk, m.gradient_passes, m.jvp_passes, m.memory_bytes) == (16, 1.0, 32.0, 16 * per)
    assert m.cost_passes > JVP_COST * 32 > p.cost_passes
    # less than two gradients of memory: blocks cannot fit, the matrix-free route can
    p = ntk.plan_ntk(32, 32, per, 3 * per // 2)
    assert (p.route, p.chunk, p.memory_bytes) == ("ntk_vector_products", 1, per)
    # the sketch: only when allowed and the exact kernel costs more than max_exact_passes
    for n in (8, 64, 512):
        exact = ntk.plan_ntk(n, n, per, 4 * per)
        s = ntk.plan_ntk(n, n, per, 4 * per, allow_sketch=True, max_exact_passes=4.0)
        assert exact.exact and exact.route != "sketch"
        assert (s.route == "sketch") == (exact.cost_passes > 4.0)
        if s.route == "sketch":  # linear: one gradient pass whatever N
            assert (s.gradient_passes, s.exact, s.chunk) == (1.0, False, 1)
    assert "sketch" in s.describe() and "GiB" in s.describe()
    # chunks are balanced: 32 examples with room for 9 take 4 steps of 8, not 9 + 9 + 9 + 5
    s = ntk.plan_ntk(32, 32, per, 27 * per, route="sketch")
    assert (s.chunk, s.memory_bytes) == (8, 3 * 8 * per)
    assert ntk.plan_ntk(32, 32, per, 9 * per, route="ntk_vector_products").chunk == 8
    # an explicit chunk with route "auto" means Jacobian blocks of that chunk
    assert ntk.plan_ntk(32, 32, per, per, chunk=4).route == "jacobian_contraction"
    with pytest.raises(ntk.NTKError, match="unknown NTK route"):
        ntk.plan_ntk(4, 4, per, per, route="svd")
    with pytest.raises(ntk.NTKError, match="positive sizes"):
        ntk.plan_ntk(0, 4, per, per)


@pytest.mark.parametrize(
    "budget_gradients",
    [pytest.param(0.5, marks=pytest.mark.slow), 1.5, pytest.param(3, marks=pytest.mark.slow), 100],
)
def test_auto_route_matches_dense_reference(budget_gradients):
    """Whatever route the budget makes "auto" pick, the loss-gradient kernel of a small causal
    LM equals the dense float64 jacrev reference (blocks of 1, of 3, all 7; matrix-free)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(50)))
        toks = jax.random.randint(jax.random.key(51), (7, 6), 0, 11)
        per = ntk.jacobian_bytes_per_example(params)
        budget = int(budget_gradients * per)
        kfn = ntk.empirical_ntk_fn(per_example_loss, memory_budget_bytes=budget)
        plan = kfn.plan(params, toks)
        want = {0.5: "ntk_vector_products", 1.5: "ntk_vector_products"}
        assert plan.route == want.get(budget_gradients, "jacobian_contraction")
        assert plan.exact and plan.memory_bytes <= max(budget, per)
        ref = dense_ntk(per_example_loss, params, toks, toks, None)
        np.testing.assert_allclose(kfn(params, toks), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_blocks_outside_jit_equal_dense_and_the_in_program_schedule():
    """Several Jacobian blocks called eagerly run the host-driven schedule (one compiled
    step, two blocks alive); it equals the dense float64 jacrev reference and the in-program
    (scanned) schedule that a call under `jit` takes, for nb = 3 and 4, with padding (7
    examples in blocks of 2 and 3)."""
    from lensllm_jax.core import _ntk_blocks

    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(52)))
        toks = jax.random.randint(jax.random.key(53), (7, 6), 0, 11)
        ref = dense_ntk(per_example_loss, params, toks, toks, None)
        calls = []
        real = _ntk_blocks.symmetric_kernel_host
        for chunk in (3, 2):  # nb = 3 and 4 (scanned in the program)
            kfn = ntk.empirical_ntk_fn(
                per_example_loss, implementation="jacobian_contraction", chunk_size=chunk
            )
            try:
                _ntk_blocks.symmetric_kernel_host = lambda *a, **k: calls.append(1) or real(*a, **k)
                eager = kfn(params, toks)
            finally:
                _ntk_blocks.symmetric_kernel_host = real
            traced = jax.jit(kfn)(params, toks)
            np.testing.assert_allclose(eager, ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(eager, traced, rtol=1e-10, atol=1e-13)
            assert len(calls) == 1 and eager.shape == (7, 7)
            calls.clear()


@pytest.mark.slow
def test_host_blocks_keep_a_scanned_stack_in_its_natural_layout():
    """A model whose layers run in a `lax.scan` (6 > UNROLL_MAX_LAYERS): its stacked leaves'
    per-example gradients keep the example axis at 1 (no transposed copy), and the kernel in
    blocks of 2, eager (host schedule) and under `jit` (in one program), equals the dense
    jacrev reference of the per-example loss."""
    from lensllm_jax import models
    from lensllm_jax.core import _ntk_layout
    from lensllm_jax.models.lm_probe import probe_loss_fn

    cfg = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
           "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 16}  # fmt: skip
    with jax.enable_x64(True):
        m = models.from_config(cfg, 0)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), m.params)
        rng = np.random.default_rng(0)
        n, t = 5, 8
        batch = {
            "tokens": rng.integers(0, 32, (n, t)).astype(np.int32),
            "loss_mask": np.ones((n, t), np.int32),
            "attention_mask": np.ones((n, t), np.int32),
            "nats_per_byte": np.full(n, 0.25),
        }
        loss = probe_loss_fn(m.apply)
        _, axes = _ntk_layout.per_example_grads(loss, params, batch)
        assert set(jax.tree.leaves(axes["layers"])) == {1}
        assert set(jax.tree.leaves({k: v for k, v in axes.items() if k != "layers"})) == {0}
        kfn = ntk.empirical_ntk_fn(loss, implementation="jacobian_contraction", chunk_size=2)
        ref = dense_ntk(loss, params, batch, batch, None)
        # the model computes in float32 whatever its params: agreement to float32 round-off
        np.testing.assert_allclose(kfn(params, batch), ref, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(jax.jit(kfn)(params, batch), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_matrix_free_logit_kernel_cross_and_untraced():
    """Matrix-free with several outputs per example (positions untraced), cross batches, and
    a column chunk that does not divide N2: equal to the dense reference."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(52)))
        t1 = jax.random.randint(jax.random.key(53), (3, 6), 0, 11)
        t2 = jax.random.randint(jax.random.key(54), (5, 6), 0, 11)
        got = ntk.empirical_ntk(
            token_logprobs, params, t1, t2, trace_axes=(), chunk_size=2,
            implementation="ntk_vector_products",
        )  # fmt: skip
        want = dense_ntk(token_logprobs, params, t1, t2, ())
        assert got.shape == (3, 5, 5, 5)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_sketch_is_unbiased_within_its_stated_bound():
    """Over 400 seeds the count sketch's mean is Θ (within 5 standard errors of the mean) and
    its spread stays under the bound it reports; the front door agrees with the route."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(jax.random.key(60)))
        x = jax.random.normal(jax.random.key(61), (6, 3), jnp.float64)
        ref = np.asarray(dense_ntk(mlp_apply, params, x, x, None))
        k, seeds = 8, 400  # 30 parameters in 8 buckets: many collisions, a visible error
        lay = _layout((6,), ())  # one scalar output per example, fully traced

        def f(p, xx):
            return mlp_apply(p, xx).sum(axis=1)

        def one(key):
            return _ntk_routes.sketch(f, params, x, None, lay, 6, 6, chunk=4, sketch_dim=k, key=key)

        keys = jax.random.split(jax.random.key(0), seeds)
        thetas, bounds = (np.asarray(a)[..., 0, 0] for a in jax.jit(jax.vmap(one))(keys))
        ref = np.asarray(dense_ntk(f, params, x, x, None))
        bound = bounds.max(axis=0)  # the bound moves with the random bucket rotation only
        mean, sd = thetas.mean(axis=0), thetas.std(axis=0, ddof=1)
        assert np.all(np.abs(mean - ref) <= 5 * bound / np.sqrt(seeds) + 1e-12)
        assert np.all(sd <= 1.15 * bound + 1e-12)
        assert sd.max() > 1e-3 * np.abs(ref).max()  # the sketch does err here: not vacuous
        # the bound is at most sqrt(2) ‖g_i‖‖g_j‖ = sqrt(2 Θ_ii Θ_jj)
        scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
        assert np.all(bounds <= np.sqrt(2) * scale + 1e-12)
        # the public front door: same numbers for the same seed, a plan that says "sketch"
        sk = ntk.sketched_ntk(f, params, x, sketch_dim=k, seed=3, chunk_size=4)
        want = one(jax.random.key(3))
        np.testing.assert_allclose(sk.theta, want[0][..., 0, 0], rtol=1e-12)
        np.testing.assert_allclose(sk.stderr_bound, want[1][..., 0, 0], rtol=1e-12)
        assert sk.plan.route == "sketch" and not sk.plan.exact and sk.plan.sketch_dim == k


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sketched_lm_kernel_inside_its_bound(seed):
    """On a causal LM's loss-gradient kernel, with k well above sqrt(P)-scale collisions, every
    entry is within 5 reported bounds of the exact kernel, and the Frobenius bound covers the
    top eigenvalue's error (Weyl)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(62)))
        toks = jax.random.randint(jax.random.key(63), (6, 6), 0, 11)
        ref = np.asarray(dense_ntk(per_example_loss, params, toks, toks, None))
        sk = ntk.sketched_ntk(
            per_example_loss, params, toks, sketch_dim=64, seed=seed, chunk_size=4
        )
        err = np.abs(np.asarray(sk.theta) - ref)
        assert np.all(err <= 5 * np.asarray(sk.stderr_bound) + 1e-12)
        top = abs(np.linalg.eigvalsh(np.asarray(sk.theta))[-1] - np.linalg.eigvalsh(ref)[-1])
        assert top <= 5 * sk.frobenius_error_bound()
        assert sk.frobenius_error_bound() < 0.5 * np.linalg.norm(ref)  # informative
