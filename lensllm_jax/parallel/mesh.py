"""The device mesh: two named axes, ``data`` (replicas that see different examples) and
``fsdp`` (devices that share one copy of the parameters, each holding a slice).

    mesh = make_mesh("data=2,fsdp=4")        # 8 devices: 2 replicas x 4 parameter shards
    mesh = make_mesh({"fsdp": 8})            # the missing axis takes the remaining devices
    mesh = make_mesh(None)                   # every device on `data` (parameters replicated)

Devices are laid out row-major from ``jax.devices()`` (process by process, so with one
process per host the ``fsdp`` axis stays inside a host, where links are fastest, and
``data`` crosses hosts). A layout that does not multiply to the device count is a one-line
`LensLLMInputError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from lensllm_jax.errors import LensLLMInputError

__all__ = ["AXES", "DATA", "FSDP", "make_mesh", "mesh_shape", "parse_mesh"]

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
MeshSpec = str | Mapping[str, int] | Mesh | None


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> {"data": 2, "fsdp": 4}. Axes are `data` and `fsdp`, each at
    most once, sizes positive integers; either may be left out (`make_mesh` fills it in)."""
    out: dict[str, int] = {}
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not m or m.group(1) not in AXES or m.group(1) in out or int(m.group(2)) < 1:
            raise LensLLMInputError(
                f"mesh {text!r}: cannot read {part!r}",
                hint="write it as data=N,fsdp=M with positive sizes (e.g. data=2,fsdp=4)",
            )
        out[m.group(1)] = int(m.group(2))
    if not out:
        raise LensLLMInputError(f"mesh {text!r} is empty", hint="write e.g. data=2,fsdp=4")
    return out


def mesh_shape(spec: str | Mapping[str, int] | None, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices` devices: the given sizes, the missing one
    num_devices / the given one; None = (num_devices, 1). Raises `LensLLMInputError` when the
    sizes do not multiply to num_devices."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec or {DATA: num_devices})
    if DATA not in sizes and FSDP not in sizes:
        raise LensLLMInputError(f"mesh {spec!r} names neither 'data' nor 'fsdp'")
    given = int(np.prod(list(sizes.values())))
    if num_devices % given:
        raise LensLLMInputError(
            f"mesh {_text(sizes)} needs a multiple of {given} devices, {num_devices} are here",
            hint=f"choose sizes whose product is {num_devices}",
        )
    data = sizes.get(DATA, num_devices // given if FSDP in sizes else 1)
    fsdp = sizes.get(FSDP, num_devices // data)
    if data * fsdp != num_devices:
        raise LensLLMInputError(
            f"mesh {_text(sizes)} has {data * fsdp} devices, {num_devices} are here",
            hint=f"choose sizes whose product is {num_devices}",
        )
    return int(data), int(fsdp)


def _text(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(spec: MeshSpec = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes ("data", "fsdp") over `devices` (default: all
    devices of every process, `jax.devices()`). `spec`: a Mesh (returned as is), a string
    or dict of axis sizes (see `mesh_shape`), or None (all devices on `data`)."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise LensLLMInputError(
                f"mesh axes {tuple(spec.axis_names)} are not {AXES}",
                hint="build it with lensllm_jax.parallel.make_mesh",
            )
        return spec
    import jax

    devs = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(spec, len(devs))
    return Mesh(np.asarray(devs, dtype=object).reshape(data, fsdp), AXES)
