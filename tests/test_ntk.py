"""eNTK vs a dense jax.jacrev reference; F(Θ, t) vs scipy.linalg.expm; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lensllm_jax.core import ntk
from lensllm_jax.errors import LensLLMError

# ----------------------------------------------------------------------------- tiny models


def mlp_init(key, d_in=3, hidden=5, d_out=2):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense1": {
            "w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
            "b": 0.1 * jax.random.normal(k3, (hidden,)),
        },
        "dense2": {"w": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden)},
    }


def mlp_apply(params, x):
    h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    return h @ params["dense2"]["w"]  # (N, d_out)


V, T, D = 11, 6, 8


def lm_init(key):
    ks = jax.random.split(key, 6)
    s = 0.3
    return {
        "emb": s * jax.random.normal(ks[0], (V, D)),
        "pos": s * jax.random.normal(ks[1], (T, D)),
        "qkv": s * jax.random.normal(ks[2], (D, 3 * D)),
        "proj": s * jax.random.normal(ks[3], (D, D)),
        "mlp": s * jax.random.normal(ks[4], (D, D)),
        "head": s * jax.random.normal(ks[5], (D, V)),
    }


def lm_apply(params, tokens):
    """One-block, one-head causal transformer: (N, T) int -> (N, T, V) logits."""
    h = params["emb"][tokens] + params["pos"][: tokens.shape[1]]
    q, k, v = jnp.split(h @ params["qkv"], 3, axis=-1)
    att = jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(D)
    mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    h = h + jnp.einsum("nts,nsd->ntd", att, v) @ params["proj"]
    h = h + jnp.tanh(h @ params["mlp"])
    return h @ params["head"]


token_logprobs = ntk.causal_lm_token_logprobs(lm_apply)


def per_example_loss(params, tokens):
    return -token_logprobs(params, tokens).mean(axis=-1)


def dense_ntk(f, params, x1, x2, trace_axes):
    """Reference: full-batch jax.jacrev, raveled, contracted over params and traced axes."""

    @jax.jit
    def jac(x):
        j = jax.jacrev(lambda p: f(p, x))(params)
        n_out = f(params, x).ndim
        return jnp.concatenate(
            [leaf.reshape(*leaf.shape[:n_out], -1) for leaf in jax.tree.leaves(j)], axis=-1
        )

    j1, j2 = jac(x1), jac(x2)
    nd = j1.ndim - 1  # output axes incl. batch
    traced = [a % nd for a in trace_axes] if trace_axes is not None else list(range(1, nd))
    untraced = [a for a in range(1, nd) if a not in traced]
    letters = "abcdefgh"
    s1 = ["i"] + [letters[a] for a in range(1, nd)] + ["z"]
    s2 = ["j"] + [letters[a] if a in traced else letters[a].upper() for a in range(1, nd)] + ["z"]
    out = ["i", "j"] + [letters[a] for a in untraced] + [letters[a].upper() for a in untraced]
    return jnp.einsum(f"{''.join(s1)},{''.join(s2)}->{''.join(out)}", j1, j2)


IMPLS = list(ntk.NtkImplementation)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [None, 2, 3])  # 7 = 4 x 2 (scan) or 3 x 3 (unrolled), padded
def test_mlp_ntk_matches_dense_reference(impl, chunk):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(jax.random.key(0)))
        x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
        ref = dense_ntk(mlp_apply, params, x, x, None)
        got = ntk.empirical_ntk(mlp_apply, params, x, implementation=impl, chunk_size=chunk)
        assert got.shape == (7, 7)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref))))
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_kernel_and_untraced_axes(impl):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(jax.random.key(2)))
        x1 = jax.random.normal(jax.random.key(3), (5, 3), jnp.float64)
        x2 = jax.random.normal(jax.random.key(4), (3, 3), jnp.float64)
        ref = dense_ntk(mlp_apply, params, x1, x2, ())
        got = ntk.empirical_ntk(
            mlp_apply, params, x1, x2, implementation=impl, trace_axes=(), chunk_size=2
        )
        assert got.shape == (5, 3, 2, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
        # tracing the output axis equals the trace of the untraced kernel
        traced = ntk.empirical_ntk(mlp_apply, params, x1, x2, implementation=impl)
        np.testing.assert_allclose(traced, jnp.einsum("ijaa->ij", got), rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_lm_loss_gradient_and_logit_kernels_match_dense(impl):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(5)))
        toks = jax.random.randint(jax.random.key(6), (5, T), 0, V)
        for fn, kern in [
            (per_example_loss, ntk.loss_gradient_kernel),
            (token_logprobs, ntk.logit_kernel),
        ]:
            ref = dense_ntk(fn, params, toks, toks, None)
            got = kern(fn, params, toks, implementation=impl, chunk_size=2)
            assert got.shape == (5, 5)
            scale = float(jnp.max(jnp.abs(ref)))
            assert scale > 1e-3  # a kernel that is not trivially zero
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * scale)
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_implementations_agree_cross_lm_partial_trace():
    """Logit kernel with positions untraced (trace_axes=()), cross batches, both implementations."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(7)))
        t1 = jax.random.randint(jax.random.key(8), (3, T), 0, V)
        t2 = jax.random.randint(jax.random.key(9), (2, T), 0, V)
        a = ntk.empirical_ntk(token_logprobs, params, t1, t2, trace_axes=(), chunk_size=2)
        b = ntk.empirical_ntk(
            token_logprobs, params, t1, t2, trace_axes=(), implementation="ntk_vector_products"
        )
        assert a.shape == (3, 2, T - 1, T - 1)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a, dense_ntk(token_logprobs, params, t1, t2, ()), rtol=1e-10)


