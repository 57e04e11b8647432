"""The end-to-end LENSLLM run for your own candidates: the job of `lensllm run`.

Data flows one way::

    files (models, task examples)
      -> per candidate: fine-tuning curve on nested subsets + NTK features on a probe set
      -> fits (every chosen selection method on the curves; LensLLM-NTK with F(Θ, t))
      -> ranking -> report

1. Check everything first (`check_candidates`, the data file, sizes, target, the output
   folder): a bad input is one `LensLLMInputError` line before any fine-tuning.
2. Split the examples once (`textdata.split_examples`): pool / test / probe, the same
   example indices for every candidate. The default target is the pool size.
3. Per candidate: load it, tokenize with its own tokenizer, fine-tune from the pretrained
   weights on each nested subset of the pool and evaluate on the test set
   (`finetune.loss_curve`, in nats per byte so that candidates with different tokenizers
   compare), then at the pretrained parameters on the probe set X (N examples):

       ℓ_i(θ)  = per-example loss in nats per byte (mean token NLL x tokens / bytes)
       Θ       = J Jᵀ,  J = ∂ℓ(X)/∂θ  (N x N, `ntk.loss_gradient_kernel`, chunked)
       r       = f0(X) − y = ℓ(X; θ0)  (the target of a loss is 0)
       F(Θ, t) = ‖exp(−ηΘt) r‖² = Σ_k exp(−2ηλ_k t) (u_kᵀ r)²,  η = the learning rate

   (`ntk.checked_features`), optionally a Hutchinson trace of the probe loss's Hessian.
   Each candidate's results are saved atomically as they complete, so an interrupted run
   resumes where it stopped.
4. Build the `CurveTable`, write it as ``curves.csv`` (``lensllm select`` re-ranks it),
   rank with the chosen methods (`ranking.rank`) plus LensLLM-NTK: the law
   L(D) = B/(F(Θ, t) + D^β) + E fitted (t, B, β, E) to the zero-shot point (D = 0) and the
   curve, scored by L(target). A failed fit ranks last with status "failed".

Output folder::

    manifest.json            the settings; a resume with other settings is refused
    candidates/NNN_<name>.npz one per finished candidate (curve, Θ, r, features, Hessian)
    curves.csv               the curve table (FTS layout)
    ranking.csv              method,rank,model,score,status
    report.json              settings, per-candidate curve and diagnostics, the ranking

Cost per candidate: the fine-tunes (Σ sizes x epochs examples, forward + backward), one
evaluation of the test set per size, one per-example-gradient pass over the probe set for
Θ (+ 2N²P for the Gram), O(N³) for its eigendecomposition, and 2-3 gradients per Hessian
probe. The fits are milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax._files import write_atomic
from lensllm_jax.curves import CurveTable, write_curve_table
from lensllm_jax.errors import CurveFitWarning, LensLLMInputError

__all__ = [
    "MANIFEST",
    "NTK_METHOD",
    "Candidate",
    "CandidateResult",
    "NTKStep",
    "RunResult",
    "check_candidates",
    "hessian_by_size",
    "hessian_distance_step",
    "hessian_step",
    "ntk_step",
    "probe_batch",
    "probe_loss_fn",
    "rank_ntk",
    "run",
]

NTK_METHOD = "LensLLM-NTK"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOSS_UNIT = "nats_per_byte"
MIN_SIZES = 3  # a law with 3-4 parameters needs at least 3 curve points


# ----------------------------------------------------------------------------- types


class Candidate(NamedTuple):
    """A checked candidate model, ready to load.

    name: unique display name (folder or file name; parent folders added when two clash).
    path: as the user gave it. location: the resolved file or folder that is loaded.
    model_type: from its config. vocab_size: rows of its embedding.
    tokenizer: its own tokenizer (transformers), loaded during the check.
    """

    name: str
    path: str
    location: str
    model_type: str
    vocab_size: int
    tokenizer: Any


class CandidateResult(NamedTuple):
    """Everything measured for one candidate (float64 numpy; saved as one .npz).

    sizes/losses/num_steps/status: the fine-tuning curve (test loss in nats per byte after
    fine-tuning on each nested subset; NaN and status "diverged" where it diverged).
    zero_shot: the test loss before fine-tuning. n_params: parameter count.
    theta (N, N), residual (N,), eigenvalues (N,), projected_residual (N,): the NTK step
    (empty arrays with --no-ntk). kernel_diagnostics: asymmetry, min eigenvalue, clipped
    mass (NaN without NTK). eta: the learning rate. hessian_trace/hessian_stderr: the
    Hutchinson trace of the probe loss's Hessian at the pretrained params, NaN when not
    measured. ft_hessian_trace/ft_hessian_stderr/ft_hessian_distance (S,): at the params
    fine-tuned on each size, the trace and the Hessian-weighted distance vᵀHv, v = θ_D − θ_0
    (the quantities of the Hessian PAC-Bayes account of the two phases); NaN when not
    measured. seconds: wall time of this candidate. loss_se (S,): standard error of each
    test loss over the test examples (written to curves.csv as se_<size> columns; it widens
    LensLLM's P(best) when the test set is small).
    """

    name: str
    path: str
    family: str
    n_params: int
    sizes: np.ndarray
    losses: np.ndarray
    zero_shot: float
    num_steps: np.ndarray
    status: tuple[str, ...]
    theta: np.ndarray
    residual: np.ndarray
    eigenvalues: np.ndarray
    projected_residual: np.ndarray
    kernel_diagnostics: np.ndarray
    eta: float
    hessian_trace: float
    hessian_stderr: float
    seconds: float
    ft_hessian_trace: np.ndarray
    ft_hessian_stderr: np.ndarray
    ft_hessian_distance: np.ndarray
    loss_se: np.ndarray

    @property
    def complete(self) -> bool:
        """Every curve point is a finite loss > 0 (none diverged)."""
        return all(s == "ok" for s in self.status) and bool(
            np.all(np.isfinite(self.losses) & (self.losses > 0)) and self.zero_shot > 0
        )

    @property
    def has_ntk(self) -> bool:
        return self.eigenvalues.size > 0


class NTKStep(NamedTuple):
    """The NTK step of one candidate: Θ (N, N), r (N,), its features and diagnostics."""

    theta: np.ndarray
    residual: np.ndarray
    features: Any  # ntk.NTKFeatures
    diagnostics: Any  # ntk.KernelDiagnostics


class RunResult(NamedTuple):
    """What `run` returns.

    table: the curve table of the candidates whose curves are complete (as in curves.csv).
    features: name -> ntk.NTKFeatures (float64), for candidates with NTK features.
    rows: the ranking (`ranking.RankRow`s), every method, rank 1 first.
    diagnostics: name -> `CandidateResult` (curve, kernel diagnostics, Hessian trace).
    target: the data size the ranking is for. out_dir: the output folder.
    resumed: names of the candidates read back from an earlier run, not recomputed.
    """

    table: CurveTable
    features: dict[str, Any]
    rows: list
    diagnostics: dict[str, CandidateResult]
    target: float
    out_dir: Path
    resumed: tuple[str, ...]


# ----------------------------------------------------------------------------- checks


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _inspect(path: str) -> tuple[str, str, int, Callable[[], Any] | None]:
    """(location, model_type, vocab_size, tokenizer loader or None) without reading weights
    (`models.inspect`). Raises `LensLLMInputError` (one line naming the candidate) for a
    missing path, a folder without config.json or weights, a config the model zoo cannot
    run, an unreadable GGUF file."""
    from lensllm_jax import models

    try:
        info = models.inspect(path)
    except (ValueError, OSError) as err:  # ModelLoadError / ModelConfigError / unreadable
        msg = _first_line(err)
        for prefix in (str(path), str(Path(path).expanduser())):
            if msg.startswith(prefix + ":"):
                msg = msg[len(prefix) + 1 :].strip()
        missing = not Path(path).expanduser().exists()
        hint = "give a Hugging Face model folder, a .gguf file or a cached repo id"
        raise LensLLMInputError(msg, file=path, hint=hint if missing else None) from None
    cfg = info.config
    return str(info.location.resolve()), cfg.model_type, cfg.vocab_size, info.tokenizer_loader


def _display(given: str, location: str) -> str:
    """A repo id as given; else the resolved path, without a .gguf suffix."""
    if not Path(given).expanduser().exists():
        return given  # a repo id from the local HF cache
    return location[: -len(".gguf")] if location.endswith(".gguf") else location


def _unique_names(paths: Sequence[str]) -> list[str]:
    """Display names: the last path part, with parent parts added until all are unique."""
    parts = [Path(os.path.normpath(str(p))).parts or (str(p),) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth, strict=True)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clash and depth[i] < len(parts[i]):
                depth[i] += 1
                grown = True
        if not grown:
            return names


def check_candidates(paths: Sequence[str]) -> list[Candidate]:
    """Check every candidate before any work: path, config, weights and tokenizer.

    Reads configs and tokenizers only (no weights). Raises `LensLLMInputError` (one line
    naming the candidate) for a missing path, an unsupported or broken config, missing
    weights, no tokenizer, or the same model given twice. Cost: one config and one
    tokenizer load per candidate.
    """
    if not paths:
        raise LensLLMInputError("no candidate models", hint="give --models PATH [PATH ...]")
    inspected = [(str(p), *_inspect(str(p))) for p in paths]
    seen: dict[str, str] = {}
    for given, location, *_ in inspected:
        if location in seen:
            raise LensLLMInputError(
                f"the same model as {seen[location]!r}",
                file=given,
                hint="give each candidate once",
            )
        seen[location] = given
    names = _unique_names([_display(given, loc) for given, loc, *_ in inspected])
    out = []
    for name, (given, location, model_type, vocab, loader) in zip(names, inspected, strict=True):
        if loader is None:
            raise LensLLMInputError(
                "has no tokenizer (tokenizer.json / tokenizer_config.json / vocab.json / "
                "tokenizer.model, or GGUF tokenizer metadata)",
                file=given,
                hint="save the model's tokenizer beside it: tokenizer.save_pretrained(PATH)",
            )
        try:
            tok = loader()
        except ModuleNotFoundError as err:
            raise LensLLMInputError(
                f"cannot load its tokenizer: {err.name} is not installed",
                file=given,
                hint="pip install 'lensllm-jax[run]'",
            ) from None
        except Exception as err:  # transformers raises many types for a broken tokenizer
            raise LensLLMInputError(
                f"cannot load its tokenizer ({type(err).__name__}: {_first_line(err)})",
                file=given,
                hint="check the tokenizer files, or save them again with save_pretrained",
            ) from None
        out.append(Candidate(name, given, location, model_type, int(vocab), tok))
    return out


def _check_sizes(sizes: Sequence[Any]) -> tuple[int, ...]:
    out = []
    for s in sizes:
        v = float(s)
        if not (math.isfinite(v) and v.is_integer() and v >= 1):
            raise LensLLMInputError(
                f"subset size {s!r} is not a whole number >= 1",
                hint="give --sizes as sample counts, e.g. --sizes 200 400 800 1600",
            )
        out.append(int(v))
    if len(set(out)) != len(out):
        raise LensLLMInputError(
            f"subset sizes {out} repeat a size", hint="give each --sizes value once"
        )
    if len(out) < MIN_SIZES:
        raise LensLLMInputError(
            f"{len(out)} subset sizes given, need at least {MIN_SIZES}",
            hint="give --sizes at least three sizes, e.g. --sizes 200 400 800 1600",
        )
    return tuple(sorted(out))


def _check_positive_int(value: Any, what: str, flag: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LensLLMInputError(
            f"{what} {value!r} must be a whole number >= {minimum}", hint=f"fix {flag}"
        )
    return int(value)


def _check_methods(methods: Sequence[str] | None, ntk: bool) -> tuple[list[str], bool]:
    """(curve methods for `ranking.rank`, whether LensLLM-NTK is ranked)."""
    from lensllm_jax import ranking
    from lensllm_jax.reproduce import resolve_methods

    chosen = list(ranking.DEFAULT_METHODS if methods is None else methods)
    want_ntk = ntk
    if NTK_METHOD in chosen:
        if not ntk:
            raise LensLLMInputError(
                f"method {NTK_METHOD!r} needs NTK features", hint="drop --no-ntk or the method"
            )
        chosen = [m for m in chosen if m != NTK_METHOD]
    resolve_methods(chosen)  # unknown names fail here, before any work
    return list(dict.fromkeys(chosen)), want_ntk


def _check_out_dir(out_dir: Path) -> None:
    """The folder is new, empty, or a previous run's (has a manifest); its parent writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LensLLMInputError(
            "exists and is not a folder", file=out_dir, hint="give --out-dir a new folder name"
        )
    if out_dir.is_dir():
        if not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
            raise LensLLMInputError(
                "is not empty and holds no lensllm run (no manifest.json)",
                file=out_dir,
                hint="give --out-dir a new or empty folder",
            )
        if not os.access(out_dir, os.W_OK):
            raise LensLLMInputError("folder is not writable", file=out_dir)
        return
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LensLLMInputError(
            f"cannot create it ({str(parent)!r} is not a writable folder)", file=out_dir
        )


