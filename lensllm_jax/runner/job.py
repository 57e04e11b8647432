"""The end-to-end LENSLLM run for your own candidates: the job of `lensllm run`.

Data flows one way::

    files (models, task examples)
      -> per candidate: fine-tuning curve on nested subsets + NTK spectrum on a probe set
      -> curve table (+ spectra) -> every chosen selection method -> ranking -> report

1. `plan`: check everything first (`checks`: candidates completely — config, every
   tensor's header entry, position table, tokenizer, content digest —, sizes, counts,
   methods, the output folder and an earlier run's manifest; the data file; each tokenizer
   against its model): a bad input is one `LensLLMInputError` line before any fine-tuning,
   and nothing is written.
2. Split the examples once (`data.text.split_examples`): pool / test / probe, the same
   example indices for every candidate. The default target is the pool size.
3. Per candidate (`measure.measure_candidate`): fine-tune from the pretrained weights on
   each nested subset of the pool, evaluate on the test set in nats per byte, then the NTK
   (and optionally Hessian traces) at the pretrained weights on the probe set. Each
   result is saved atomically as it completes (`store`; the folder and manifest appear
   with the first one), so a rerun resumes; a saved result is reused only for the same
   files (content digest). A failure after that (a weight that is NaN, a full disk) is one
   line that says how many results are saved and that rerunning resumes.
4. Build the `CurveTable` with the candidates' NTK spectra, write ``curves.csv`` and
   ``ntk_features.csv`` (``lensllm select curves.csv --ntk ntk_features.csv`` re-ranks
   them identically), rank with the chosen methods (`selection.ranking.rank`: LensLLM and, with
   NTK features, LensLLM-NTK; a diverged candidate ranks last, "failed"), and write
   ``ranking.csv`` and ``report.json`` (`report`).

Output folder::

    manifest.json             the settings; a resume with other settings is refused
    candidates/NNN_<name>.npz one per finished candidate (curve, Θ, r, features, Hessian)
    curves.csv                the curve table (FTS layout, with se_<size> columns)
    ntk_features.csv          each candidate's NTK spectrum (`data.spectra`)
    ranking.csv               method,rank,model,score,status,p_best
    report.json               settings, per-candidate curve and diagnostics, the ranking
                              with each method's fitted parameters per candidate
    plots/                    curves.png, ranking.png, ntk.png, hessian.png (`plots`)

A rerun with another --target re-ranks without fine-tuning and never overwrites the first
target's ranking: its files are ranking_target-<N>.csv, report_target-<N>.json and
plots_target-<N>/ (`report.output_names`).

Many devices (`lensllm_jax.parallel`): with `mesh=` (or more than one device), every
candidate is loaded straight into its shards and fine-tuned, evaluated and measured by the
sharded programs on a ("data", "fsdp") mesh. With `distributed=`, several processes (hosts)
run this same job on JAX's distributed runtime (`runner.distributed`): all compute, process
0 alone writes the output folder and logs; which candidates an earlier run finished is
process 0's reading of the folder, broadcast to the others, so a resume works across
processes whether or not they share a filesystem.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import lensllm_jax.runner.checks as checks
import lensllm_jax.runner.distributed as dist
import lensllm_jax.runner.report as report
import lensllm_jax.runner.store as store
from lensllm_jax.data._files import describe_os_error, write_atomic
from lensllm_jax.data.curves import CurveTable, write_curve_table
from lensllm_jax.data.spectra import stack_spectra, write_spectra
from lensllm_jax.errors import CurveFitWarning, LensLLMError, LensLLMInputError
from lensllm_jax.runner.progress import LineProgress, Progress, log_estimate
from lensllm_jax.runner.result import Candidate, CandidateResult, RunResult

__all__ = ["RunPlan", "plan", "run"]

Log = Callable[[str], None]


class RunPlan(NamedTuple):
    """A checked run: every input validated, the examples split and tokenized."""

    candidates: list[Candidate]
    token_data: list[Any]  # data.text.TokenData per candidate
    split: Any  # data.text.Split
    sizes: tuple[int, ...]
    target: float
    methods: list[str]
    config: Any  # run.finetune.FinetuneConfig
    settings: dict[str, Any]  # what the results depend on (the manifest)
    out: Path
    data_path: Path
    ntk: bool
    ntk_chunk: int | str | None
    hessian_probes: int
    seed: int
    resuming: bool = False  # the out-dir holds this run's manifest


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
    log: Log | None = None,
    progress: Progress | None = None,
    plots: bool = True,
    mesh: Any = None,
    distributed: bool | dist.Cluster = False,
) -> RunResult:
    """Fine-tune every candidate on nested subsets, measure its NTK features, rank them.

    Args:
      models: candidate paths (HF folders, .gguf files, repo ids in the local HF cache).
      data: the task's examples (`data.text.read_examples`: .jsonl or .txt).
      sizes: fine-tuning subset sizes (>= 3, each <= the pool size).
      target: the full fine-tuning size to predict the loss at; default the pool size
        (all examples not held out for test and probe); must exceed the largest size.
      out_dir: results folder (created; resumed when it holds the same run).
      config: `run.finetune.FinetuneConfig` (default: its defaults).
      test_size, probe_size: held-out examples for the test loss and the NTK probe set.
      max_length: tokens per example (a longer one loses its prompt's beginning first).
      seed: every random choice (split, subsets, fine-tuning order, Hessian probes).
      methods: selection methods (default LensLLM); LensLLM-NTK is added unless `ntk` is
        False.
      ntk_chunk: probe examples per Jacobian chunk ("auto": fit a memory budget, see
        `core.ntk.auto_chunk_size`). hessian_probes: 0 = no Hessian trace.
      log: called with one progress line per step (e.g. print to stderr), in process 0 only;
        the lines carry the share of fine-tuning steps done and the time left once steps
        are timed.
      progress: a `runner.progress.Progress` instead of `log` (e.g. `RichProgress`, a
        terminal bar); before any work it is given an estimate of the cost.
      plots: write the pictures into the folder's plots/ (`plots.write_run_plots`) when
        matplotlib is installed (without it: a warning, no plots).
      mesh: the device layout, "data=2,fsdp=4" (`parallel.make_mesh`) or a Mesh; None: one
        device when there is one, else the smallest fsdp size whose per-device memory fits
        (`parallel.plan.auto_layout`). Results equal the one-device run to f32 round-off.
      distributed: True to start JAX's distributed runtime with the cluster JAX detects,
        or a `runner.distributed.Cluster` (coordinator, number of processes, process id);
        every process calls `run` alike, and only process 0 writes `out_dir`.

    Raises `LensLLMInputError` (one line, nothing written) for any bad input, before any
    fine-tuning. A failure once results are saved (a candidate's weight that is NaN, a full
    disk) is one line saying how many are saved in `out_dir` and that rerunning the same
    call resumes. Cost: see `run.measure`.
    """
    if distributed is not False:
        dist.initialize(distributed if isinstance(distributed, dist.Cluster) else dist.Cluster())
    writer = dist.is_writer()
    if not writer:  # the other processes compute in silence
        log, progress = None, Progress()
    if progress is None:
        progress = Progress() if log is None else LineProgress(log)
    p = dist.agree(
        lambda: plan(
            models,
            data,
            sizes=sizes,
            target=target,
            out_dir=out_dir,
            config=config,
            test_size=test_size,
            probe_size=probe_size,
            max_length=max_length,
            seed=seed,
            methods=methods,
            ntk=ntk,
            ntk_chunk=ntk_chunk,
            hessian_probes=hessian_probes,
            check_out=writer,
        )
    )
    layout = dist.agree(lambda: _layout(p, mesh))
    try:
        results, resumed = _measure_all(p, progress, layout)
    finally:
        progress.close()
    return _rank_and_report(p, results, resumed, progress.log, plots, write=writer)


def _layout(p: RunPlan, mesh: Any) -> Any:
    """The Mesh the candidates run on, or None for the one-device programs."""
    import jax

    if mesh is None and jax.device_count() == 1:
        return None
    from lensllm_jax import parallel

    if mesh is None:
        mesh = parallel.plan.auto_layout(
            [c.location for c in p.candidates],
            jax.device_count(),
            batch_size=int(p.config.batch_size),
            max_length=int(p.settings["max_length"]),
            probe_size=len(p.split.probe) if p.ntk else 0,
            hessian_probes=p.hessian_probes,
        )
    return parallel.make_mesh(mesh)


def plan(
    models: Sequence[str],
    data: str | os.PathLike[str],
    *,
    sizes: Sequence[int],
    target: float | None,
    out_dir: str | os.PathLike[str],
    config: Any,
    test_size: int,
    probe_size: int,
    max_length: int,
    seed: int,
    methods: Sequence[str] | None,
    ntk: bool,
    ntk_chunk: int | str | None,
    hessian_probes: int,
    check_out: bool = True,
) -> RunPlan:
    """Check every input of `run` (arguments as there) and prepare the work; writes nothing.
    `check_out=False` skips the output folder's checks (a process that will not write).

    Raises `LensLLMInputError` (one line) for the first problem found. Cost: reading the
    data file, one config and one tokenizer per candidate, tokenizing the examples.
    """
    from lensllm_jax.data import text
    from lensllm_jax.runner import finetune

    sizes_t = checks.check_sizes(sizes)
    test_size = checks.check_positive_int(test_size, "test size", "--test-size")
    probe_size = checks.check_positive_int(
        probe_size, "probe size", "--probe-size", 2 if ntk else 1
    )
    max_length = checks.check_positive_int(max_length, "max length", "--max-length", 2)
    hessian_probes = checks.check_positive_int(hessian_probes, "Hessian probes", "--hessian", 0)
    if hessian_probes == 1:
        raise LensLLMInputError(
            "1 Hessian probe gives no standard error", hint="use at least 2 probes"
        )
    seed = checks.check_positive_int(seed, "seed", "--seed", 0)
    if ntk_chunk not in ("auto", None):
        ntk_chunk = checks.check_positive_int(ntk_chunk, "NTK chunk", "--ntk-chunk")
    chosen = checks.check_methods(methods, ntk)
    config = finetune.FinetuneConfig() if config is None else config
    finetune.check_config(config)  # a bad recipe fails now, not after the first load
    out = Path(out_dir)
    if check_out:
        checks.check_out_dir(out)

    data_path = Path(data)
    examples = text.read_examples(data_path)
    split = text.split_examples(len(examples), num_test=test_size, num_probe=probe_size, seed=seed)
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

    candidates = checks.check_candidates(models, max_length=max_length)
    token_data = [_tokenize(text, examples, cand, max_length) for cand in candidates]
    settings = store.settings_of(
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
    resuming = store.check_manifest(out, settings) if check_out else False
    return RunPlan(
        candidates,
        token_data,
        split,
        sizes_t,
        target,
        chosen,
        config,
        settings,
        out,
        data_path,
        ntk,
        ntk_chunk,
        hessian_probes,
        seed,
        resuming,
    )


def _tokenize(text: Any, examples: Any, cand: Candidate, max_length: int) -> Any:
    """`cand`'s tokenization of the examples; a token id beyond its embeddings is an
    input error (a model paired with the wrong tokenizer)."""
    td = text.tokenize(examples, cand.tokenizer, max_length=max_length, name=cand.name)
    top = int(np.max(td.tokens)) if np.size(td.tokens) else 0
    if top >= cand.vocab_size:
        raise LensLLMInputError(
            f"its tokenizer gives token id {top}, but the model has {cand.vocab_size} embeddings",
            file=cand.path,
            hint="pair the model with the tokenizer it was trained with",
        )
    return td


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _saved(p: RunPlan, writer: bool) -> tuple[list[CandidateResult | None], list[str | None]]:
    """What an earlier run saved of each candidate for the same files (read by the writer,
    shared with every process), None where it must be measured; and why a saved result is
    not reused (writer only, for the log)."""
    saved: list[CandidateResult | None] = []
    stale: list[str | None] = []
    for i, cand in enumerate(p.candidates):
        path = store.result_path(p.out, i, cand.name)
        res = store.load_result(path) if writer and p.resuming else None
        why = store.stale_reason(res, cand, p.sizes)
        ok = res is not None and why is None
        saved.append(res if ok else None)
        there = res is not None or (p.resuming and path.exists())
        stale.append(why if not ok and there else None)
    if dist.process_count() == 1:
        return saved, stale
    done = dist.broadcast_flags(np.asarray([r is not None for r in saved]))
    shared: list[CandidateResult | None] = []
    for res, is_done in zip(saved, done, strict=True):
        if not is_done:
            shared.append(None)
            continue
        data = dist.broadcast_bytes(dist.npz_bytes(res.to_arrays()) if res is not None else None)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            shared.append(CandidateResult.from_arrays({k: z[k] for k in z.files}))
    return shared, stale


def _measure_all(
    p: RunPlan, progress: Progress, mesh: Any = None
) -> tuple[list[CandidateResult], list[str]]:
    """Every candidate's results, read back when an earlier run saved them for the same
    files, else measured and saved; prices the work still to do (`progress.estimate`)
    before starting it. The folder and manifest are created with the first saved result
    (`store.start`); a failure after that says the run can be resumed. Only the writer
    (process 0) touches the folder; the other processes get its reading."""
    from lensllm_jax.runner.finetune import num_train_steps
    from lensllm_jax.runner.measure import measure_candidate

    writer = dist.is_writer()
    log = progress.log
    log(
        f"{_plural(len(p.candidates), 'candidate')}, {p.settings['data']['examples']} "
        f"examples: pool {len(p.split.pool)}, test {len(p.split.test)}, probe "
        f"{len(p.split.probe)}; sizes {list(p.sizes)}; target {p.target:g}"
        + ("; resuming" if p.resuming else "")
    )
    saved, stale = _saved(p, writer)
    todo = [i for i, res in enumerate(saved) if res is None]
    per_candidate = sum(num_train_steps(d, p.config) for d in p.sizes)
    if todo and not progress.quiet:
        log_estimate(p, todo, log)
    progress.start(per_candidate * len(todo))
    results: list[CandidateResult] = []
    resumed: list[str] = []
    started = p.resuming
    try:
        for i, (cand, td) in enumerate(zip(p.candidates, p.token_data, strict=True)):
            prefix = f"[{i + 1}/{len(p.candidates)}] {cand.name}"
            path = store.result_path(p.out, i, cand.name)
            res = saved[i]
            if res is not None:
                log(f"{prefix}: done in an earlier run, read back")
                resumed.append(cand.name)
            else:
                if stale[i] is not None:
                    log(f"{prefix}: {stale[i]}; measuring it again")
                done = [0]

                def on_step(n: int, done: list[int] = done) -> None:
                    done[0] += n
                    progress.advance(n)

                res = measure_candidate(
                    cand,
                    td,
                    p.split,
                    p.sizes,
                    p.config,
                    seed=p.seed,
                    ntk=p.ntk,
                    ntk_chunk=p.ntk_chunk,
                    hessian_probes=p.hessian_probes,
                    log=log,
                    prefix=prefix,
                    on_step=on_step,
                    mesh=mesh,
                )
                progress.advance(max(per_candidate - done[0], 0))  # steps a divergence skipped
                res = dataclasses.replace(res, digest=cand.digest)
                if writer:
                    if not started:
                        store.start(p.out, p.settings, p.resuming)
                        started = True
                    store.save_result(path, res)
                log(f"{prefix}: done in {res.seconds:.1f} s")
            results.append(res)
    except (LensLLMError, OSError) as err:
        raise _stopped(err, p, len(results) if started else 0) from None
    except Exception as err:  # a bug: the traceback stays, with where the results are
        if started:
            err.add_note(_resume_note(p, len(results)))
        raise
    return results, resumed


def _resume_note(p: RunPlan, saved: int) -> str:
    return (
        f"{saved} of {len(p.candidates)} candidates' results are saved in {p.out}: "
        "rerun the same command to resume"
    )


def _stopped(err: BaseException, p: RunPlan, saved: int) -> LensLLMInputError:
    """`err` as one line; once results are saved, with how many and how to resume."""
    if isinstance(err, OSError):
        what, file, hint = describe_os_error(err), None, None
    elif isinstance(err, LensLLMInputError):
        what, file, hint = err.what, err.file, err.hint
    else:
        what, file, hint = checks.first_line(err), None, None
    if saved or (p.out / checks.MANIFEST).is_file():
        note = _resume_note(p, saved)
        hint = f"{hint}; {note}" if hint else f"{note} once this is fixed"
    return LensLLMInputError(what, file=file, hint=hint)


def _rank_and_report(
    p: RunPlan,
    results: list[CandidateResult],
    resumed: list[str],
    log: Log,
    plots: bool,
    *,
    write: bool = True,
) -> RunResult:
    """The curve table of the complete candidates (with their spectra), every method's
    ranking (diverged candidates last), and the files of the output folder (named by
    `output_names`; only when `write`)."""
    from lensllm_jax.core.ntk import NTKFeatures
    from lensllm_jax.selection.ranking import rank, rows_to_csv

    complete = [r for r in results if r.complete]
    incomplete = [r.name for r in results if not r.complete]
    for name in incomplete:
        warnings.warn(
            f"{name}: fine-tuning diverged on some subset; it is left out of curves.csv and "
            "ranks last (try a lower --lr)",
            CurveFitWarning,
            stacklevel=3,
        )
    if not complete:
        raise LensLLMInputError(
            "fine-tuning diverged for every candidate",
            file=p.out,
            hint="lower --lr (and use a new --out-dir)",
        )
    spectra = {r.name: (r.eigenvalues, r.projected_residual, r.eta) for r in results if r.has_ntk}
    models = tuple(r.name for r in complete)
    table = CurveTable(
        name=p.data_path.stem,
        models=models,
        sizes=np.asarray(p.sizes, np.float64),
        losses=np.stack([r.losses for r in complete]),
        zero_shot=np.asarray([r.zero_shot for r in complete], np.float64),
        n_params=np.asarray([r.n_params for r in complete], np.float64),
        families=tuple(r.family for r in complete),
        source=str(p.out / "curves.csv"),
        loss_se=np.stack([r.loss_se for r in complete]),
        ntk=stack_spectra(models, spectra) if p.ntk else None,
    )
    files: list[Path] = []
    names = report.output_names(p.out, p.target) if write else None
    try:
        if write:
            write_curve_table(table, p.out / "curves.csv")
            if p.ntk:
                write_spectra(p.out / "ntk_features.csv", spectra)
        rows = rank(table, p.target, p.methods, failed=incomplete)
        if names is not None:
            if names.previous_target is not None:
                log(
                    f"report.json holds the ranking for target {names.previous_target:g}; "
                    f"this one (target {p.target:g}) goes to {names.ranking} and {names.report}"
                )
            write_atomic(p.out / names.ranking, rows_to_csv(rows))
            write_atomic(
                p.out / names.report,
                report.report_json(p.settings, p.data_path, p.target, results, rows, resumed),
            )
            files = [p.out / names.ranking, p.out / names.report]
    except (LensLLMError, OSError) as err:
        raise _stopped(err, p, len(results)) from None
    result = RunResult(
        table=table,
        features={name: NTKFeatures(lam, c) for name, (lam, c, _) in spectra.items()},
        rows=rows,
        diagnostics={r.name: r for r in results},
        target=p.target,
        out_dir=p.out,
        resumed=tuple(resumed),
    )
    if plots and names is not None:
        files += _write_plots(result, p.out / names.plots, log)
    return result._replace(files=tuple(files))


def _write_plots(result: RunResult, folder: Path, log: Log) -> list[Path]:
    """The run's pictures (`plots.write_run_plots`); without matplotlib a warning instead."""
    from lensllm_jax.plots import require_matplotlib, write_run_plots

    try:
        require_matplotlib()
    except LensLLMInputError as err:
        warnings.warn(f"no plots: {err}", stacklevel=3)
        return []
    written = write_run_plots(result, folder)
    log(f"plots in {folder}: {', '.join(w.name for w in written)}")
    return written
