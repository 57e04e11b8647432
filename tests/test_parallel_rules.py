"""What lies where, without devices: mesh layouts, the sharding rules on the zoo's real
parameter trees (hand-checked blocks and byte counts), optimizer state following its
parameters, the memory plan's exact state terms, and the command-line switches."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lensllm_jax import cli
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.parallel import plan, rules
from lensllm_jax.parallel.mesh import mesh_shape, parse_mesh
from lensllm_jax.runner.distributed import Cluster, initialize

GPT2_SMALL_PARAMS = 124_439_808  # openai-community/gpt2, wpe included
KEY = jax.tree_util.DictKey


def test_mesh_layouts():
    assert parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    assert mesh_shape("data=2,fsdp=4", 8) == (2, 4)
    assert mesh_shape("fsdp=8", 8) == (1, 8)
    assert mesh_shape("data=4", 8) == (4, 2)
    assert mesh_shape(None, 8) == (8, 1)
    for bad in ("data=3,fsdp=3", "model=2", "data=0", "data=2,data=4", "", "fsdp=16"):
        with pytest.raises(LensLLMInputError) as err:
            mesh_shape(bad, 8)
        assert "\n" not in str(err.value) and "mesh" in str(err.value)


@pytest.mark.parametrize(
    ("path", "shape", "fsdp", "spec"),
    [
        ((KEY("embed"), KEY("embedding")), (64, 32), 4, P("fsdp", None)),
        ((KEY("wte"), KEY("embedding")), (50257, 768), 8, P(None, "fsdp")),  # odd vocab
        ((KEY("layers"), KEY("up"), KEY("kernel")), (2, 32, 48), 4, P(None, None, "fsdp")),
        ((KEY("layers"), KEY("q"), KEY("kernel")), (2, 32, 32), 4, P(None, "fsdp", None)),
        ((KEY("layers"), KEY("n"), KEY("scale")), (8, 6), 8, P()),  # never the layer axis
        ((KEY("norm"), KEY("scale")), (6,), 8, P()),  # too small: replicated
        ((KEY("norm"), KEY("scale")), (32,), 1, P()),
        ((), (), 4, P()),
    ],
)
def test_leaf_rule(path, shape, fsdp, spec):
    assert rules.leaf_spec(path, shape, fsdp) == spec


def test_every_gpt2_small_leaf_is_split_eight_ways_so_a_device_holds_an_eighth():
    shapes = plan.param_shapes(plan.model_config("gpt2-small"))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == GPT2_SMALL_PARAMS
    assert rules.sharded_bytes(shapes, 1) == 4 * GPT2_SMALL_PARAMS
    assert rules.sharded_bytes(shapes, 8) == 4 * GPT2_SMALL_PARAMS // 8
    # fsdp = 5 divides none of 50257, 1024, 768, 2304, 3072 (nor may it take the 12 layers):
    # every leaf is replicated.
    assert rules.sharded_bytes(shapes, 5) == 4 * GPT2_SMALL_PARAMS


def test_adam_moments_follow_their_parameters():
    shapes = plan.param_shapes(plan.model_config("smollm2-135m"))
    state = jax.eval_shape(optax.adamw(1e-4).init, shapes)
    specs = rules.param_specs(state, 8)
    want = rules.param_specs(shapes, 8)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    assert jax.tree.leaves(specs[0].mu, is_leaf=is_spec) == jax.tree.leaves(want, is_leaf=is_spec)
    assert jax.tree.leaves(specs[0].nu, is_leaf=is_spec) == jax.tree.leaves(want, is_leaf=is_spec)
    assert specs[0].count == P()
    # SmolLM2-135M's 9 query heads x 64 = 576 = 8 x 72 and vocab 49152: all split
    assert rules.sharded_bytes(shapes, 8) * 8 == rules.sharded_bytes(shapes, 1)


@pytest.mark.parametrize(("batch", "spec"), [(16, P(("data", "fsdp"))), (6, P("data")), (3, P())])
def test_batch_examples_over_data_and_fsdp_when_they_divide(batch, spec):
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4})
    assert rules.batch_spec(batch, mesh) == spec  # type: ignore[arg-type]


def test_plan_state_terms_are_exact():
    cfg = plan.model_config("gpt2-small")
    p8 = 4 * GPT2_SMALL_PARAMS // 8
    est = plan.estimate(cfg, 1, 8, plan.Workload(batch_size=8, max_length=128))
    ft = est["finetune"]
    assert ft["params (pretrained + working)"] == 2 * p8 and ft["adam moments"] == 2 * p8
    assert ft["gradient"] == p8
    assert ft["total"] == sum(v for k, v in ft.items() if k != "total")
    assert est["hessian"]["params (pretrained + fine-tuned)"] == 2 * p8
    # activations of one example per device, 128 tokens (batch 8 over 8 devices)
    one = plan.estimate(cfg, 1, 1, plan.Workload(batch_size=1, max_length=128))
    assert ft["activations"] == one["finetune"]["activations"]


def test_auto_layout_takes_the_smallest_fsdp_that_fits():
    kw = dict(batch_size=8, max_length=256, probe_size=32, hessian_probes=8)
    assert plan.auto_layout(["gpt2-small"], 8, device_bytes=141 * 10**9, **kw) == {
        "data": 8,
        "fsdp": 1,
    }
    assert plan.auto_layout(["llama-3-8b"], 8, device_bytes=141 * 10**9, **kw) == {
        "data": 1,
        "fsdp": 8,
    }
    assert plan.smallest_mesh(plan.model_config("llama-3-8b"), 4) is None  # needs 8
    # a CPU states no memory: all devices on data
    assert plan.auto_layout(["llama-3-8b"], 8, device_bytes=None, **kw)["fsdp"] in (1, 8)


def test_plan_command_table_and_json(capsys):
    assert cli.main(["plan", "gpt2-small", "llama-3-8b", "--devices", "8"]) == 0
    text = capsys.readouterr().out
    assert "gpt2-small" in text and "smallest mesh that fits: data=1,fsdp=8" in text
    assert cli.main(["plan", "smollm2-135m", "--format", "json", "--device-memory", "80GiB"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    # on one 80 GiB device the Hessian of 32 probe examples x 256 tokens does not fit
    assert entry["params"] == 134_515_008 and entry["smallest_devices"] == 2
    est = plan.estimate(plan.model_config("smollm2-135m"), 1, 8, device_bytes=80 * 2**30)
    assert entry["rows"][1]["estimate"] == {k: v["total"] for k, v in est.items()}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "gpt2-small", "--device-memory", "lots"], "--device-memory"),
        (["plan", "no-such-model"], "no-such-model"),
        (["plan", "gpt2-small", "--devices", "0"], "--devices"),
        (["run", "--models", "m", "--data", "d.jsonl", "--process-id", "1"], "--distributed"),
    ],
)
def test_bad_switches_are_one_line_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lensllm: error:") and needle in err and err.count("\n") == 1


def test_distributed_values_are_checked_before_jax_is_asked():
    for cluster in (Cluster("h:1", 2, None), Cluster("h:1", 2, 2), Cluster("nohostport", 2, 0)):
        with pytest.raises(LensLLMInputError):
            initialize(cluster)


def test_sharded_bytes_counts_a_replicated_leaf_whole():
    tree = {"a": np.zeros((8, 3), np.float32), "layers": {"b": np.zeros((4, 6), np.float32)}}
    # fsdp 2: "a" split on its 8 (12 floats per device), "b" on its 6, never its 4 layers
    assert rules.sharded_bytes(tree, 2) == 4 * (4 * 3 + 4 * 3)
    assert rules.sharded_bytes(tree, 3) == 4 * (8 * 1 + 4 * 2)
