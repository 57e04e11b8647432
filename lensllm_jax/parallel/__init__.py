"""Scale past one device with JAX's own SPMD machinery: a ("data", "fsdp") device mesh,
sharding rules for the model zoo, and sharded versions of `lensllm run`'s programs.

    mesh = parallel.make_mesh("data=2,fsdp=4")
    m = models.load(path, mesh=mesh)                        # each tensor onto its shards
    curve = finetune.loss_curve(m.apply, m.params, ..., mesh=mesh)   # FSDP + data parallel
    theta = parallel.ntk.loss_gradient_kernel(loss, m.params, batch, mesh)
    est = parallel.hessian.hutchinson_trace(loss, m.params, key, 8, mesh, batch=batch)
    res = parallel.fit.fit_law("rectified", d, losses, mesh)

Modules: `mesh` (the mesh), `rules` (what lies where), `programs` (fine-tuning step and
evaluation), `ntk`, `hessian`, `fit` (candidates over devices), `loading` (into shards),
`plan` (per-device memory from configs; the smallest mesh that fits), `presets` (public
model shapes). Multi-host runs start JAX's distributed runtime in `runner.distributed`.
Nothing here is a scheduler: every program is one `jax.jit` with NamedSharding in/out
shardings, with `shard_map` where a reduction is explicit.
"""

from lensllm_jax.parallel import fit, hessian, loading, ntk, plan, presets, programs, rules
from lensllm_jax.parallel.mesh import AXES, DATA, FSDP, make_mesh, mesh_shape, parse_mesh
from lensllm_jax.parallel.rules import param_shardings, shard_params

__all__ = [
    "AXES",
    "DATA",
    "FSDP",
    "fit",
    "hessian",
    "loading",
    "make_mesh",
    "mesh_shape",
    "ntk",
    "param_shardings",
    "parse_mesh",
    "plan",
    "presets",
    "programs",
    "rules",
    "shard_params",
]
