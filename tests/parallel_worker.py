"""Runs in a subprocess with 8 forced host devices (XLA_FLAGS set by tests/parallel_tools.py
before jax starts, so nothing leaks into the test process): computes each quantity sharded
on a ("data", "fsdp") mesh and on one device with the unsharded functions, and saves both
(plus per-device shard shapes) to an .npz for the tests to compare.

    python tests/parallel_worker.py TASK OUT.npz [ARG]
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import models
from lensllm_jax.core import fit, hessian, ntk
from lensllm_jax.models.lm_probe import mean_probe_loss_fn, probe_loss_fn
from lensllm_jax.parallel import fit as pfit
from lensllm_jax.parallel import hessian as phessian
from lensllm_jax.parallel import ntk as pntk
from lensllm_jax.parallel.mesh import make_mesh
from lensllm_jax.parallel.rules import param_shardings, shard_params
from lensllm_jax.runner import finetune

TINY = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
out: dict[str, np.ndarray] = {}


def flat(prefix: str, tree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def shard_shapes(prefix: str, tree) -> None:
    """Per-device block shape of every leaf (all devices must agree: checked here)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shapes = {tuple(s.data.shape) for s in leaf.addressable_shards}
        assert len(shapes) == 1, (path, shapes)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(next(iter(shapes)))


def rule_shardings(prefix: str, tree, mesh) -> None:
    """1 per leaf whose sharding is the rule's NamedSharding (`rules.param_shardings`), else 0."""
    want = jax.tree_util.tree_leaves(param_shardings(tree, mesh))
    for (path, leaf), rule in zip(jax.tree_util.tree_flatten_with_path(tree)[0], want, strict=True):
        same = isinstance(leaf.sharding, jax.sharding.NamedSharding)
        same = same and leaf.sharding.is_equivalent_to(rule, leaf.ndim)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(int(same))