# ----------------------------------------------------------------------------- files


def _canonical(obj: Any) -> Any:
    """JSON-normalised copy (tuples -> lists, numpy scalars -> Python) for comparisons."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


def _json_default(obj: Any) -> Any:
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


def _check_manifest(out_dir: Path, settings: Mapping[str, Any]) -> bool:
    """True when `out_dir` holds a run with exactly these settings (resume); False when it
    holds none. A different run is a one-line `LensLLMInputError`."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LensLLMInputError(
            f"unreadable manifest ({_first_line(err)})",
            file=path,
            hint="use a new --out-dir",
        ) from None
    new = _canonical(settings)
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


def _result_path(out_dir: Path, index: int, name: str) -> Path:
    return out_dir / "candidates" / f"{index:03d}_{_slug(name)}.npz"


_SCALARS = ("zero_shot", "eta", "hessian_trace", "hessian_stderr", "seconds")
_ARRAYS = (
    "sizes",
    "losses",
    "num_steps",
    "theta",
    "residual",
    "eigenvalues",
    "projected_residual",
    "kernel_diagnostics",
    "ft_hessian_trace",
    "ft_hessian_stderr",
    "ft_hessian_distance",
    "loss_se",
)


def _save_result(path: Path, res: CandidateResult) -> None:
    import io

    buf = io.BytesIO()
    arrays = {k: np.asarray(getattr(res, k)) for k in _ARRAYS}
    scalars = {k: np.float64(getattr(res, k)) for k in _SCALARS}
    np.savez(
        buf,
        name=np.str_(res.name),
        path=np.str_(res.path),
        family=np.str_(res.family),
        n_params=np.int64(res.n_params),
        status=np.asarray(res.status, dtype=str),
        **arrays,
        **scalars,
    )
    write_atomic(path, buf.getvalue())


