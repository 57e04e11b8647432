"""The sharded programs on 8 forced host devices equal the one-device ones (f32, <= 1e-5
relative), and the parameters really are split: each device's block shape is checked.

Everything runs in one child process per task (`parallel_worker.py`; XLA_FLAGS set only
there), on a ("data", "fsdp") = (2, 4) mesh, against the unsharded core functions.
"""

from __future__ import annotations

import numpy as np
import pytest
from parallel_tools import run_worker
from session_tools import shared_dir

pytestmark = pytest.mark.slow  # a child process that compiles every program twice
RTOL = 1e-5


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The child's results, once per session (a worker that gets some of these tests while
    the other worker has the rest reads the same file instead of compiling all again)."""
    with shared_dir(tmp_path_factory, "parallel_programs") as root:
        dest = root / "out.npz"
        if dest.exists():
            return dict(np.load(dest))
        res = run_worker("programs", root / "partial.npz", "data=2,fsdp=4")
        (root / "partial.npz").rename(dest)  # only a child that succeeded is reused
        return res


def _close(a, b, rtol=RTOL):
    """max |a - b| <= rtol · max |a| (relative to the array's scale, as f32 round-off is)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(a)), 1e-30), np.max(np.abs(a - b))


def _leaves(res, prefix):
    return {k[len(prefix) :]: v for k, v in res.items() if k.startswith(prefix)}


# The tiny Llama (hidden 32, 4 heads of 8, 2 kv heads, MLP 48, vocab 64, 2 layers) on fsdp=4:
# every leaf split on its largest dimension divisible by 4, never the layer axis.
EXPECTED_BLOCKS = {
    "['embed']['embedding']": (16, 32),  # (64, 32): vocab
    "['layers']['q']['kernel']": (2, 8, 32),  # (2, 32, 32): tie -> the earlier axis
    "['layers']['k']['kernel']": (2, 8, 16),  # (2, 32, 16)
    "['layers']['v']['kernel']": (2, 8, 16),
    "['layers']['o']['kernel']": (2, 8, 32),
    "['layers']['gate']['kernel']": (2, 32, 12),  # (2, 32, 48): the MLP axis
    "['layers']['up']['kernel']": (2, 32, 12),
    "['layers']['down']['kernel']": (2, 12, 32),
    "['layers']['input_norm']['scale']": (2, 8),  # (2, 32): not the layer axis
    "['layers']['post_norm']['scale']": (2, 8),
    "['norm']['scale']": (8,),
    "['lm_head']['kernel']": (32, 16),
}


def test_parameters_and_adam_moments_are_split_on_every_device(programs):
    for prefix in ("params_shard", "step_params_shard", "adam_mu_shard"):
        got = {k: tuple(int(x) for x in v) for k, v in _leaves(programs, prefix).items()}
        assert got == EXPECTED_BLOCKS, prefix


def test_sharded_fine_tuning_steps_equal_one_device(programs):
    _close(programs["step_loss_1"], programs["step_loss_8"])
    one, eight = _leaves(programs, "step_params_1"), _leaves(programs, "step_params_8")
    assert one.keys() == eight.keys() and len(one) == len(EXPECTED_BLOCKS)
    for k in one:
        _close(one[k], eight[k])
    # and the steps did move the parameters (the comparison is not of untouched values)
    assert programs["step_loss_1"][2] < programs["step_loss_1"][0]


def test_sharded_evaluation_equals_one_device(programs):
    _close(programs["eval_1"], programs["eval_8"])


def test_sharded_ntk_equals_the_core_kernel(programs):
    ref = programs["ntk_1"]
    assert ref.shape == (13, 13) and np.all(np.linalg.eigvalsh(ref) > -1e-6 * ref.max())
    _close(ref, programs["ntk_8"])
    _close(ref, programs["ntk_8_blocks"])  # 13 examples in blocks of 4: padded, 4 blocks
    _close(programs["residual_1"], programs["residual_8"])


def test_sharded_hutchinson_uses_the_same_probes_and_equals_the_core(programs):
    s1, s8 = programs["hutch_samples_1"], programs["hutch_samples_8"]
    assert s1.shape == s8.shape == (5,)
    _close(s1, s8)
    _close(programs["hutch_1"], programs["hutch_8"])
    _close(programs["hutch_groups_1"], programs["hutch_groups_8"])
    _close(programs["vhv"][:1], programs["vhv"][1:])


def test_law_fitter_with_candidates_over_devices_equals_one_device(programs):
    np.testing.assert_array_equal(programs["fit_status_1"], programs["fit_status_8"])
    assert (programs["fit_status_1"] <= 1).all()
    _close(programs["fit_raw_1"], programs["fit_raw_8"], rtol=1e-9)  # float64


def test_loading_into_shards_keeps_one_tensor_on_the_host(tmp_path):
    res = run_worker("loading", tmp_path / "out.npz", "data=2,fsdp=4", str(tmp_path / "ckpt"))
    plain, sharded = _leaves(res, "load_plain"), _leaves(res, "load_sharded")
    assert plain.keys() == sharded.keys()
    for k in plain:
        np.testing.assert_array_equal(plain[k], sharded[k])
    blocks = {k: tuple(int(x) for x in v) for k, v in _leaves(res, "load_blocks").items()}
    assert blocks["['embed']['embedding']"] == (128, 64)  # (512, 64) over fsdp=4
    assert blocks["['layers']['up']['kernel']"] == (8, 64, 64)  # (8, 64, 256)
    rule = _leaves(res, "load_rule")  # every leaf carries the rule's NamedSharding
    assert rule.keys() == plain.keys() and all(int(v) == 1 for v in rule.values()), rule
    total, peak_plain, peak_sharded = res["host_peak"]
    largest_tensor = 512 * 64 * 4  # the embedding; one layer's MLP matrix is half of it
    largest_leaf = 8 * 64 * 256 * 4  # a stacked MLP matrix: 8 layers
    # Without a mesh the host stacks whole leaves (8 layers) before moving them; with one it
    # holds one tensor and the copies of its per-device slices (2 replicas: 2x), no more.
    assert total == 2_232_576 and peak_plain >= largest_leaf
    assert peak_sharded <= 3 * largest_tensor < largest_leaf, (peak_sharded, peak_plain)


def test_gguf_loads_into_shards(tmp_path, smollm2_gguf):
    res = run_worker("gguf", tmp_path / "out.npz", "data=1,fsdp=8", str(smollm2_gguf))
    plain, sharded = _leaves(res, "gguf_plain"), _leaves(res, "gguf_sharded")
    for k in plain:
        np.testing.assert_array_equal(plain[k], sharded[k])
    blocks = {k: tuple(int(x) for x in v) for k, v in _leaves(res, "gguf_blocks").items()}
    assert blocks["['embed']['embedding']"] == (49152 // 8, 576)
    assert blocks["['layers']['gate']['kernel']"] == (30, 576, 1536 // 8)
    rule = _leaves(res, "gguf_rule")
    assert rule.keys() == plain.keys() and all(int(v) == 1 for v in rule.values()), rule
