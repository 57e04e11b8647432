"""The output folder of `lensllm run` as a store: the manifest of settings a resume must
match, and one .npz per finished candidate, each written atomically as it completes.

    manifest.json              the settings; a resume with other settings is refused
    candidates/NNN_<name>.npz  one per finished candidate (`result.CandidateResult`)

Nothing is written until the first candidate's results are: then the folder, the manifest
and ``candidates/`` are created (`start`), in that order, so a run stopped before has
written nothing, and one stopped between leaves what `checks.is_leftover` recovers. A saved
result is reused only when it is whole, of this candidate (name, location, sizes) and of
the same files (`Candidate.digest`); otherwise it is measured again (`stale_reason`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.data._files import load_json, open_regular, read_regular, write_atomic
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.runner.checks import MANIFEST, is_leftover
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
    "stale_reason",
    "start",
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


MAX_MANIFEST = 16 << 20
MAX_RESULT = 4 << 30


def _file_sha256(path: Path) -> str:
    fd, _ = open_regular(path, what="data file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    finally:
        os.close(fd)


def check_manifest(out_dir: Path, settings: Mapping[str, Any]) -> bool:
    """True when `out_dir` holds a run with exactly these settings (resume); False when it
    holds none. A different run, or a manifest that is not a bounded JSON file, is a
    one-line `LensLLMInputError`."""
    path = out_dir / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return False
    try:
        raw = read_regular(path, limit=MAX_MANIFEST, what="manifest")
        old = load_json(raw, where=path, what="manifest")
    except LensLLMInputError as err:
        raise LensLLMInputError(
            f"unreadable manifest ({err.what})", file=path, hint="use a new --out-dir"
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


def start(out_dir: Path, settings: Mapping[str, Any], resuming: bool) -> None:
    """Make `out_dir` a run's folder: create it, write the manifest (unless resuming),
    create ``candidates/``; and remove what a killed run left (`checks.is_leftover` temp
    files). Called right before the first result is saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / "candidates"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and not p.is_symlink() and is_leftover(p):
                    p.unlink(missing_ok=True)
    if not resuming:
        text = json.dumps(canonical(settings), indent=1, sort_keys=True) + "\n"
        write_atomic(out_dir / MANIFEST, text)
    (out_dir / "candidates").mkdir(exist_ok=True)


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
    """The saved result, or None when the file is missing, not a regular file, or not a
    whole result (recompute). Reads at most its real size (bounded)."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        raw = read_regular(path, limit=MAX_RESULT, what="result")
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return CandidateResult.from_arrays({k: z[k] for k in z.files})
    except Exception:  # any undecodable file (zip, npy, field types) means: measure again
        return None


def stale_reason(res: CandidateResult | None, cand: Candidate, sizes: Sequence[int]) -> str | None:
    """Why a saved result cannot stand for `cand` now (None: reuse it)."""
    if res is None:
        return "no saved result"
    if res.name != cand.name or res.path != cand.location:
        return "the saved result is another candidate's"
    n = len(sizes)
    shapes_ok = (
        list(np.asarray(res.sizes).ravel()) == [float(s) for s in sizes]
        and all(np.shape(a) == (n,) for a in (res.losses, res.loss_se, res.num_steps))
        and len(res.status) == n
    )
    if not shapes_ok:
        return "the saved result is damaged"
    if not res.digest:
        return "the saved result predates content digests"
    if res.digest != cand.digest:
        return "its files changed since the earlier run (content digest differs)"
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