def batch(rng, n: int, t: int, vocab: int = 64) -> dict[str, np.ndarray]:
    return {
        "tokens": rng.integers(0, vocab, (n, t)).astype(np.int32),
        "loss_mask": (rng.random((n, t)) < 0.7).astype(np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "nats_per_byte": rng.uniform(0.2, 0.5, n).astype(np.float32),
    }


def task_programs(mesh_spec: str) -> None:
    mesh = make_mesh(mesh_spec)
    m = models.from_config(TINY, 0)
    rng = np.random.default_rng(0)

    # fine-tuning: three AdamW steps, sharded vs one device
    b = batch(rng, 8, 12)
    cfg = finetune.FinetuneConfig()
    init1, step1 = finetune.make_train_step(m.apply, cfg)
    init8, step8 = finetune.make_train_step(m.apply, cfg, mesh=mesh)
    p1 = jax.tree.map(lambda x: jnp.array(x, copy=True), m.params)
    o1 = init1(p1)
    p8 = shard_params(m.params, mesh)
    shard_shapes("params_shard", p8)
    o8 = init8(p8)
    losses1, losses8 = [], []
    for lr in (1e-3, 2e-3, 5e-4):
        p1, o1, l1 = step1(p1, o1, b, lr)
        p8, o8, l8 = step8(p8, o8, b, lr)
        losses1.append(float(l1))
        losses8.append(float(l8))
    out["step_loss_1"], out["step_loss_8"] = np.asarray(losses1), np.asarray(losses8)
    flat("step_params_1", p1)
    flat("step_params_8", p8)
    shard_shapes("step_params_shard", p8)
    shard_shapes("adam_mu_shard", o8[-1].mu)

    # evaluation
    from lensllm_jax.data.text import TokenData

    td = TokenData(
        tokens=b["tokens"],
        loss_mask=b["loss_mask"],
        attention_mask=b["attention_mask"],
        target_bytes=rng.integers(5, 20, 8),
    )
    e1 = finetune.evaluate(m.apply, m.params, td, batch_size=4)
    e8 = finetune.evaluate(m.apply, shard_params(m.params, mesh), td, batch_size=4, mesh=mesh)
    out["eval_1"], out["eval_8"] = np.asarray(e1[:2] + e1[3:]), np.asarray(e8[:2] + e8[3:])

    # NTK of the per-example probe loss: one block, and 4 blocks (promoted-row schedule)
    pb = batch(rng, 13, 10)
    loss = probe_loss_fn(m.apply)
    pm = shard_params(m.params, mesh)
    out["ntk_1"] = np.asarray(ntk.loss_gradient_kernel(loss, m.params, pb))
    out["ntk_8"] = pntk.loss_gradient_kernel(loss, pm, pb, mesh, chunk_size=None)
    out["ntk_8_blocks"] = pntk.loss_gradient_kernel(loss, pm, pb, mesh, chunk_size=4)
    out["residual_1"] = np.asarray(loss(m.params, pb))
    out["residual_8"] = pntk.per_example_values(loss, pm, pb, mesh)

    # Hutchinson (5 probes: padded to the data axis) and v^T H v
    hb = batch(rng, 8, 10)
    mean_loss = mean_probe_loss_fn(m.apply)
    key = jax.random.PRNGKey(3)
    t1 = hessian.hutchinson_trace(mean_loss, m.params, key, 5, group_by="top", batch=hb)
    t8 = phessian.hutchinson_trace(mean_loss, pm, key, 5, mesh, group_by="top", batch=hb)
    out["hutch_samples_1"], out["hutch_samples_8"] = np.asarray(t1.samples), np.asarray(t8.samples)
    out["hutch_1"] = np.asarray([float(t1.mean), float(t1.stderr)])
    out["hutch_8"] = np.asarray([float(t8.mean), float(t8.stderr)])
    groups = sorted(t1.per_group or {})
    out["hutch_groups_1"] = np.asarray([float((t1.per_group or {})[g]) for g in groups])
    out["hutch_groups_8"] = np.asarray([float((t8.per_group or {})[g]) for g in groups])
    m2 = models.from_config(TINY, 1)
    d1 = hessian.hessian_distance(mean_loss, m.params, m2.params, group_by="top", batch=hb)
    d8 = phessian.hessian_distance(
        mean_loss, pm, shard_params(m2.params, mesh), mesh, group_by="top", batch=hb
    )
    out["vhv"] = np.asarray([float(d1.total), d8])

    # the law fitter: 21 candidates over 8 devices
    d = 200.0 * 2.0 ** np.arange(8)
    curves = np.stack(
        [
            rng.uniform(5, 40) / (rng.uniform(1, 50) + d ** rng.uniform(0.2, 0.6))
            + rng.uniform(0.5, 1.5)
            for _ in range(21)
        ]
    )
    r1 = fit.fit_law("rectified", d, curves)
    r8 = pfit.fit_law("rectified", d, curves, mesh)
    out["fit_raw_1"], out["fit_raw_8"] = r1.raw, r8.raw
    out["fit_status_1"], out["fit_status_8"] = r1.status, r8.status


def save_hf(m, folder: Path, config: dict) -> None:
    """A safetensors checkpoint of a from_config model, as save_pretrained names it."""
    from safetensors.numpy import save_file

    from lensllm_jax.models.loading import family_module

    fam = family_module(m.config)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(m.params)[0]:
        keys = tuple(k.key for k in path)
        name, transpose = fam.hf_name(keys)
        arr = np.asarray(leaf, np.float32)
        for i in range(arr.shape[0]) if keys[0] == "layers" else [None]:
            a = arr if i is None else arr[i]
            a = a.T if transpose else a
            tensors[fam.HF_PREFIXES[0] + name.format(i=i)] = np.ascontiguousarray(a)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def task_loading(mesh_spec: str, folder: str) -> None:
    """Load a checkpoint into shards; compare with the plain load; peak host memory."""
    mesh = make_mesh(mesh_spec)
    config = dict(TINY, hidden_size=64, intermediate_size=256, num_hidden_layers=8, vocab_size=512)
    m = models.from_config(config, 0)
    save_hf(m, Path(folder), config)
    total = sum(x.size * 4 for x in jax.tree.leaves(m.params))

    def host_peak(**kw):
        """Peak Python/numpy heap of a load (after a first load compiled its programs)."""
        jax.block_until_ready(models.load(folder, **kw).params)
        tracemalloc.start()
        loaded = models.load(folder, **kw)
        jax.block_until_ready(loaded.params)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return loaded, peak

    plain, peak_plain = host_peak()
    sharded, peak_sharded = host_peak(mesh=mesh)
    out["host_peak"] = np.asarray([total, peak_plain, peak_sharded])
    flat("load_plain", plain.params)
    flat("load_sharded", sharded.params)
    shard_shapes("load_blocks", sharded.params)
    rule_shardings("load_rule", sharded.params, mesh)


def task_gguf(mesh_spec: str, path: str) -> None:
    mesh = make_mesh(mesh_spec)
    plain = models.load(path)
    flat("gguf_plain", plain.params)
    del plain
    sharded = models.load(path, mesh=mesh)
    flat("gguf_sharded", sharded.params)
    shard_shapes("gguf_blocks", sharded.params)
    rule_shardings("gguf_rule", sharded.params, mesh)


if __name__ == "__main__":
    task, dest, *rest = sys.argv[1:]
    assert jax.device_count() == 8, jax.devices()
    {"programs": task_programs, "loading": task_loading, "gguf": task_gguf}[task](*rest)
    np.savez(dest, **out)
    print("ok")
