"""Many devices at the command line: `lensllm run`'s mesh and multi-process switches, and
`lensllm plan` (per-device memory from configs alone; the smallest mesh that fits).

    lensllm run ... --mesh data=2,fsdp=4
    lensllm run ... --distributed [--coordinator HOST:PORT --num-processes N --process-id I]
    lensllm plan gpt2-small smollm2-135m ./my-model --devices 8 [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "add_plan_parser",
    "add_run_switches",
    "native_stdout_to_stderr",
    "plan_text",
    "run_switches",
]


def add_run_switches(run: argparse.ArgumentParser) -> None:
    """--mesh and the --distributed group of `lensllm run`."""
    run.add_argument(
        "--mesh",
        metavar="LAYOUT",
        help="device layout, e.g. data=2,fsdp=4 (default: one device if there is one, else "
        "the smallest fsdp that fits); parameters and optimizer state split over fsdp, "
        "examples over data",
    )
    group = run.add_argument_group("many processes (JAX's distributed runtime)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="run as one of several processes (hosts); every process runs the same command, "
        "process 0 alone writes. Without the three values below JAX detects them (Slurm, "
        "Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS)",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def run_switches(args: argparse.Namespace) -> dict[str, Any]:
    """`job.run` keywords from the switches; values without --distributed are an error."""
    from lensllm_jax.runner.distributed import Cluster

    values = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed:
        if any(v is not None for v in values):
            raise LensLLMInputError(
                "--coordinator, --num-processes and --process-id need --distributed",
                hint="add --distributed",
            )
        return {"mesh": args.mesh, "distributed": False}
    return {"mesh": args.mesh, "distributed": Cluster(*values)}


@contextlib.contextmanager
def native_stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Send what native code prints on file descriptor 1 to stderr while the block runs.
    JAX's CPU collectives (gloo) print a line per connection there, which would mix with
    the ranking a distributed run writes to stdout."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def add_plan_parser(sub: Any) -> None:
    """`lensllm plan`: per-device memory of the run's programs from configs alone."""
    from lensllm_jax.parallel.presets import PRESETS

    plan = sub.add_parser(
        "plan",
        help="per-device memory of fine-tuning, NTK and Hessian, and the smallest mesh",
        description=(
            "From configs alone (no weights): the per-device memory of lensllm run's "
            "fine-tuning step, NTK and Hessian trace for each candidate on 1 and --devices "
            "devices, and the fewest devices that fit --device-memory. Candidates are "
            f"checkpoints (only their config is read) or presets: {', '.join(PRESETS)}."
        ),
    )
    plan.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints or presets")
    plan.add_argument("--devices", type=int, default=8, metavar="N", help="largest mesh (8)")
    plan.add_argument(
        "--device-memory",
        default="141GB",
        metavar="BYTES",
        help="memory of one device, e.g. 141GB (an H200, the default) or 80GiB",
    )
    plan.add_argument("--batch-size", type=int, default=8, metavar="N", help="as run (8)")
    plan.add_argument("--max-length", type=int, default=256, metavar="N", help="as run (256)")
    plan.add_argument("--probe-size", type=int, default=32, metavar="N", help="as run (32)")
    plan.add_argument(
        "--hessian", type=int, default=8, metavar="PROBES", help="Hessian probes, 0 = none (8)"
    )
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    plan.add_argument(
        "--compile",
        action="store_true",
        help="also compile the sharded programs for 1 and N (virtual CPU) devices and report "
        "XLA's memory analysis beside the estimate (slow for large models)",
    )
    plan.add_argument("--format", choices=("table", "json"), default="table")
    plan.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")
    plan.set_defaults(handler=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from lensllm_jax.cli._output import check_out, emit
    from lensllm_jax.core.ntk import parse_bytes
    from lensllm_jax.errors import NTKError

    out = check_out(args.out)
    try:
        device_bytes = parse_bytes(str(args.device_memory), "--device-memory")
    except NTKError as err:
        raise LensLLMInputError(str(err)) from None
    for flag in ("devices", "batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise LensLLMInputError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.compile:
        _virtual_cpus(args.devices)
    from lensllm_jax.parallel import plan

    work = plan.Workload(
        args.batch_size, args.max_length, max(args.probe_size, 0), max(args.hessian, 0), args.dtype
    )
    report = [
        plan_model(name, args.devices, device_bytes, work, compile_too=args.compile)
        for name in args.models
    ]
    if args.format == "json":
        return emit(json.dumps(report, indent=1) + "\n", out)
    return emit(plan_text(report, device_bytes), out)


def _virtual_cpus(n: int) -> None:
    """Ask for n CPU devices to compile meshes on (only possible before JAX starts)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend already started: use the devices there are
        pass


def plan_model(
    name: str, devices: int, device_bytes: int, work: Any, *, compile_too: bool
) -> dict[str, Any]:
    """One candidate's plan: parameters, per-program bytes on 1 and `devices` devices (all
    on fsdp), with XLA's figures when `compile_too`, and the smallest fitting mesh."""
    import jax

    from lensllm_jax.errors import ModelLoadError
    from lensllm_jax.parallel import plan
    from lensllm_jax.runner import finetune

    def recipe(apply: Any) -> tuple[Any, ...]:  # the run's default fine-tuning step
        return finetune.train_fns(apply, finetune.FinetuneConfig(batch_size=work.batch_size))

    try:
        cfg = plan.model_config(name)
    except ModelLoadError as err:
        raise LensLLMInputError(str(err).splitlines()[0]) from None
    shapes = plan.param_shapes(cfg, work.dtype)
    n_params = sum(int(x.size) for x in jax.tree.leaves(shapes))
    rows = []
    for n in sorted({1, devices}):
        est = plan.estimate(cfg, 1, n, work, device_bytes)
        row: dict[str, Any] = {
            "devices": n,
            "mesh": f"data=1,fsdp={n}",
            "estimate": {k: v["total"] for k, v in est.items()},
            "parts": est,
        }
        if compile_too:
            if len(jax.devices("cpu")) >= n:
                row["compiled"] = plan.compiled(cfg, 1, n, work, train_fns=recipe, backend="cpu")
            else:
                row["compiled"] = None  # not enough devices to compile this mesh
        row["fits"] = max(row["estimate"].values()) <= 0.9 * device_bytes
        rows.append(row)
    smallest = plan.smallest_mesh(cfg, devices, device_bytes, work)
    return {
        "model": name,
        "params": n_params,
        "rows": rows,
        "smallest_mesh": None if smallest is None else f"data={smallest[0]},fsdp={smallest[1]}",
        "smallest_devices": None if smallest is None else smallest[0] * smallest[1],
    }


def plan_text(report: list[dict[str, Any]], device_bytes: int) -> str:
    """The plan as a plain table: GiB per device, the estimate and XLA's figure after a "/"
    when compiled; each model followed by the smallest mesh that fits."""
    head = ["model", "params", "devices", "fine-tune", "NTK", "Hessian", "fits"]
    rows: list[list[str] | str] = []
    for entry in report:
        for i, row in enumerate(entry["rows"]):
            cells = [entry["model"] if i == 0 else "", _count(entry["params"]) if i == 0 else ""]
            cells.append(str(row["devices"]))
            for prog in ("finetune", "ntk", "hessian"):
                est = row["estimate"].get(prog)
                comp = (row.get("compiled") or {}).get(prog)
                text = "-" if est is None else f"{est / 2**30:.1f}"
                cells.append(text if comp is None else f"{text} / {comp / 2**30:.1f}")
            cells.append("yes" if row["fits"] else "no")
            rows.append(cells)
        rows.append(
            f"  smallest mesh that fits: {entry['smallest_mesh'] or 'none up to the devices'}"
        )
    table = [head, *[r for r in rows if isinstance(r, list)]]
    widths = [max(len(r[j]) for r in table) for j in range(len(head))]
    xla = " / XLA's memory analysis" if _any_compiled(report) else ""
    out = [f"per-device GiB (estimate{xla}); device {device_bytes / 1e9:g} GB, 90 % usable"]
    for r in [head, *rows]:
        if isinstance(r, str):
            out.append(r)
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out) + "\n"


def _any_compiled(report: list[dict[str, Any]]) -> bool:
    return any(row.get("compiled") for e in report for row in e["rows"])


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
