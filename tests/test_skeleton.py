import numpy as np

import lensllm_jax
from lensllm_jax.data.curves import CurveTable


def test_version_and_table():
    assert lensllm_jax.__version__
    t = CurveTable(
        name="x",
        models=("a", "b"),
        sizes=np.array([200.0, 400.0]),
        losses=np.ones((2, 2)),
        zero_shot=np.ones(2),
        n_params=np.array([1.0, 2.0]),
        families=("f", "f"),
    )
    assert t.num_models == 2