def test_pytree_batch_and_jit():
    """x as a dict batch; the kernel fn jits; bf16 Jacobians with f32 accumulation are close."""
    params = mlp_init(jax.random.key(10))

    def f(p, batch):
        return mlp_apply(p, batch["x"]) * batch["w"][:, None]

    batch = {
        "x": jax.random.normal(jax.random.key(11), (6, 3)),
        "w": jnp.linspace(0.5, 1.5, 6),
    }
    kfn = ntk.empirical_ntk_fn(f, chunk_size=4)
    eager = kfn(params, batch)
    jitted = jax.jit(kfn)(params, batch)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    ref = dense_ntk(f, params, batch, batch, None)
    np.testing.assert_allclose(eager, ref, rtol=1e-4, atol=1e-5)
    low = ntk.empirical_ntk(f, params, batch, chunk_size=4, jacobian_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=3e-2, atol=3e-2 * float(jnp.max(ref)))


@pytest.mark.parametrize("trace_axes", [None, ()])
def test_ntk_vp_matches_kernel_times_vector(trace_axes):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(jax.random.key(12)))
        x1 = jax.random.normal(jax.random.key(13), (4, 3), jnp.float64)
        x2 = jax.random.normal(jax.random.key(14), (6, 3), jnp.float64)
        theta = dense_ntk(mlp_apply, params, x1, x2, trace_axes)
        vshape = (6,) if trace_axes is None else (6, 2)
        v = jax.random.normal(jax.random.key(15), vshape, jnp.float64)
        got = ntk.ntk_vp(mlp_apply, params, x1, v, x2, trace_axes=trace_axes)
        want = theta @ v if trace_axes is None else jnp.einsum("ijab,jb->ia", theta, v)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- auto chunk


