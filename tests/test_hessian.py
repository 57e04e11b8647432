"""Hessian estimators vs the dense `jax.hessian` of the flattened parameters."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lensllm_jax.core import hessian


def init(key):
    k = jax.random.split(key, 5)
    return {
        "layer1": {
            "w": jax.random.normal(k[0], (4, 6)) / 2.0,
            "b": 0.1 * jax.random.normal(k[1], (6,)),
        },
        "layer2": {"w": jax.random.normal(k[2], (6, 3)) / 2.5},
    }


def make_loss(params_dtype=jnp.float64, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (16, 4), params_dtype)
    y = jax.random.randint(ky, (16,), 0, 3)

    def loss(p):
        h = jnp.tanh(x @ p["layer1"]["w"] + p["layer1"]["b"])
        logits = h @ p["layer2"]["w"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return loss


def dense_hessian(loss, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat))


def f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64), tree)


def block_slices(params):
    """Index ranges of each leaf in the raveled vector, keyed like group_by='leaf'."""
    out, start = {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[jax.tree_util.keystr(path)] = slice(start, start + leaf.size)
        start += leaf.size
    return out


def test_rademacher_probes_are_fair_independent_signs():
    """Signs come 32 to a PRNG word: check the values, balance per bit position, and that
    neighbours within and across words are uncorrelated (E[z zᵀ] = I is what Hutchinson uses)."""
    params = {"a": jnp.zeros((1000, 1049), jnp.float32), "b": jnp.zeros((3, 7), jnp.bfloat16)}
    z = hessian.rademacher(jax.random.key(0), params)
    assert z["a"].shape == (1000, 1049) and z["b"].dtype == jnp.bfloat16
    a = np.asarray(z["a"]).ravel()
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert set(np.unique(np.asarray(z["b"], np.float32))) <= {-1.0, 1.0}
    n = a.size
    assert abs(a.mean()) < 5 / np.sqrt(n)
    for lag in (1, 2, 16, 31, 32, 33, 64):
        assert abs(np.mean(a[:-lag] * a[lag:])) < 5 / np.sqrt(n - lag), lag
    per_bit = a[: n // 32 * 32].reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(per_bit) < 5 / np.sqrt(n // 32))
    again = hessian.rademacher(jax.random.key(0), params)
    other = hessian.rademacher(jax.random.key(1), params)
    np.testing.assert_array_equal(np.asarray(again["a"]), np.asarray(z["a"]))
    assert abs(np.mean(np.asarray(other["a"]).ravel() * a)) < 5 / np.sqrt(n)


@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
def test_hutchinson_within_three_standard_errors_and_groups_sum(sampler):
    with jax.enable_x64(True):
        params, loss = f64(init(jax.random.key(0))), make_loss()
        h = dense_hessian(loss, params)
        est = hessian.hutchinson_trace(
            loss, params, jax.random.key(2), 300, sampler=sampler, batch_size=50
        )
        exact = np.trace(h)
        assert 0 < float(est.stderr) < 0.2 * abs(exact)  # a real, informative error bar
        assert abs(float(est.mean) - exact) < 3 * float(est.stderr)
        # the JSON summary: probes counted, stderr = sample std / √m recomputed independently
        rep = est.as_dict()
        assert est.num_probes == rep["num_probes"] == 300
        s = np.asarray(est.samples)
        np.testing.assert_allclose(rep["stderr"], np.std(s, ddof=1) / np.sqrt(300), rtol=1e-10)
        np.testing.assert_allclose(rep["trace"], np.mean(s), rtol=1e-12)
        assert set(rep["per_group"]) == set(est.per_group)
        assert json.loads(json.dumps(rep)) == rep
        # per-leaf traces estimate the diagonal blocks and sum to the total sample by sample
        blocks = block_slices(params)
        assert set(est.per_group) == set(blocks)
        np.testing.assert_allclose(sum(est.per_group.values()), est.mean, rtol=1e-12)
        for g, sl in blocks.items():
            exact_g = np.trace(h[sl, sl])
            assert (
                abs(float(est.per_group[g]) - exact_g) < 3 * float(est.per_group_stderr[g]) + 1e-9
            )


def test_top_level_groups_and_jit():
    with jax.enable_x64(True):
        params, loss = f64(init(jax.random.key(3))), make_loss(seed=4)
        h = dense_hessian(loss, params)
        est = jax.jit(lambda p, k: hessian.hutchinson_trace(loss, p, k, 64, group_by="top"))(
            params, jax.random.key(5)
        )
        assert set(est.per_group) == {"['layer1']", "['layer2']"}
        # plain jvp-of-grad per probe gives the same samples as the shared linearisation
        plain = hessian.hutchinson_trace(
            loss, params, jax.random.key(5), 64, group_by="top", linearize=False, batch_size=8
        )
        np.testing.assert_allclose(plain.samples, est.samples, rtol=1e-10)
        np.testing.assert_allclose(sum(est.per_group.values()), est.mean, rtol=1e-12)
        n1 = 4 * 6 + 6  # layer1: b (6) then w (24) in raveled (sorted-key) order
        exact = {"['layer1']": np.trace(h[:n1, :n1]), "['layer2']": np.trace(h[n1:, n1:])}
        for g, val in exact.items():
            assert abs(float(est.per_group[g]) - val) < 3 * float(est.per_group_stderr[g]) + 1e-9


def test_hutchpp_exact_at_full_rank():
    with jax.enable_x64(True):
        params, loss = f64(init(jax.random.key(6))), make_loss(seed=7)
        h = dense_hessian(loss, params)
        full = hessian.hutchpp_trace(loss, params, jax.random.key(8), 3 * h.shape[0])
        np.testing.assert_allclose(full.mean, np.trace(h), rtol=1e-9)  # Q spans R^P
        assert full.num_probes == h.shape[0]  # k = num_matvecs // 3 residual probes
        assert "per_group" not in full.as_dict()


@pytest.mark.slow
def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    """Quadratic loss ½ θᵀAθ with eigenvalues 1/k²: deflating the top 10 leaves a tiny residual."""
    with jax.enable_x64(True):
        params = f64(init(jax.random.key(20)))
        p = ravel_pytree(params)[0].size
        q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(21), (p, p), jnp.float64))
        a = (q / jnp.arange(1.0, p + 1) ** 2) @ q.T

        def loss(tree):
            v = ravel_pytree(tree)[0]
            return 0.5 * v @ a @ v

        exact = float(jnp.trace(a))
        keys = jax.random.split(jax.random.key(22), 8)
        pp = jax.vmap(lambda k: hessian.hutchpp_trace(loss, params, k, 30))(keys)
        hh = jax.vmap(lambda k: hessian.hutchinson_trace(loss, params, k, 30))(keys)
        err_pp = np.abs(np.asarray(pp.mean) - exact)
        err_h = np.abs(np.asarray(hh.mean) - exact)
        assert np.all(err_pp < 3 * np.asarray(pp.stderr) + 1e-12)
        assert np.mean(err_pp) < 0.2 * np.mean(err_h)
        assert np.max(err_pp) < 0.02 * exact


def test_top_eigenvalue_matches_eigvalsh():
    with jax.enable_x64(True):
        params, loss = f64(init(jax.random.key(9))), make_loss(seed=10)
        ev = np.linalg.eigvalsh(dense_hessian(loss, params))
        want = ev[np.argmax(np.abs(ev))]
        got = hessian.top_eigenvalue(loss, params, jax.random.key(11), num_iters=300)
        np.testing.assert_allclose(got.eigenvalue, want, rtol=1e-6)
        assert float(got.residual) < 1e-3 * abs(want)
        # the returned vector is a unit eigenvector of the dense Hessian
        v = ravel_pytree(got.eigenvector)[0]
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-12)


def test_hessian_distance_matches_dense_quadratic_forms():
    with jax.enable_x64(True):
        pre = f64(init(jax.random.key(12)))
        delta = f64(init(jax.random.key(13)))
        ft = jax.tree.map(lambda a, d: a + 0.1 * d, pre, delta)
        loss = make_loss(seed=14)
        h = dense_hessian(loss, ft)  # default: Hessian at the fine-tuned point
        v = np.asarray(ravel_pytree(ft)[0] - ravel_pytree(pre)[0])
        dist = hessian.hessian_distance(loss, pre, ft)
        np.testing.assert_allclose(dist.total, v @ h @ v, rtol=1e-10)
        np.testing.assert_allclose(sum(dist.per_group.values()), dist.total, rtol=1e-12)
        for g, sl in block_slices(ft).items():
            np.testing.assert_allclose(
                dist.per_group[g], v[sl] @ (h @ v)[sl], rtol=1e-9, atol=1e-14
            )
            np.testing.assert_allclose(
                dist.per_group_block[g], v[sl] @ h[sl, sl] @ v[sl], rtol=1e-9
            )
        # Hessian at the pretrained point on request
        h0 = dense_hessian(loss, pre)
        at_pre = hessian.hessian_distance(loss, pre, ft, hessian_at=pre)
        np.testing.assert_allclose(at_pre.total, v @ h0 @ v, rtol=1e-10)


def test_hvp_matches_dense():
    with jax.enable_x64(True):
        params, loss = f64(init(jax.random.key(15))), make_loss(seed=16)
        v = hessian.gaussian(jax.random.key(17), params)
        got = ravel_pytree(hessian.hvp(loss, params, v))[0]
        np.testing.assert_allclose(
            got, dense_hessian(loss, params) @ ravel_pytree(v)[0], rtol=1e-10
        )


def test_bad_input_raises_one_line_errors():
    params, loss = init(jax.random.key(18)), make_loss(jnp.float32)
    key = jax.random.key(0)
    with pytest.raises(hessian.HessianError, match=r"'m'.*scalar"):
        hessian.hutchinson_trace(lambda p: p["layer2"]["w"], params, key, 4, name="m")
    with pytest.raises(hessian.HessianError, match="num_probes"):
        hessian.hutchinson_trace(loss, params, key, 1)
    with pytest.raises(hessian.HessianError, match="unknown sampler"):
        hessian.hutchinson_trace(loss, params, key, 4, sampler="sobol")
    with pytest.raises(hessian.HessianError, match="group_by"):
        hessian.hutchinson_trace(loss, params, key, 4, group_by="layer")
    with pytest.raises(hessian.HessianError, match="floating-point"):
        hessian.top_eigenvalue(loss, {**params, "step": jnp.array(3)}, key)
    with pytest.raises(hessian.HessianError, match="failed to trace"):
        hessian.hutchinson_trace(loss, {"layer1": params["layer1"]}, key, 4)
    with pytest.raises(hessian.HessianError, match="differ in structure"):
        hessian.hessian_distance(loss, params, {"layer1": params["layer1"]})
    bad = jax.tree.map(lambda a: a, params)
    bad["layer2"] = {"w": jnp.ones((6, 4))}
    with pytest.raises(hessian.HessianError, match=r"\['layer2'\]\['w'\].*shape"):
        hessian.hessian_distance(loss, params, bad)
    nan_params = jax.tree.map(lambda a: a * jnp.nan, params)
    with pytest.raises(hessian.HessianError, match=r"'cand'.*not finite"):
        hessian.hutchinson_trace(loss, nan_params, key, 4, name="cand")
    with pytest.raises(hessian.HessianError, match="stacked leaves need a leading layer axis"):
        hessian.hutchinson_trace(
            loss, {**params, "layers": jnp.array(1.0)}, key, 4, stacked="layers"
        )
    with pytest.raises(hessian.HessianError, match="num_matvecs"):
        hessian.hutchpp_trace(loss, params, key, 3)
    assert issubclass(hessian.HessianError, ValueError)


def stacked_model(key):
    """A scanned 3-layer residual MLP: layers stacked on axis 0 under "layers"."""
    k = jax.random.split(key, 5)
    params = {
        "embed": jax.random.normal(k[0], (3, 4)) / 2,
        "layers": {
            "w": jax.random.normal(k[1], (3, 4, 4)) / 2,
            "b": 0.1 * jax.random.normal(k[2], (3, 4)),
        },
        "head": jax.random.normal(k[3], (4, 2)) / 2,
    }
    x = jax.random.normal(k[4], (12, 3))
    y = jnp.sin(jnp.arange(24.0)).reshape(12, 2)

    def loss(p):
        h = jnp.tanh(x.astype(p["embed"].dtype) @ p["embed"])
        h, _ = jax.lax.scan(
            lambda h, lp: (h + jnp.tanh(h @ lp["w"] + lp["b"]), None), h, p["layers"]
        )
        return jnp.mean((h @ p["head"] - y) ** 2)

    return f64(params), loss


def stacked_index_sets(params):
    """Raveled indices of each group under group_by='top', stacked='layers'."""
    flat, unravel = ravel_pytree(params)
    idx = jax.tree.map(
        lambda a: np.asarray(a).astype(int), unravel(jnp.arange(flat.size, dtype=flat.dtype))
    )
    sets = {"['embed']": idx["embed"].ravel(), "['head']": idx["head"].ravel()}
    for i in range(3):
        sets[f"['layers'][{i}]"] = np.concatenate(
            [idx["layers"]["b"][i].ravel(), idx["layers"]["w"][i].ravel()]
        )
    return sets


def test_stacked_layers_give_per_layer_traces_and_distances():
    with jax.enable_x64(True):
        params, loss = stacked_model(jax.random.key(30))
        h = dense_hessian(loss, params)
        sets = stacked_index_sets(params)
        est = hessian.hutchinson_trace(
            loss, params, jax.random.key(31), 200, group_by="top", stacked="layers"
        )
        assert set(est.per_group) == set(sets)
        np.testing.assert_allclose(sum(est.per_group.values()), est.mean, rtol=1e-12)
        assert abs(float(est.mean) - np.trace(h)) < 3 * float(est.stderr)
        for g, ix in sets.items():
            exact = np.trace(h[np.ix_(ix, ix)])
            assert abs(float(est.per_group[g]) - exact) < 3 * float(est.per_group_stderr[g]) + 1e-9
        ft = jax.tree.map(lambda a: a + 0.05 * jnp.cos(a * 7.0), params)
        v = np.asarray(ravel_pytree(ft)[0] - ravel_pytree(params)[0])
        hf = dense_hessian(loss, ft)
        dist = hessian.hessian_distance(loss, params, ft, group_by="top", stacked="layers")
        np.testing.assert_allclose(dist.total, v @ hf @ v, rtol=1e-10)
        for g, ix in sets.items():
            np.testing.assert_allclose(
                dist.per_group[g], v[ix] @ (hf @ v)[ix], rtol=1e-9, atol=1e-14
            )
            block = v[ix] @ hf[np.ix_(ix, ix)] @ v[ix]
            np.testing.assert_allclose(dist.per_group_block[g], block, rtol=1e-9, atol=1e-14)


def test_batch_argument_matches_closure_and_compiles_once():
    """loss_fn(params, batch) with batch= gives the closed-over loss's numbers, and a second
    call at other parameter values reuses the compiled program (no recompilation)."""
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.key(3))
        batch = {"x": jax.random.normal(kx, (16, 4)), "y": jax.random.randint(ky, (16,), 0, 3)}

        def loss_b(p, b):
            h = jnp.tanh(b["x"] @ p["layer1"]["w"] + p["layer1"]["b"])
            logits = h @ p["layer2"]["w"]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1))

        p0 = f64(init(jax.random.key(0)))
        p1 = jax.tree.map(lambda a: a + 0.1, p0)
        key = jax.random.key(7)
        closed = hessian.hutchinson_trace(lambda p: loss_b(p, batch), p0, key, 8)
        passed = hessian.hutchinson_trace(loss_b, p0, key, 8, batch=batch)
        np.testing.assert_allclose(passed.mean, closed.mean, rtol=1e-12)
        np.testing.assert_allclose(passed.stderr, closed.stderr, rtol=1e-12)
        hessian.hutchinson_trace(loss_b, p1, key, 8, batch=batch)
        grouping = tuple(hessian._grouping(p0, "leaf", None))
        prog = hessian._hutchinson_program(loss_b, hessian.rademacher, grouping, False, None, None)
        assert prog._cache_size() == 1  # two parameter sets, one compilation

        dense = dense_hessian(lambda p: loss_b(p, batch), p1)
        v = ravel_pytree(p1)[0] - ravel_pytree(p0)[0]
        dist = hessian.hessian_distance(loss_b, p0, p1, batch=batch)
        np.testing.assert_allclose(dist.total, v @ dense @ v, rtol=1e-10)
        top = hessian.top_eigenvalue(loss_b, p1, key, 300, batch=batch)
        eig = np.linalg.eigvalsh(dense)
        np.testing.assert_allclose(top.eigenvalue, eig[np.argmax(np.abs(eig))], rtol=1e-6)
        pp = hessian.hutchpp_trace(loss_b, p1, key, 3 * v.size, batch=batch)
        np.testing.assert_allclose(pp.mean, np.trace(dense), rtol=1e-8)


def test_micro_batched_hvps_equal_the_whole_batch_and_dense():
    """example_chunk splits each HVP over micro-batches (the loss is a mean over examples):
    every estimator gives the whole batch's numbers, and the dense Hessian's; a chunk that does
    not divide N falls to the largest divisor below it; bad chunks are one-line errors."""
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.key(11))
        batch = {"x": jax.random.normal(kx, (12, 4)), "y": jax.random.randint(ky, (12,), 0, 3)}

        def loss_b(p, b):
            h = jnp.tanh(b["x"] @ p["layer1"]["w"] + p["layer1"]["b"])
            logits = h @ p["layer2"]["w"]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1))

        p0 = f64(init(jax.random.key(12)))
        p1 = jax.tree.map(lambda a: a * 1.1 + 0.05, p0)
        dense = dense_hessian(lambda p: loss_b(p, batch), p1)
        key = jax.random.key(13)
        whole = hessian.hutchinson_trace(loss_b, p1, key, 6, batch=batch)
        for chunk in (1, 3, 5):  # 5 -> 4 (the largest divisor of 12 not above 5)
            got = hessian.hutchinson_trace(loss_b, p1, key, 6, batch=batch, example_chunk=chunk)
            np.testing.assert_allclose(got.samples, whole.samples, rtol=1e-10)
            for g in whole.per_group or {}:
                np.testing.assert_allclose(got.per_group[g], whole.per_group[g], rtol=1e-10)
        assert hessian._example_chunk(5, batch, None) == 4
        assert hessian._example_chunk(100, batch, None) is None  # all 12 at once
        v = ravel_pytree(p1)[0] - ravel_pytree(p0)[0]
        dist = hessian.hessian_distance(
            loss_b, p0, p1, batch=batch, example_chunk=4, blocks=False, group_by="top"
        )
        np.testing.assert_allclose(dist.total, v @ dense @ v, rtol=1e-10)
        assert dist.per_group_block == {}
        top = hessian.top_eigenvalue(loss_b, p1, key, 300, batch=batch, example_chunk=3)
        eig = np.linalg.eigvalsh(dense)
        np.testing.assert_allclose(top.eigenvalue, eig[np.argmax(np.abs(eig))], rtol=1e-6)
        pp = hessian.hutchpp_trace(loss_b, p1, key, 3 * v.size, batch=batch, example_chunk=6)
        np.testing.assert_allclose(pp.mean, np.trace(dense), rtol=1e-8)
        with pytest.raises(hessian.HessianError, match=r"example_chunk.*needs batch="):
            hessian.hutchinson_trace(lambda p: loss_b(p, batch), p1, key, 4, example_chunk=2)
        with pytest.raises(hessian.HessianError, match=r"example_chunk.*positive int"):
            hessian.hutchinson_trace(loss_b, p1, key, 4, batch=batch, example_chunk=0)
        with pytest.raises(hessian.HessianError, match="same leading example axis"):
            hessian.hutchinson_trace(
                lambda p, b: loss_b(p, b) + b["z"].sum(), p1, key, 4,
                batch={**batch, "z": jnp.ones(3)}, example_chunk=2,
            )  # fmt: skip


def test_orthonormal_rows_against_numpy_qr():
    """Hutch++'s in-place orthonormalisation: orthonormal rows spanning the same subspace as
    numpy's QR (equal projectors), and a row in the span of the others (rank < k) set to 0."""
    from lensllm_jax.core._orthonormal import orthonormal_rows

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 40)) * np.array([1e3, 1.0, 1e-2, 5.0, 0.3])[:, None]
    q = np.asarray(orthonormal_rows(jnp.asarray(a, jnp.float32)), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=2e-5)
    ref, _ = np.linalg.qr(a.T)
    np.testing.assert_allclose(q.T @ q, ref @ ref.T, atol=2e-5)
    b = a.copy()
    b[3] = 2 * a[0] - a[1]  # rank 4
    qb = np.asarray(orthonormal_rows(jnp.asarray(b, jnp.float32)), np.float64)
    assert np.abs(qb[3]).max() == 0.0
    ref_b, _ = np.linalg.qr(np.delete(b, 3, axis=0).T)
    np.testing.assert_allclose(qb.T @ qb, ref_b @ ref_b.T, atol=2e-5)