def _load_result(path: Path) -> CandidateResult | None:
    """The saved result, or None when the file is missing or unreadable (recompute)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {
                "name": str(z["name"]),
                "path": str(z["path"]),
                "family": str(z["family"]),
                "n_params": int(z["n_params"]),
                "status": tuple(str(s) for s in z["status"]),
                **{k: np.asarray(z[k]) for k in _ARRAYS},
                **{k: float(z[k]) for k in _SCALARS},
            }
    except (OSError, KeyError, ValueError):
        return None
    return CandidateResult(**fields)


# ----------------------------------------------------------------------------- NTK step


def _token_fields(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(data.tokens, np.int32),
        np.asarray(data.loss_mask, np.int32),
        np.asarray(data.attention_mask, np.int32),
        np.asarray(data.target_bytes, np.int64),
    )


def probe_batch(data: Any) -> dict[str, np.ndarray]:
    """The probe batch for `probe_loss_fn` from a `textdata.TokenData`: tokens, loss_mask,
    attention_mask and ``nats_per_byte`` = target tokens / target bytes per example (the
    factor that turns a mean token NLL into nats per byte)."""
    tokens, loss_mask, attention_mask, target_bytes = _token_fields(data)
    n_target = loss_mask[:, 1:].sum(axis=1)  # position 0 is never a target
    scale = n_target / np.maximum(target_bytes, 1)
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "nats_per_byte": scale.astype(np.float32),
    }


@functools.lru_cache(maxsize=16)
def probe_loss_fn(apply: Callable[..., Any]) -> Callable[[Any, Mapping[str, Any]], Any]:
    """`(params, batch) -> (N,)` per-example loss in nats per byte:
    ℓ_i = (−Σ_t m_it log p(x_it | x_i,<t) / Σ_t m_it) · (Σ_t m_it / bytes_i). Pure, jittable;
    each example is processed independently (what the empirical NTK requires). One function
    object per `apply`, so programs compiled for it are shared by same-architecture models."""
    from lensllm_jax import models

    def loss(params: Any, batch: Mapping[str, Any]) -> Any:
        return models.per_example_loss(apply, params, batch) * batch["nats_per_byte"]

    return loss


def ntk_step(
    apply: Callable[..., Any],
    params: Any,
    batch: Mapping[str, np.ndarray],
    *,
    chunk_size: int | str | None = "auto",
    name: str | None = None,
) -> NTKStep:
    """Θ = J Jᵀ of the per-example probe loss ℓ(X) (`probe_loss_fn`), r = ℓ(X; θ0), and
    F's features (`ntk.checked_features`: eigh of Θ, Uᵀr, how much was symmetrised/clipped).

    Cost: about one per-example-gradient pass over the N probe examples, `chunk_size` at a
    time ("auto": as many as a memory budget allows; memory ≈ 2·chunk·P gradient entries),
    2N²P for the Gram, O(N³) for eigh.
    Raises `ntk.NTKError` for a non-finite kernel or residual.
    """
    import jax

    from lensllm_jax import ntk

    loss = probe_loss_fn(apply)
    theta = ntk.loss_gradient_kernel(loss, params, batch, chunk_size=chunk_size, name=name)
    residual = np.asarray(jax.jit(loss)(params, batch))
    feats, diag = ntk.checked_features(theta, residual, name=name)
    return NTKStep(np.asarray(theta), residual, feats, diag)


@functools.lru_cache(maxsize=16)
def _mean_probe_loss(apply: Callable[..., Any]) -> Callable:
    """(θ, batch) -> mean of the per-example probe losses, the scalar whose Hessian is
    measured; one function object per model, so the Hessian programs compile once per model
    (and batch shape) however many fine-tuned parameter sets they measure."""
    loss = probe_loss_fn(apply)
    return lambda p, batch: loss(p, batch).mean()


def hessian_step(
    apply: Callable[..., Any],
    params: Any,
    batch: Mapping[str, np.ndarray],
    *,
    num_probes: int,
    seed: int,
    name: str,
) -> tuple[float, float]:
    """Hutchinson estimate of tr ∇²_θ (1/N Σ_i ℓ_i(θ)) at the pretrained params, with
    Rademacher probes seeded by `seed`: (mean, standard error of the mean over probes).
    A phase diagnostic (LENSLLM's PAC-Bayes account), not used by the ranking.
    Cost: num_probes Hessian-vector products (≈ 1 + num_probes gradients, linearized)."""
    import jax

    from lensllm_jax import hessian

    est = hessian.hutchinson_trace(
        _mean_probe_loss(apply),
        params,
        jax.random.PRNGKey(seed),
        num_probes,
        group_by="top",
        name=name,
        batch=batch,
    )
    return float(est.mean), float(est.stderr)


def hessian_distance_step(
    apply: Callable[..., Any],
    params_pretrained: Any,
    params_finetuned: Any,
    batch: Mapping[str, np.ndarray],
    *,
    name: str,
) -> float:
    """vᵀHv with v = θ_finetuned − θ_pretrained and H the Hessian of the mean probe loss at
    the fine-tuned params (`hessian.hessian_distance`): the curvature term of Hessian-based
    PAC-Bayes bounds for fine-tuning. Cost: 2 Hessian-vector products."""
    from lensllm_jax import hessian

    dist = hessian.hessian_distance(
        _mean_probe_loss(apply),
        params_pretrained,
        params_finetuned,
        group_by="top",
        name=name,
        batch=batch,
    )
    return float(dist.total)


# ----------------------------------------------------------------------------- ranking


def rank_ntk(
    table: CurveTable,
    eigenvalues: np.ndarray,
    projected_residual: np.ndarray,
    eta: np.ndarray,
    target: float,
    *,
    num_starts: int = 16,
    seed: int = 0,
) -> list:
    """LensLLM-NTK: fit L(D) = B/(F(Θ, t) + D^β) + E with F(t) = Σ_k e^{−2ηλ_k t}(u_kᵀr)²
    (B, β, E, t free) to the zero-shot point at D = 0 and every curve point, per candidate;
    rank by L(target), lower first. A failed fit is status "failed", NaN, last, with a
    `CurveFitWarning`. eigenvalues/projected_residual: (M, N); eta: (M,).
    Cost: one batched `fit.fit_law` (M x num_starts LM problems of S + 1 points, O(N) each).
    """
    from lensllm_jax import fit, laws
    from lensllm_jax.ranking import RankRow

    d = np.concatenate([[0.0], np.asarray(table.sizes, np.float64)])
    l_all = np.column_stack([table.zero_shot, table.losses]).astype(np.float64)
    aux = (
        np.asarray(eigenvalues, np.float64),
        np.asarray(projected_residual, np.float64),
        np.asarray(eta, np.float64),
    )
    res = fit.fit_law(
        "lensllm_ntk",
        np.broadcast_to(d, l_all.shape),
        l_all,
        num_starts=num_starts,
        seed=seed,
        aux=aux,
    )
    with np.errstate(all="ignore"):
        pred = np.asarray(laws.predict("lensllm_ntk", res.params, float(target), aux=aux))
    ok = np.asarray(res.ok) & np.isfinite(pred) & (pred > 0)
    if not ok.all():
        warnings.warn(
            f"{NTK_METHOD}: {int((~ok).sum())} of {ok.size} curves could not be fitted; "
            "they rank last",
            CurveFitWarning,
            stacklevel=2,
        )
    scores = np.where(ok, pred, np.nan)
    order = sorted(range(table.num_models), key=lambda i: (math.isnan(scores[i]), scores[i]))
    return [
        RankRow(NTK_METHOD, place, table.models[i], float(scores[i]), "ok" if ok[i] else "failed")
        for place, i in enumerate(order, start=1)
    ]


def _append_incomplete(rows: list, methods: Sequence[str], incomplete: Sequence[str]) -> list:
    """Candidates whose fine-tuning diverged rank last under every method, "failed"."""
    from lensllm_jax.ranking import RankRow

    out = []
    for method in methods:
        mine = [r for r in rows if r.method == method]
        out.extend(mine)
        out.extend(
            RankRow(method, len(mine) + k, name, math.nan, "failed")
            for k, name in enumerate(incomplete, start=1)
        )
    return out


# ----------------------------------------------------------------------------- the run


def _settings(
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
    return _canonical(
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


def _measure(
    cand: Candidate,
    token_data: Any,
    split: Any,
    sizes: Sequence[int],
    config: Any,
    *,
    seed: int,
    ntk: bool,
    ntk_chunk: int | str | None,
    hessian_probes: int,
    log: Callable[[str], None],
    prefix: str,
) -> CandidateResult:
    """Load, fine-tune on every size, NTK step, Hessian trace: one candidate's results."""
    from lensllm_jax import finetune, models

    start = time.perf_counter()
    try:
        m = models.load(cand.location)
    except ValueError as err:  # ModelLoadError: broken weights
        raise LensLLMInputError(_first_line(err), file=cand.path) from None
    n_params = int(m.num_params)
    log(f"{prefix}: loaded ({n_params:,} parameters, {m.config.model_type}); fine-tuning")

    def on_point(size: int, loss: float, status: str, steps: int) -> None:
        log(f"{prefix}: D = {size}: test loss {loss:.4f} nats/byte ({steps} steps, {status})")

    probe = probe_batch(token_data.take(split.probe))
    ft_hessian = np.full((3, len(sizes)), np.nan)  # trace, stderr, vᵀHv per size

    def on_params(size: int, params_ft: Any) -> None:
        j = list(sizes).index(size)
        got = _hessian_or_warn(
            lambda: (
                *hessian_step(
                    m.apply, params_ft, probe, num_probes=hessian_probes, seed=seed, name=cand.name
                ),
                hessian_distance_step(m.apply, m.params, params_ft, probe, name=cand.name),
            ),
            f"{cand.name} at D = {size}",
        )
        if got is not None:
            ft_hessian[:, j] = got
            tr, se, dist = got
            log(f"{prefix}: D = {size}: Hessian trace {tr:.4g} ± {se:.2g}, vᵀHv {dist:.4g}")

    curve = finetune.loss_curve(
        m.apply,
        m.params,
        token_data.take(split.pool),
        token_data.take(split.test),
        list(sizes),
        config,
        seed=seed,
        loss_unit=LOSS_UNIT,
        on_point=on_point,
        on_params=on_params if hessian_probes else None,
    )
    log(f"{prefix}: zero-shot test loss {curve.zero_shot:.4f} nats/byte")
    kernel = _probe_kernel(m, probe, cand.name, ntk_chunk, log, prefix) if ntk else None
    h_mean = h_se = math.nan
    if hessian_probes:
        got = _hessian_or_warn(
            lambda: hessian_step(
                m.apply, m.params, probe, num_probes=hessian_probes, seed=seed, name=cand.name
            ),
            cand.name,
        )
        if got is not None:
            h_mean, h_se = got
            log(f"{prefix}: Hessian trace {h_mean:.4g} ± {h_se:.2g} (pretrained)")
    empty = np.zeros((0,), np.float64)
    return CandidateResult(
        name=cand.name,
        path=cand.location,
        family=m.config.model_type,
        n_params=n_params,
        sizes=np.asarray(curve.sizes, np.float64),
        losses=np.asarray(curve.losses, np.float64),
        zero_shot=float(curve.zero_shot),
        num_steps=np.asarray(curve.num_steps, np.int64),
        status=tuple(str(s) for s in curve.status),
        theta=np.zeros((0, 0)) if kernel is None else kernel.theta.astype(np.float64),
        residual=empty if kernel is None else kernel.residual.astype(np.float64),
        eigenvalues=empty if kernel is None else np.asarray(kernel.features[0], np.float64),
        projected_residual=empty if kernel is None else np.asarray(kernel.features[1], np.float64),
        kernel_diagnostics=np.full(3, np.nan)
        if kernel is None
        else np.asarray([float(x) for x in kernel.diagnostics], np.float64),
        eta=float(config.learning_rate),
        hessian_trace=h_mean,
        hessian_stderr=h_se,
        ft_hessian_trace=ft_hessian[0],
        ft_hessian_stderr=ft_hessian[1],
        ft_hessian_distance=ft_hessian[2],
        loss_se=np.asarray(curve.loss_se, np.float64),
        seconds=time.perf_counter() - start,
    )


def _hessian_or_warn(measure: Callable[[], Any], where: str) -> Any:
    """`measure()`, or None and a warning when the Hessian is unusable (NaN/inf)."""
    from lensllm_jax import hessian

    try:
        return measure()
    except hessian.HessianError as err:
        warnings.warn(f"{where}: no Hessian trace ({_first_line(err)})", stacklevel=3)
        return None


def _probe_kernel(
    m: Any,
    probe: Mapping[str, np.ndarray],
    name: str,
    chunk: int | str | None,
    log: Callable[[str], None],
    prefix: str,
) -> NTKStep | None:
    """`ntk_step` at the pretrained params; None (and a warning) if the kernel is unusable
    (NaN/inf, not PSD): LensLLM-NTK then ranks the candidate last."""
    from lensllm_jax import ntk

    try:
        step = ntk_step(m.apply, m.params, probe, chunk_size=chunk, name=name)
    except ntk.NTKError as err:
        warnings.warn(
            f"{name}: no NTK features ({_first_line(err)}); {NTK_METHOD} ranks it last",
            CurveFitWarning,
            stacklevel=3,
        )
        return None
    eig = np.asarray(step.features.eigenvalues)
    log(
        f"{prefix}: NTK on {eig.size} probe examples: λ_max {eig.max():.4g}, "
        f"‖r‖² {float(step.residual @ step.residual):.4g}"
    )
    return step


def run(
    models: Sequence[str],
    data: str | os.PathLike[str],
    *,
    sizes: Sequence[int] = (200, 400, 800, 1600),
    target: float | None = None,
    out_dir: str | os.PathLike[str],
    config: Any = None,
    test_size: int = 500,
    probe_size: int = 32,
    max_length: int = 256,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    ntk: bool = True,
    ntk_chunk: int | str | None = "auto",
    hessian_probes: int = 0,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Fine-tune every candidate on nested subsets, measure its NTK features, rank them.

    Args:
      models: candidate paths (HF folders, .gguf files, repo ids in the local HF cache).
      data: the task's examples (`textdata.read_examples`: .jsonl or .txt).
      sizes: fine-tuning subset sizes (>= 3, each <= the pool size).
      target: the full fine-tuning size to predict the loss at; default the pool size
        (all examples not held out for test and probe); must exceed the largest size.
      out_dir: results folder (created; resumed when it holds the same run).
      config: `finetune.FinetuneConfig` (default: its defaults).
      test_size, probe_size: held-out examples for the test loss and the NTK probe set.
      max_length: tokens per example (a longer one loses its prompt's beginning first).
      seed: every random choice (split, subsets, fine-tuning order, Hessian probes).
      methods: curve-based selection methods (default LensLLM); LensLLM-NTK is added
        unless `ntk` is False.
      ntk_chunk: probe examples per Jacobian chunk ("auto": fit a memory budget, see
        `ntk.auto_chunk_size`). hessian_probes: 0 = no Hessian trace.
      log: called with one progress line per step (e.g. print to stderr).

    Raises `LensLLMInputError` (one line, nothing written) for any bad input, before any
    fine-tuning. Cost: see the module docstring.
    """
    from lensllm_jax import finetune, ranking, textdata

    log = log or (lambda _line: None)
    sizes_t = _check_sizes(sizes)
    test_size = _check_positive_int(test_size, "test size", "--test-size")
    probe_size = _check_positive_int(probe_size, "probe size", "--probe-size", 2 if ntk else 1)
    max_length = _check_positive_int(max_length, "max length", "--max-length", 2)
    hessian_probes = _check_positive_int(hessian_probes, "Hessian probes", "--hessian", 0)
    if hessian_probes == 1:
        raise LensLLMInputError(
            "1 Hessian probe gives no standard error", hint="use at least 2 probes"
        )
    seed = _check_positive_int(seed, "seed", "--seed", 0)
    if ntk_chunk not in ("auto", None):
        ntk_chunk = _check_positive_int(ntk_chunk, "NTK chunk", "--ntk-chunk")
    curve_methods, want_ntk = _check_methods(methods, ntk)
    config = finetune.FinetuneConfig() if config is None else config
    finetune.check_config(config)  # a bad recipe fails now, not after the first load
    out = Path(out_dir)
    _check_out_dir(out)

    data_path = Path(data)
    examples = textdata.read_examples(data_path)
    split = textdata.split_examples(
        len(examples), num_test=test_size, num_probe=probe_size, seed=seed
    )
    pool_size = len(split.pool)
    if sizes_t[-1] > pool_size:
        raise LensLLMInputError(
            f"subset size {sizes_t[-1]} is larger than the fine-tuning pool ({pool_size} of "
            f"{len(examples)} examples; {test_size} test, {probe_size} probe)",
            file=data_path,
            hint="give smaller --sizes, a smaller --test-size/--probe-size, or more examples",
        )
    target = float(pool_size) if target is None else float(target)
    if not (math.isfinite(target) and target > sizes_t[-1]):
        raise LensLLMInputError(
            f"target {target:g} must be larger than the largest subset size {sizes_t[-1]}",
            hint="give --target the number of samples you will fine-tune on",
        )

    candidates = check_candidates(models)
    token_data = []
    for cand in candidates:
        td = textdata.tokenize(examples, cand.tokenizer, max_length=max_length, name=cand.name)
        top = int(np.max(td.tokens)) if np.size(td.tokens) else 0
        if top >= cand.vocab_size:
            raise LensLLMInputError(
                f"its tokenizer gives token id {top}, but the model has {cand.vocab_size} "
                "embeddings",
                file=cand.path,
                hint="pair the model with the tokenizer it was trained with",
            )
        token_data.append(td)

    settings = _settings(
        data_path,
        len(examples),
        candidates,
        sizes_t,
        test_size,
        probe_size,
        max_length,
        seed,
        config,
        ntk,
        hessian_probes,
    )
    resuming = _check_manifest(out, settings)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    if not resuming:
        text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
        write_atomic(out / MANIFEST, text)
    log(
        f"{len(candidates)} candidates, {len(examples)} examples: pool {pool_size}, test "
        f"{len(split.test)}, probe {len(split.probe)}; sizes {list(sizes_t)}; target {target:g}"
        + ("; resuming" if resuming else "")
    )

    results: list[CandidateResult] = []
    resumed: list[str] = []
    for i, (cand, td) in enumerate(zip(candidates, token_data, strict=True)):
        prefix = f"[{i + 1}/{len(candidates)}] {cand.name}"
        path = _result_path(out, i, cand.name)
        res = _load_result(path)
        if res is not None and res.name == cand.name and res.path == cand.location:
            log(f"{prefix}: done in an earlier run, read back")
            resumed.append(cand.name)
        else:
            res = _measure(
                cand,
                td,
                split,
                sizes_t,
                config,
                seed=seed,
                ntk=ntk,
                ntk_chunk=ntk_chunk,
                hessian_probes=hessian_probes,
                log=log,
                prefix=prefix,
            )
            _save_result(path, res)
            log(f"{prefix}: done in {res.seconds:.1f} s")
        results.append(res)

    complete = [r for r in results if r.complete]
    incomplete = [r.name for r in results if not r.complete]
    for name in incomplete:
        warnings.warn(
            f"{name}: fine-tuning diverged on some subset; it is left out of curves.csv and "
            "ranks last (try a lower --lr)",
            CurveFitWarning,
            stacklevel=2,
        )
    if not complete:
        raise LensLLMInputError(
            "fine-tuning diverged for every candidate",
            file=out,
            hint="lower --lr (and use a new --out-dir)",
        )
    table = CurveTable(
        name=data_path.stem,
        models=tuple(r.name for r in complete),
        sizes=np.asarray(sizes_t, np.float64),
        losses=np.stack([r.losses for r in complete]),
        zero_shot=np.asarray([r.zero_shot for r in complete], np.float64),
        n_params=np.asarray([r.n_params for r in complete], np.float64),
        families=tuple(r.family for r in complete),
        source=str(out / "curves.csv"),
        loss_se=np.stack([r.loss_se for r in complete]),
    )
    write_curve_table(table, out / "curves.csv")

    rows = _rank_all(table, complete, incomplete, target, curve_methods, want_ntk, seed)
    features: dict[str, Any] = {}
    if want_ntk:
        from lensllm_jax.ntk import NTKFeatures

        features = {
            r.name: NTKFeatures(r.eigenvalues, r.projected_residual) for r in results if r.has_ntk
        }
    write_atomic(out / "ranking.csv", ranking.rows_to_csv(rows))
    report = _report(settings, data_path, target, results, rows, resumed)
    write_atomic(out / "report.json", report)
    return RunResult(
        table=table,
        features=features,
        rows=rows,
        diagnostics={r.name: r for r in results},
        target=target,
        out_dir=out,
        resumed=tuple(resumed),
    )


def _rank_all(
    table: CurveTable,
    complete: Sequence[CandidateResult],
    incomplete: Sequence[str],
    target: float,
    curve_methods: Sequence[str],
    with_ntk: bool,
    seed: int,
) -> list:
    """Every method's ranking: the curve methods on `table` (`ranking.rank`), LensLLM-NTK
    on the same curves plus the NTK features, then the incomplete candidates, last."""
    from lensllm_jax import ranking

    rows = ranking.rank(table, target, curve_methods) if curve_methods else []
    if with_ntk:
        rows += _rank_ntk_rows(table, complete, target, seed)
    methods = [*curve_methods, *([NTK_METHOD] if with_ntk else [])]
    return _append_incomplete(rows, methods, incomplete)


def _rank_ntk_rows(
    table: CurveTable, complete: Sequence[CandidateResult], target: float, seed: int
) -> list:
    """LensLLM-NTK rows; candidates without features rank last, "failed"."""
    from lensllm_jax.ranking import RankRow

    with_f = [r for r in complete if r.has_ntk]
    without = [r.name for r in complete if not r.has_ntk]
    rows: list = []
    if with_f:
        keep = np.asarray([r.has_ntk for r in complete])
        sub = CurveTable(
            name=table.name,
            models=tuple(r.name for r in with_f),
            sizes=table.sizes,
            losses=table.losses[keep],
            zero_shot=table.zero_shot[keep],
            n_params=table.n_params[keep],
            families=tuple(r.family for r in with_f),
            source=table.source,
        )
        rows = rank_ntk(
            sub,
            np.stack([r.eigenvalues for r in with_f]),
            np.stack([r.projected_residual for r in with_f]),
            np.asarray([r.eta for r in with_f]),
            target,
            seed=seed,
        )
    rows.extend(
        RankRow(NTK_METHOD, len(with_f) + k, name, math.nan, "failed")
        for k, name in enumerate(without, start=1)
    )
    return rows


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def hessian_by_size(r: CandidateResult) -> list[dict[str, Any]] | None:
    """Per fine-tuned size: the Hessian trace ± s.e. and vᵀHv (None when not measured), and
    whether AtS's rule puts the size in the power phase (`select.ats_first_point` on the
    curve): the two phases of the Hessian PAC-Bayes account, side by side."""
    if not np.isfinite(r.ft_hessian_trace).any():
        return None
    from lensllm_jax.select import ats_first_point

    ok = np.isfinite(r.losses) & (r.losses > 0)
    first = (
        int(np.flatnonzero(ok)[ats_first_point(np.log(r.sizes[ok]), np.log(r.losses[ok]))])
        if ok.sum() >= 3
        else None
    )
    return [
        {
            "size": int(d),
            "trace": _finite_or_none(t),
            "stderr": _finite_or_none(e),
            "distance": _finite_or_none(v),
            "power_phase": None if first is None else j >= first,
        }
        for j, (d, t, e, v) in enumerate(
            zip(
                r.sizes, r.ft_hessian_trace, r.ft_hessian_stderr, r.ft_hessian_distance, strict=True
            )
        )
    ]


def _report(
    settings: Mapping[str, Any],
    data_path: Path,
    target: float,
    results: Sequence[CandidateResult],
    rows: Sequence[Any],
    resumed: Sequence[str],
) -> str:
    """report.json: settings, target, per-candidate curve and diagnostics, the ranking."""
    cands = []
    for r in results:
        cands.append(
            {
                "name": r.name,
                "path": r.path,
                "family": r.family,
                "n_params": r.n_params,
                "zero_shot": _finite_or_none(r.zero_shot),
                "sizes": [int(s) for s in r.sizes],
                "losses": [_finite_or_none(v) for v in r.losses],
                "loss_se": [_finite_or_none(v) for v in r.loss_se],
                "num_steps": [int(s) for s in r.num_steps],
                "status": list(r.status),
                "ntk": None
                if not r.has_ntk
                else {
                    "probe_examples": int(r.eigenvalues.size),
                    "eta": r.eta,
                    "max_eigenvalue": float(r.eigenvalues.max()),
                    "trace": float(r.eigenvalues.sum()),
                    "residual_norm2": float(r.residual @ r.residual),
                    "asymmetry": _finite_or_none(r.kernel_diagnostics[0]),
                    "min_eigenvalue": _finite_or_none(r.kernel_diagnostics[1]),
                    "clipped": _finite_or_none(r.kernel_diagnostics[2]),
                },
                "hessian_trace": None
                if not math.isfinite(r.hessian_trace)
                else {"mean": r.hessian_trace, "stderr": _finite_or_none(r.hessian_stderr)},
                "hessian_by_size": hessian_by_size(r),
                "resumed": r.name in resumed,
            }
        )
    ranking = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r._asdict().items()}
        for r in rows
    ]
    body = {
        "settings": settings,
        "data_file": str(data_path.resolve()),
        "loss_unit": LOSS_UNIT,
        "target": target,
        "candidates": cands,
        "ranking": ranking,
    }
    return json.dumps(body, indent=1, default=_json_default) + "\n"