def brute_force_chunk(n, bytes_per_example, budget):
    """Independent statement of the rule: the fewest blocks nb whose balanced chunk ⌈n/nb⌉ keeps
    two blocks within budget; a chunk of one when even that does not fit."""
    for nb in range(1, n + 1):
        c = -(-n // nb)
        if 2 * c * bytes_per_example <= budget:
            return c
    return 1


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_auto_chunk_follows_the_memory_rule(monkeypatch):
    gib = 2**30
    # GPT-2 small (124,439,808 params) on an H200-like device: bf16 Jacobians, 100 GiB free
    # of a 104 GiB pool -> budget 50 GiB -> c_max 215 >= 64: one block of all 64.
    p = 124_439_808
    fake_h200 = FakeDevice({"bytes_limit": 104 * gib, "bytes_in_use": 4 * gib})
    budget = ntk.memory_budget(device=fake_h200)
    assert budget == 50 * gib
    assert ntk.auto_chunk_size(64, 2 * p, budget) == 64
    # f32 Jacobians with 40 GiB free: budget 20 GiB, c_max = 21 -> 4 blocks of 16 (not 21 x 4)
    budget = ntk.memory_budget(
        device=FakeDevice({"bytes_limit": 44 * gib, "bytes_in_use": 4 * gib})
    )
    assert budget == 20 * gib
    assert ntk.auto_chunk_size(64, 4 * p, budget) == 16
    # a device without statistics (CPU) gets the fixed host budget; the argument beats both
    assert ntk.memory_budget(device=FakeDevice(None)) == ntk.HOST_MEMORY_BUDGET == 2 * gib
    assert ntk.memory_budget(123, device=fake_h200) == 123
    with pytest.raises(ntk.NTKError, match="memory_budget_bytes"):
        ntk.memory_budget(-1)
    # `lensllm run` reads $LENSLLM_NTK_MEMORY (the core reads no environment) and passes it in
    from lensllm_jax.runner import measure

    monkeypatch.delenv(measure.MEMORY_ENV, raising=False)
    # unset on a CPU: a fraction of the host memory available now (not a fixed 2 GiB)
    monkeypatch.setattr(measure, "host_available_bytes", lambda: 10 * gib)
    assert measure.ntk_memory_budget() == int(measure.HOST_MEMORY_FRACTION * 10 * gib)
    monkeypatch.setattr(measure, "host_available_bytes", lambda: None)
    assert measure.ntk_memory_budget() is None
    monkeypatch.setenv(measure.MEMORY_ENV, "3GiB")
    assert measure.ntk_memory_budget() == 3 * gib
    monkeypatch.setenv(measure.MEMORY_ENV, "5e8")
    assert measure.ntk_memory_budget() == 500_000_000
    monkeypatch.setenv(measure.MEMORY_ENV, "lots")
    with pytest.raises(ntk.NTKError, match=r"LENSLLM_NTK_MEMORY.*byte count"):
        measure.ntk_memory_budget()
    # the closed form equals the brute-force statement of the rule on a grid of sizes
    for n in (1, 2, 7, 16, 63, 64, 65, 100):
        for per in (1, 3, 1000, 4 * p):
            for budget in (1, 2 * per - 1, 2 * per, 5 * per, 37 * per + 5, 2 * n * per, 10**13):
                c = ntk.auto_chunk_size(n, per, budget)
                assert c == brute_force_chunk(n, per, budget), (n, per, budget)
                assert 1 <= c <= n
                assert c == 1 or 2 * c * per <= budget
    # bytes per example: A·C outputs x Σ size · itemsize (params' dtypes, or jacobian_dtype)
    params = {"a": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.bfloat16)}
    assert ntk.jacobian_bytes_per_example(params) == 12 * 4 + 5 * 2
    assert ntk.jacobian_bytes_per_example(params, 6, jnp.bfloat16) == 6 * 17 * 2


@pytest.mark.parametrize("budget_examples", [1, 3, 100])  # chunks 1, 3 (3 blocks), 7 (all)
def test_auto_chunk_kernel_equals_explicit_chunks(budget_examples):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_init(jax.random.key(30)))
        x = jax.random.normal(jax.random.key(31), (7, 3), jnp.float64)
        per = ntk.jacobian_bytes_per_example(params, 2, None)  # A·C = 2 outputs per example
        budget = 2 * budget_examples * per
        chunk = ntk.auto_chunk_size(7, per, budget)
        assert chunk == min(budget_examples, 7)
        kw = dict(trace_axes=())
        auto = ntk.empirical_ntk(mlp_apply, params, x, memory_budget_bytes=budget, **kw)
        explicit = ntk.empirical_ntk(mlp_apply, params, x, chunk_size=chunk, **kw)
        ref = dense_ntk(mlp_apply, params, x, x, ())
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(auto, explicit, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(auto, ref, rtol=0, atol=1e-6 * scale)
        jitted = jax.jit(ntk.empirical_ntk_fn(mlp_apply, memory_budget_bytes=budget, **kw))
        np.testing.assert_allclose(jitted(params, x), ref, rtol=0, atol=1e-6 * scale)
        # cross kernel: the chunk follows max(N1, N2) and both batches are blocked with it
        x2 = x[:4] * 0.5
        cross = ntk.empirical_ntk(mlp_apply, params, x, x2, memory_budget_bytes=budget, **kw)
        ref2 = dense_ntk(mlp_apply, params, x, x2, ())
        np.testing.assert_allclose(cross, ref2, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref2))))


