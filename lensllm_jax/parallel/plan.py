"""Planning from configs alone: per-device memory of `lensllm run`'s three sharded programs
(the fine-tuning step, the NTK, the Hutchinson trace) on a mesh, and the smallest mesh
that fits. No weights are read: shapes come from `jax.eval_shape` of the family's init.

Two figures per program:

* `estimate` (the model, instant): the states laid out by `rules` (exact bytes per device)
  plus an activation term (approximate). Fine-tuning holds the pretrained and the working
  parameters, two Adam moments and a gradient, each split over ``fsdp``; the batch's
  examples are split as `rules.batch_spec`. The NTK holds the parameters and three Jacobian
  pieces of c/D examples x P/F entries (`parallel.ntk`), c chosen as the run chooses it
  (half the memory left beside the parameters); the Hutchinson trace holds two parameter
  sets (pretrained and fine-tuned), a probe and an HVP's tangents, and four times the probe
  batch's activations (the linearised gradient keeps the forward's and the backward's
  intermediates; the tangent pass runs through both again).
  Activations per example and layer ≈ T·(8H + 2(h + 2k)d + 4I + 2hT) values (residual
  stream, norms, q/k/v, attention scores and probabilities, MLP), plus 3·T·V for the logits.
* `compiled` (the check): XLA's own buffer assignment of the very programs the run
  executes (`jit(...).lower(shapes).compile().memory_analysis()`: arguments + outputs −
  donated + temporaries), compiled for a mesh of that many devices of the given backend
  (on a CPU, `jax_num_cpu_devices` virtual devices: the same partitioning, XLA:CPU's
  fusion and buffer reuse, so temporaries differ from a GPU's).

Cost: `estimate` is arithmetic on shapes; `compiled` compiles three programs per model and
mesh (seconds for small models, minutes for 8B on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lensllm_jax.core.ntk import auto_chunk_size
from lensllm_jax.parallel.rules import sharded_bytes

__all__ = [
    "Workload",
    "auto_layout",
    "compiled",
    "device_memory",
    "estimate",
    "model_config",
    "param_shapes",
    "smallest_mesh",
]

PROGRAMS = ("finetune", "ntk", "hessian")
H200_BYTES = 141 * 10**9  # an H200's HBM3e


class Workload(NamedTuple):
    """The run being planned (defaults: `lensllm run`'s)."""

    batch_size: int = 8
    max_length: int = 256
    probe_size: int = 32
    hessian_probes: int = 8
    dtype: str = "float32"


RUN_DEFAULTS = Workload()


def model_config(name_or_path: str | Mapping[str, Any]) -> Any:
    """An `LMConfig` from a preset name (`presets.PRESETS`), a config.json dict, or a
    checkpoint (HF folder, .gguf, cached repo id: only its config is read)."""
    from lensllm_jax.models.config import LMConfig, config_from_hf
    from lensllm_jax.parallel.presets import preset_config

    if isinstance(name_or_path, LMConfig):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return config_from_hf(name_or_path)
    preset = preset_config(str(name_or_path))
    if preset is not None:
        return config_from_hf(preset, where=str(name_or_path))
    from lensllm_jax import models

    return models.inspect(name_or_path).config


def param_shapes(cfg: Any, dtype: Any = "float32") -> Any:
    """The params pytree of `cfg` as ShapeDtypeStructs (no memory is allocated)."""
    from lensllm_jax.models.loading import family_module

    fam = family_module(cfg)
    return jax.eval_shape(lambda: fam.init_params(cfg, jax.random.key(0), np.dtype(dtype)))


def _per_device_examples(n: int, data: int, fsdp: int) -> int:
    if n % (data * fsdp) == 0:
        return n // (data * fsdp)
    return n // data if n % data == 0 else n


def _activation_bytes(cfg: Any, examples: int, seq: int, itemsize: int) -> int:
    h, i, nh, kv, hd = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    per_layer = seq * (8 * h + 2 * (nh + 2 * kv) * hd + 4 * i) * itemsize + 2 * nh * seq * seq * 4
    logits = 3 * seq * cfg.vocab_size * 4
    return int(examples) * (cfg.num_layers * per_layer + logits)


def _layer_bytes(shapes: Any, itemsize: int) -> int:
    """One layer's weights, whole (what an FSDP step gathers at a time)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [getattr(k, "key", None) for k in path]
        size = int(np.prod(leaf.shape, dtype=np.int64))
        total += size // leaf.shape[0] if keys[:1] == ["layers"] else 0
    return total * itemsize


def ntk_chunk(shapes: Any, n: int, data: int, fsdp: int, device_bytes: int, itemsize: int) -> int:
    """Examples per NTK block per replica as the run picks it: three c x P/F pieces in half
    of the memory left beside the parameters (`parallel.ntk.chunk_for_mesh`)."""
    del itemsize  # the shapes carry the dtype
    p_dev = sharded_bytes(shapes, fsdp)
    budget = max(1, (device_bytes - p_dev) // 2)
    per = max(1, -(-3 * p_dev // 2))
    return auto_chunk_size(-(-n // data), per, budget)


def estimate(
    cfg: Any, data: int, fsdp: int, work: Workload = RUN_DEFAULTS, device_bytes: int = H200_BYTES
) -> dict[str, dict[str, int]]:
    """Per-device bytes of each program on a (data, fsdp) mesh, with their parts."""
    item = np.dtype(work.dtype).itemsize
    shapes = param_shapes(cfg, work.dtype)
    p = sharded_bytes(shapes, fsdp)
    t = work.max_length
    b = _per_device_examples(work.batch_size, data, fsdp)
    ft = {
        "params (pretrained + working)": 2 * p,
        "adam moments": 2 * p,
        "gradient": p,
        "gathered layer": _layer_bytes(shapes, item),
        "activations": _activation_bytes(cfg, b, t, item),
    }
    out = {"finetune": ft}
    if work.probe_size:
        c = ntk_chunk(shapes, work.probe_size, data, fsdp, device_bytes, item)
        out["ntk"] = {
            "params": p,
            "jacobian pieces": 3 * c * p,
            "activations": _activation_bytes(cfg, c, t, item),
        }
    if work.hessian_probes:
        n = work.probe_size or 1
        hess_examples = n // fsdp if n % fsdp == 0 else n  # `parallel.hessian` splits them
        out["hessian"] = {
            "params (pretrained + fine-tuned)": 2 * p,
            "probe, gradient, tangents": 4 * p,
            "activations": 4 * _activation_bytes(cfg, hess_examples, t, item),
        }
    for parts in out.values():
        parts["total"] = sum(parts.values())
    return out


def _memory(compiled_program: Any) -> int:
    m = compiled_program.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def compiled(
    cfg: Any,
    data: int,
    fsdp: int,
    work: Workload = RUN_DEFAULTS,
    *,
    train_fns: Callable[[Any], tuple[Callable, Callable]],
    backend: str | None = None,
) -> dict[str, int]:
    """Per-device bytes XLA assigns to the run's sharded programs for this model on a
    (data, fsdp) mesh of `backend`'s devices (default backend if None; a CPU can have
    `jax_num_cpu_devices` of them). `train_fns(apply) -> (init_fn, step_fn)` is the
    recipe's pure fine-tuning step (`runner.finetune.train_fns` with the run's config).
    Adds what the run holds outside each program: the pretrained params beside the
    fine-tuning step, a second Jacobian block beside the NTK block program, the other
    parameter set beside the Hessian program."""
    from lensllm_jax.models.lm_probe import mean_probe_loss_fn, probe_loss_fn
    from lensllm_jax.models.loading import _make_apply
    from lensllm_jax.parallel import hessian as ph
    from lensllm_jax.parallel import ntk as pntk
    from lensllm_jax.parallel import programs
    from lensllm_jax.parallel.mesh import make_mesh

    devices = jax.devices(backend)[: data * fsdp]
    mesh = make_mesh({"data": data, "fsdp": fsdp}, devices)
    apply = _make_apply(cfg, True, False)
    shapes = param_shapes(cfg, work.dtype)
    sig = programs.signature(shapes)
    p = sharded_bytes(shapes, fsdp)
    t = work.max_length
    i32, f32 = np.dtype("int32"), np.dtype("float32")

    def tokens(n: int) -> Any:
        return jax.ShapeDtypeStruct((n, t), i32)

    init_fn, step_fn = train_fns(apply)
    _, step, _, _ = programs._train_programs(init_fn, step_fn, mesh, sig, work.batch_size)
    opt = jax.eval_shape(init_fn, shapes)
    lr = jax.ShapeDtypeStruct((), f32)
    b = work.batch_size
    out = {
        "finetune": _memory(step.lower(shapes, opt, tokens(b), tokens(b), tokens(b), lr).compile())
        + p
    }

    def probe(n: int) -> dict[str, Any]:
        return {
            "tokens": tokens(n),
            "loss_mask": tokens(n),
            "attention_mask": tokens(n),
            "nats_per_byte": jax.ShapeDtypeStruct((n,), f32),
        }

    if work.probe_size:
        item = np.dtype(work.dtype).itemsize
        dev_bytes = device_memory(devices[0]) or H200_BYTES
        c = ntk_chunk(shapes, work.probe_size, data, fsdp, dev_bytes, item) * data
        block = programs.signature(probe(c))
        jac, gram, _ = pntk._programs(probe_loss_fn(apply), mesh, sig, block, None)
        jac_c = jac.lower(shapes, probe(c)).compile()
        j_shapes = jax.eval_shape(jac, shapes, probe(c))
        j_dev = p * (c // data)
        gram_c = gram.lower(j_shapes, j_shapes).compile()
        out["ntk"] = max(_memory(jac_c) + j_dev, _memory(gram_c) + p)
    if work.hessian_probes:
        k = work.hessian_probes + (-work.hessian_probes % data)
        options = ("rademacher", "top", None, None, True)
        batch = probe(work.probe_size or 1)
        batch_sh = ph._batch_sharding(mesh, batch)
        prog = ph._hutchinson_program(mean_probe_loss_fn(apply), mesh, sig, options, batch_sh)
        keys = jax.ShapeDtypeStruct((k, 2), np.dtype("uint32"))
        out["hessian"] = _memory(prog.lower(shapes, batch, keys).compile()) + p
    return out


def device_memory(device: Any = None) -> int | None:
    """Bytes of one device (its allocator's limit), None when it does not say (CPU)."""
    dev = device if device is not None else jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # backends without allocator statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _layouts(num_devices: int) -> list[tuple[int, int]]:
    """(data, fsdp) with data x fsdp = num_devices, smallest fsdp first."""
    return [(num_devices // f, f) for f in range(1, num_devices + 1) if num_devices % f == 0]


def _peak(cfg: Any, data: int, fsdp: int, work: Workload, device_bytes: int) -> int:
    return max(v["total"] for v in estimate(cfg, data, fsdp, work, device_bytes).values())


def smallest_mesh(
    cfg: Any,
    max_devices: int,
    device_bytes: int = H200_BYTES,
    work: Workload = RUN_DEFAULTS,
    usable: float = 0.9,
) -> tuple[int, int] | None:
    """The fewest devices (1, 2, 4, ... up to max_devices) on which the estimate of every
    program fits `usable` of a device, as (data, fsdp) = (1, n): all of them on fsdp, the
    layout that needs the least memory per device. None when none fits."""
    n = 1
    while n <= max_devices:
        if _peak(cfg, 1, n, work, device_bytes) <= usable * device_bytes:
            return 1, n
        n *= 2
    return None


def auto_layout(
    candidates: Sequence[Any],
    num_devices: int,
    *,
    batch_size: int,
    max_length: int,
    probe_size: int,
    hessian_probes: int,
    device_bytes: int | None = None,
    usable: float = 0.9,
) -> dict[str, int]:
    """The default mesh of `lensllm run` on `num_devices` devices: the smallest fsdp whose
    estimated peak fits every candidate (the rest of the devices on data, for speed);
    without a known device memory (CPU), every device on data. If nothing fits, all on
    fsdp. `candidates`: configs, presets or checkpoint paths."""
    device_bytes = device_bytes if device_bytes is not None else device_memory()
    if device_bytes is None:
        return {"data": num_devices, "fsdp": 1}
    work = Workload(batch_size, max_length, probe_size, hessian_probes)
    cfgs = [model_config(c) for c in candidates]
    for data, fsdp in _layouts(num_devices):
        if all(_peak(c, data, fsdp, work, device_bytes) <= usable * device_bytes for c in cfgs):
            return {"data": data, "fsdp": fsdp}
    return {"data": 1, "fsdp": num_devices}


def gib(n: float) -> float:
    """Bytes in GiB, for tables."""
    return n / 2**30 if math.isfinite(n) else n
