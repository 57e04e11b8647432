"""The output folder of `lensllm run` as a store: the manifest of settings a resume must
match, and one .npz per finished candidate, each written atomically as it completes.

    manifest.json              the settings; a resume with other settings is refused
    candidates/NNN_<name>.npz  one per finished candidate (`result.CandidateResult`)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.data._files import write_atomic
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.runner.checks import MANIFEST, first_line
from lensllm_jax.runner.result import Candidate, CandidateResult

__all__ = [
    "LOSS_UNIT",
    "MANIFEST_VERSION",
    "canonical",
    "check_manifest",
    "json_default",
    "load_result",
    "result_path",
    "save_result",
    "settings_of",
]

MANIFEST_VERSION = 1
LOSS_UNIT = "nats_per_byte"


def canonical(obj: Any) -> Any:
    """JSON-normalised copy (tuples -> lists, numpy scalars -> Python) for comparisons."""
    return json.loads(json.dumps(obj, default=json_default, sort_keys=True))


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_manifest(out_dir: Path, settings: Mapping[str, Any]) -> bool:
    """True when `out_dir` holds a run with exactly these settings (resume); False when it
    holds none. A different run is a one-line `LensLLMInputError`."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LensLLMInputError(
            f"unreadable manifest ({first_line(err)})",
            file=path,
            hint="use a new --out-dir",
        ) from None
    new = canonical(settings)
    if old == new:
        return True
    diffs = _differences(old, new)
    where, before, after = diffs[0]
    more = sorted({d[0].split(".")[0].split("[")[0] for d in diffs[1:]} - {where.split(".")[0]})
    raise LensLLMInputError(
        f"holds a run with different settings ({where}: {_short(before)} there, "
        f"{_short(after)} now{'; also ' + ', '.join(more) if more else ''})",
        file=out_dir,
        hint="use a new --out-dir, or rerun with that run's settings to resume it",
    )


_ABSENT = object()


def _differences(old: Any, new: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(path, old, new) of every differing leaf of two JSON values, depth first."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            sub = f"{where}.{k}" if where else str(k)
            out += _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += _differences(a, b, f"{where}[{i}]")
        return out
    return [] if old == new else [(where or "manifest", old, new)]


def _short(value: Any, limit: int = 60) -> str:
    """Compact JSON of a setting; a list of named entries (candidates) shows the names."""
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        value = [v["name"] for v in value]
    text = "nothing" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "model"


def result_path(out_dir: Path, index: int, name: str) -> Path:
    return out_dir / "candidates" / f"{index:03d}_{_slug(name)}.npz"


def save_result(path: Path, res: CandidateResult) -> None:
    """Write one candidate's result as an .npz, atomically (whole or absent)."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **res.to_arrays())
    write_atomic(path, buf.getvalue())


def load_result(path: Path) -> CandidateResult | None:
    """The saved result, or None when the file is missing or unreadable (recompute)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return CandidateResult.from_arrays({k: z[k] for k in z.files})
    except (OSError, KeyError, ValueError, TypeError):
        return None


def settings_of(
    data_path: Path,
    num_examples: int,
    candidates: Sequence[Candidate],
    sizes: Sequence[int],
    test_size: int,
    probe_size: int,
    max_length: int,
    seed: int,
    config: Any,
    ntk: bool,
    hessian_probes: int,
) -> dict[str, Any]:
    """What the per-candidate results depend on (not the target or methods: those only
    change the ranking, which is recomputed on every run)."""
    cfg = config._asdict() if hasattr(config, "_asdict") else dict(config)
    return canonical(
        {
            "version": MANIFEST_VERSION,
            "data": {  # by content: a moved or renamed data file still resumes
                "sha256": _file_sha256(data_path),
                "examples": num_examples,
            },
            "candidates": [{"name": c.name, "location": c.location} for c in candidates],
            "sizes": list(sizes),
            "test_size": test_size,
            "probe_size": probe_size,
            "max_length": max_length,
            "seed": seed,
            "finetune": cfg,
            "loss_unit": LOSS_UNIT,
            "ntk": ntk,
            "hessian_probes": hessian_probes,
        }
    )