# ----------------------------------------------------------------------------- test loss


def random_psd(key, n, log10_range=(-2.0, 2.0), dtype=jnp.float64):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n), dtype))
    lam = jnp.logspace(*log10_range, n, dtype=dtype)
    return (q * lam) @ q.T, lam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ntk_test_loss_equals_scipy_expm(seed):
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(seed))
        n = 12
        a = jax.random.normal(k1, (n, n + 3), jnp.float64)
        theta = a @ a.T / n  # Wishart: random PSD
        r = jax.random.normal(k2, (n,), jnp.float64)
        for t, eta in [(0.0, 0.1), (0.3, 0.5), (2.0, 1.0), (10.0, 0.05)]:
            want = np.sum((scipy.linalg.expm(-eta * t * np.asarray(theta)) @ np.asarray(r)) ** 2)
            got = ntk.ntk_test_loss(theta, r, t, eta)
            np.testing.assert_allclose(got, want, rtol=1e-10)


def test_ntk_test_loss_large_eigenvalues_stable_and_differentiable():
    with jax.enable_x64(True):
        theta, _ = random_psd(jax.random.key(3), 10, (-3.0, 8.0))
        r = jax.random.normal(jax.random.key(4), (10,), jnp.float64)
        # eta t small enough that expm is well conditioned: compare to scipy
        eta, t = 1e-8, 0.7
        want = np.sum((scipy.linalg.expm(-eta * t * np.asarray(theta)) @ np.asarray(r)) ** 2)
        np.testing.assert_allclose(ntk.ntk_test_loss(theta, r, t, eta), want, rtol=1e-8)
        # eta t = O(1): the 1e8 modes vanish; value and gradients finite, gradient matches FD
        feats = ntk.features(theta, r)
        f = lambda t, eta: ntk.ntk_test_loss_from_features(feats, t, eta)  # noqa: E731
        for t in [0.5, 3.0, 1e4]:
            val = f(t, 1.0)
            gt, ge = jax.grad(f, argnums=(0, 1))(t, 1.0)
            assert np.isfinite([val, gt, ge]).all()
            assert gt <= 0 and ge <= 0  # loss decreases with training time and step size
            h = 1e-6 * t
            fd = (f(t + h, 1.0) - f(t - h, 1.0)) / (2 * h)
            np.testing.assert_allclose(gt, fd, rtol=1e-5, atol=1e-12)
        # every eigenvalue is >= 1e-3, so the long-time limit decays to zero
        assert float(f(1e12, 1.0)) < 1e-300
        np.testing.assert_allclose(f(0.0, 1.0), jnp.sum(r**2), rtol=1e-12)


def test_ntk_test_loss_vmaps_over_candidates():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(5), 4)
        thetas = jnp.stack([random_psd(k, 8)[0] for k in keys])
        rs = jax.random.normal(jax.random.key(6), (4, 8), jnp.float64)
        ts = jnp.array([0.1, 0.2, 0.3, 0.4])
        batched = jax.vmap(ntk.ntk_test_loss, in_axes=(0, 0, 0, None))(thetas, rs, ts, 0.5)
        feats = ntk.features(thetas, rs)  # batched eigh, leading candidate axis
        from_feats = jax.jit(ntk.ntk_test_loss_from_features)(feats, ts, 0.5)
        for m in range(4):
            want = np.sum(
                (scipy.linalg.expm(-0.5 * float(ts[m]) * np.asarray(thetas[m])) @ rs[m]) ** 2
            )
            np.testing.assert_allclose(batched[m], want, rtol=1e-10)
            np.testing.assert_allclose(from_feats[m], want, rtol=1e-10)


@pytest.mark.slow
def test_ntk_test_loss_of_real_kernel_matches_expm():
    """End to end: the LM loss-gradient kernel feeds F(Θ, t)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), lm_init(jax.random.key(16)))
        toks = jax.random.randint(jax.random.key(17), (6, T), 0, V)
        theta = ntk.loss_gradient_kernel(per_example_loss, params, toks, chunk_size=4)
        r = per_example_loss(params, toks) - 1.0
        feats, diag = ntk.checked_features(theta, r, name="tiny-lm")
        assert float(diag.asymmetry) < 1e-12
        assert float(diag.clipped) < 1e-10
        want = np.sum((scipy.linalg.expm(-0.01 * 3.0 * np.asarray(theta)) @ np.asarray(r)) ** 2)
        np.testing.assert_allclose(ntk.ntk_test_loss_from_features(feats, 3.0, 0.01), want, 1e-10)


# ----------------------------------------------------------------------------- bad input


def test_round_off_non_psd_is_symmetrised_clipped_and_reported():
    with jax.enable_x64(True):
        a = jax.random.normal(jax.random.key(18), (6, 3), jnp.float64)
        theta = np.asarray(a @ a.T)  # rank 3: three zero eigenvalues
        noise = 1e-12 * np.asarray(jax.random.normal(jax.random.key(19), (6, 6), jnp.float64))
        bad = theta + noise  # asymmetric and slightly indefinite by round-off
        r = np.arange(6.0)
        feats, diag = ntk.checked_features(bad, r, name="cand-A")
        assert float(jnp.min(feats.eigenvalues)) >= 0.0
        assert 0.0 < float(diag.clipped) < 1e-10
        assert 0.0 < float(diag.asymmetry) < 1e-10
        assert float(diag.min_eigenvalue) < 0.0
        np.testing.assert_allclose(
            ntk.ntk_test_loss_from_features(feats, 1.0, 0.1),
            ntk.ntk_test_loss(theta, r, 1.0, 0.1),
            rtol=1e-9,
        )


def test_bad_kernels_raise_naming_the_candidate():
    with jax.enable_x64(True):
        theta = np.eye(4)
        r = np.ones(4)
        with pytest.raises(ntk.NTKError, match=r"'gpt2-xl'.*non-finite"):
            ntk.checked_features(np.where(np.eye(4) > 0, np.nan, 0.0), r, name="gpt2-xl")
        with pytest.raises(ntk.NTKError, match=r"'opt'.*not PSD"):
            ntk.check_kernel(np.diag([1.0, 1.0, -0.5, 1.0]), name="opt")
        with pytest.raises(ntk.NTKError, match="not symmetric"):
            ntk.check_kernel(np.triu(np.ones((4, 4))), name="c")
        with pytest.raises(ntk.NTKError, match=r"residual.*\(4,\)"):
            ntk.checked_features(theta, np.ones(5), name="c")
        with pytest.raises(ntk.NTKError, match=r"\(\.\.\., N, N\)"):
            ntk.check_kernel(np.ones((3, 4)))
        with pytest.raises(ntk.NTKError, match=r"residual.*non-finite"):
            ntk.checked_features(theta, np.array([1.0, np.inf, 0.0, 0.0]))


def test_bad_ntk_inputs_raise_one_line_errors():
    params = mlp_init(jax.random.key(20))
    x = jnp.ones((4, 3))
    with pytest.raises(ntk.NTKError, match=r"'m1'.*different pytree"):
        ntk.empirical_ntk(mlp_apply, params, x, {"x": x}, name="m1")
    with pytest.raises(ntk.NTKError, match="per-example shape"):
        ntk.empirical_ntk(mlp_apply, params, x, jnp.ones((4, 5)))
    with pytest.raises(ntk.NTKError, match="same leading batch axis"):
        ntk.empirical_ntk(lambda p, b: mlp_apply(p, b["a"]), params, {"a": x, "b": jnp.ones(3)})
    with pytest.raises(ntk.NTKError, match="trace_axes"):
        ntk.empirical_ntk(mlp_apply, params, x, trace_axes=(0,))
    with pytest.raises(ntk.NTKError, match="unknown NTK implementation"):
        ntk.empirical_ntk(mlp_apply, params, x, implementation="svd")
    with pytest.raises(ntk.NTKError, match="chunk_size"):
        ntk.empirical_ntk(mlp_apply, params, x, chunk_size=0)
    with pytest.raises(ntk.NTKError, match="chunk_size"):
        ntk.empirical_ntk(mlp_apply, params, x, chunk_size="big")
    with pytest.raises(ntk.NTKError, match="memory_budget_bytes"):
        ntk.empirical_ntk(mlp_apply, params, x, memory_budget_bytes=0)
    with pytest.raises(ntk.NTKError, match="leading batch axis 4"):
        ntk.empirical_ntk(lambda p, x: mlp_apply(p, x).sum(), params, x)
    with pytest.raises(ntk.NTKError, match="failed to trace"):
        ntk.empirical_ntk(mlp_apply, {"dense1": params["dense1"]}, x)
    with pytest.raises(ntk.NTKError, match="expected"):
        ntk.ntk_vp(mlp_apply, params, x, jnp.ones(3))
    # NaN outputs are caught outside jit and name the candidate
    nan_f = lambda p, x: mlp_apply(p, x) * jnp.log(x[:, :1] - 2.0)  # noqa: E731
    with pytest.raises(ntk.NTKError, match=r"'llama'.*non-finite"):
        ntk.empirical_ntk(nan_f, params, x, name="llama")
    assert issubclass(ntk.NTKError, ValueError)
    assert issubclass(ntk.NTKError, LensLLMError)


@pytest.mark.slow
def test_model_zoo_plugs_in():
    """The model zoo's GPT-2 per_example_loss / token_logprobs feed both LM kernels."""
    import functools

    from lensllm_jax import models

    with jax.enable_x64(True):
        hf = {"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2, "vocab_size": 13}
        m = models.from_config({**hf, "n_positions": 8}, 0, dtype=jnp.float64)
        toks = jax.random.randint(jax.random.key(40), (3, 6), 0, 13)
        batch = {"tokens": toks, "loss_mask": jnp.ones_like(toks).at[:, :2].set(0)}
        loss = functools.partial(models.per_example_loss, m.apply)
        got = ntk.loss_gradient_kernel(loss, m.params, batch, chunk_size=2, name="gpt2-tiny")
        # 1e-6 of the scale, not 1e-9: the zoo's token_logprobs does its log-softmax in float32
        want = dense_ntk(loss, m.params, batch, batch, None)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.max(want)))

        def logprobs(p, b):
            return models.token_logprobs(m.apply, p, b["tokens"]) * b["loss_mask"][:, 1:]

        got = ntk.logit_kernel(logprobs, m.params, batch, implementation="ntk_vector_products")
        want = dense_ntk(logprobs, m.params, batch, batch, None)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.max(want)))


def test_repeated_calls_with_one_function_reuse_the_kernel_program():
    """empirical_ntk caches its kernel function per (f, options): a second parameter set of
    the same shapes gets the same compiled program and its own, correct kernel."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(4), (6, 3))
        p1, p2 = mlp_init(jax.random.key(1)), mlp_init(jax.random.key(2))
        before = ntk._cached_ntk_fn.cache_info()
        k1 = ntk.empirical_ntk(mlp_apply, p1, x, chunk_size=2)
        k2 = ntk.empirical_ntk(mlp_apply, p2, x, chunk_size=2)
        after = ntk._cached_ntk_fn.cache_info()
        assert after.hits - before.hits >= 1 and after.misses - before.misses <= 1
        for p, k in ((p1, k1), (p2, k2)):
            np.testing.assert_allclose(k, dense_ntk(mlp_apply, p, x, x, None), rtol=1e-10)
        # an unhashable option still works, uncached
        k3 = ntk.empirical_ntk(mlp_apply, p2, x, trace_axes=[1], chunk_size=2)
        np.testing.assert_allclose(k3, k2, rtol=1e-12)
