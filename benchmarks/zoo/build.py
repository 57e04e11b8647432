"""Build a controlled model zoo offline and measure it: pretrain candidates with our own
training loop on text already on the machine, fine-tune each on nested subsets of a
downstream task and at a full size 16x the largest subset (the ground truth), measure NTK
and Hessian features at the pretrained weights, and write the results.

    python benchmarks/zoo/build.py --preset smoke                 # every stage
    python benchmarks/zoo/build.py --preset cpu --stages corpus pretrain measure assemble
    python benchmarks/zoo/build.py --preset gpu --max-seconds 540 # one 10-minute call; rerun

Stages (each resumable: finished work is read back, never recomputed):

  corpus    the pretraining corpora and the task's prompt/completion pairs (`corpus.py`)
  pretrain  every run of the preset, our `runner.finetune` train step on random windows of
            its corpus (AdamW, warmup + cosine); a checkpoint per listed step (params and
            optimiser state, so an interrupted run resumes at its last save)
  measure   per candidate: `runner.finetune.loss_curve` one size at a time for every seed
            (nats per byte on the test split), the NTK of the per-example probe loss
            (`runner.measure.ntk_step`), the Hutchinson Hessian trace (`hessian_step`) and
            Adam's first-step scale (the SGD-equivalent learning rate, see `adam_scale`)
  assemble  results/<preset>/: curves.csv (seed means, se_ columns: the test-set standard
            error and the seed spread in quadrature; the last size column is the full run),
            curves_by_seed.csv, ntk_features.csv (spectra + schedule columns), features.csv,
            manifest.json
  verdict   results/<preset>/verdict.json (`verdict.py`): every arm, per budget, bootstrap

Weights and corpora live in benchmarks/zoo/work/<preset>/ (ignored by git). With
`--max-seconds S` a stage stops cleanly after S seconds of work (exit code 3: rerun to
resume). Everything random takes a seed; the same machine gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import corpus as zc
import numpy as np
import presets as zp

HERE = Path(__file__).resolve().parent
INCOMPLETE = 3


class OutOfTime(Exception):
    """The stage used its --max-seconds; what is done is saved."""


class Clock:
    def __init__(self, limit: float | None):
        self.start = time.monotonic()
        self.limit = limit

    def check(self) -> None:
        if self.limit is not None and time.monotonic() - self.start > self.limit:
            raise OutOfTime


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _leaves(tree: Any) -> dict[str, np.ndarray]:
    import jax

    return {f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _restore(like: Any, path: Path) -> Any:
    import jax
    import jax.numpy as jnp

    with np.load(path) as z:
        leaves, treedef = jax.tree.flatten(like)
        return jax.tree.unflatten(
            treedef, [jnp.asarray(z[f"a{i}"], x.dtype) for i, x in enumerate(leaves)]
        )


# --------------------------------------------------------------------------------- corpus


def stage_corpus(p: dict, work: Path, log) -> dict:
    info = {}
    for kind in sorted({r["corpus"] for r in p["runs"]}):
        path = work / "corpora" / f"{kind}.bin"
        if not path.exists():
            data = zc.build_corpus(kind, p["corpus_bytes"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_bytes(data)
            os.replace(path.with_suffix(".tmp"), path)
            log(f"corpus {kind}: {len(data):,} bytes")
        data = path.read_bytes()
        info[kind] = {"bytes": len(data), "sha256": zc.sha256(data)}
    task = work / "task.json"
    if not task.exists():
        pairs = zc.task_pairs(p["task"]["source"])
        _write_json(task, pairs)
        log(f"task: {len(pairs)} prompt/completion pairs")
    pairs = json.loads(task.read_text())
    need = p["full"] + p["task"]["test"] + p["task"]["probe"]
    if len(pairs) < need:
        raise SystemExit(f"zoo: the task has {len(pairs)} pairs, the preset needs {need}")
    info["task"] = {"pairs": len(pairs), "source": p["task"]["source"]}
    return info


# ------------------------------------------------------------------------------- pretrain


def _pretrain_config(p: dict, steps: int):
    from lensllm_jax.runner.finetune import FinetuneConfig

    pt = p["pretrain"]
    return FinetuneConfig(
        learning_rate=pt["lr"],
        batch_size=pt["batch"],
        warmup_ratio=pt["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        min_steps=steps,
        epochs=0,
    )


def stage_pretrain(p: dict, work: Path, clock: Clock, log) -> dict:
    import jax

    from lensllm_jax import models
    from lensllm_jax.runner import finetune

    out = {}
    pt = p["pretrain"]
    length, batch = pt["length"], pt["batch"]
    for run in p["runs"]:
        folder = work / "ckpt" / run["name"]
        total = max(run["checkpoints"])
        done = [s for s in run["checkpoints"] if (folder / f"step{s}.npz").exists()]
        meta_path = folder / "meta.json"
        meta: dict[str, Any] = (
            json.loads(meta_path.read_text()) if meta_path.exists() else {"train_loss": {}}
        )
        if len(done) == len(run["checkpoints"]):
            out[run["name"]] = meta
            continue
        cfg = zp.model_config(run, zc.VOCAB, length)
        seed = sum(ord(c) for c in run["name"])
        m = models.from_config(cfg, key=seed)
        config = _pretrain_config(p, total)
        init, step = finetune.make_train_step(m.apply, config)
        params, opt_state = m.params, init(m.params)
        start = 0
        state = folder / "state.npz"
        if state.exists():
            with np.load(state) as z:
                start = int(z["step"])
            params = _restore(params, folder / "state_params.npz")
            opt_state = _restore(opt_state, state)
        lrs = finetune.learning_rates(config, total)
        text = np.frombuffer((work / "corpora" / f"{run['corpus']}.bin").read_bytes(), np.uint8)
        t0 = time.monotonic()
        losses: list[Any] = []
        for s in range(start, total):
            rng = np.random.default_rng([seed, s])
            starts = rng.integers(0, text.size - length, batch)
            windows = np.stack([text[i : i + length - 1] for i in starts]).astype(np.int32)
            tokens = np.concatenate([np.full((batch, 1), zc.BOS, np.int32), windows], axis=1)
            ones = np.ones_like(tokens)
            b = {"tokens": tokens, "loss_mask": ones, "attention_mask": ones}
            params, opt_state, loss = step(params, opt_state, b, float(lrs[s]))
            losses.append(loss)
            if (s + 1) in run["checkpoints"]:
                tail = np.asarray(jax.device_get(losses[-50:]), np.float64)
                meta["train_loss"][str(s + 1)] = float(tail.mean())
                _save_npz(folder / f"step{s + 1}.npz", **_leaves(params))
                _save_npz(folder / "state_params.npz", **_leaves(params))
                _save_npz(state, step=np.int64(s + 1), **_leaves(opt_state))
                meta["num_params"] = int(m.num_params)
                meta["config"] = cfg
                meta.setdefault("seconds", 0.0)
                meta["seconds"] += time.monotonic() - t0
                t0 = time.monotonic()
                _write_json(meta_path, meta)
                log(
                    f"pretrain {run['name']}: step {s + 1}/{total}, "
                    f"train loss {meta['train_loss'][str(s + 1)]:.3f} nats/byte"
                )
            elif (s + 1) % 250 == 0:
                try:
                    clock.check()
                except OutOfTime:
                    _save_npz(folder / "state_params.npz", **_leaves(params))
                    _save_npz(state, step=np.int64(s + 1), **_leaves(opt_state))
                    meta.setdefault("seconds", 0.0)
                    meta["seconds"] += time.monotonic() - t0
                    _write_json(meta_path, meta)
                    raise
        out[run["name"]] = meta
    return out


# -------------------------------------------------------------------------------- measure


def _task_data(p: dict, work: Path, tokenizer: Any):
    from lensllm_jax.data import text as td

    pairs = json.loads((work / "task.json").read_text())
    examples = [td.Example(a, b) for a, b in pairs]
    split = td.split_examples(
        len(examples), num_test=p["task"]["test"], num_probe=p["task"]["probe"], seed=0
    )
    data = td.tokenize(examples, tokenizer, max_length=p["task"]["max_length"], name="zoo task")
    return data, split


def _load_candidate(cand: dict, p: dict, work: Path):
    from lensllm_jax import models

    if cand["kind"] == "gguf":
        import importlib.util

        spec = importlib.util.find_spec(cand["package"])
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"zoo: package {cand['package']} is not installed")
        folder = Path(next(iter(spec.submodule_search_locations)))
        m = models.load(next(folder.glob("*.gguf")))
        return m, m.tokenizer
    cfg = zp.model_config(cand, zc.VOCAB, p["pretrain"]["length"])
    m = models.from_config(cfg, key=0)
    m.params = _restore(m.params, work / "ckpt" / cand["run"] / f"step{cand['step']}.npz")
    return m, zc.ByteTokenizer()


def adam_scale(apply: Any, params: Any, batch: dict, config: Any) -> dict:
    """The SGD-equivalent learning rate of the recipe's first AdamW step at the pretrained
    weights: with g the gradient of the mean token NLL on one fine-tuning batch, g_c its
    clipped copy and u = g_c / (|g_c| + ε) Adam's first direction (bias-corrected m̂ = g_c,
    v̂ = g_c²), an SGD step η·g moves the weights as far as lr·u when

        η_sgd = lr · ‖u‖ / ‖g‖.

    AdamW's per-coordinate preconditioning is folded into this one scalar: the kernel Θ is
    the plain (Euclidean) NTK, and F(Θ, t) uses η_sgd for η. Cost: one gradient."""
    import jax
    import jax.numpy as jnp

    from lensllm_jax.models.losses import token_logprobs

    def mean_nll(prm):
        lp = token_logprobs(
            apply, prm, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
        )
        m = jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32)
        return -(lp * m).sum() / jnp.maximum(m.sum(), 1.0)

    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.grad(mean_nll)(params))]
    gnorm = math.sqrt(sum(float(np.sum(x**2)) for x in g))
    clip = min(1.0, config.max_grad_norm / gnorm) if config.max_grad_norm > 0 else 1.0
    u2 = sum(float(np.sum((clip * x / (np.abs(clip * x) + config.adam_eps)) ** 2)) for x in g)
    return {
        "grad_norm": gnorm,
        "adam_step_norm": math.sqrt(u2),
        "sgd_eta": config.learning_rate * math.sqrt(u2) / gnorm,
    }


def recipe_schedule(config: Any) -> dict[str, float]:
    """The recipe's step schedule as the NTK spectra's extra columns: N(D) =
    max(epochs·⌈D/B⌉, min_steps) steps, and the schedule-weighted time τ = Σ_s lr_s / lr =
    slope·N + offset, fitted exactly on two long runs of `finetune.learning_rates` (warmup +
    cosine: slope 1/2, offset 1)."""
    from lensllm_jax.runner.finetune import learning_rates

    n1, n2 = 1000, 2000
    t1 = float(learning_rates(config, n1).sum()) / config.learning_rate
    t2 = float(learning_rates(config, n2).sum()) / config.learning_rate
    slope = (t2 - t1) / (n2 - n1)
    return {
        "batch_size": float(config.batch_size),
        "epochs": float(config.epochs),
        "min_steps": float(config.min_steps),
        "max_steps": float(config.max_steps),
        "time_slope": slope,
        "time_offset": t1 - slope * n1,
    }


def _recipe(p: dict):
    from lensllm_jax.runner.finetune import FinetuneConfig

    return FinetuneConfig(**p["recipe"])


def stage_measure(p: dict, work: Path, clock: Clock, log) -> None:
    import jax

    from lensllm_jax.models.lm_probe import probe_batch
    from lensllm_jax.runner import finetune
    from lensllm_jax.runner.measure import hessian_step, ntk_step

    config = _recipe(p)
    sizes = [*p["sizes"], p["full"]]
    cache: dict[str, Any] = {}
    for cand in zp.candidates(p):
        folder = work / "points" / cand["name"].replace("/", "_")
        feats_path = work / "features" / f"{cand['name'].replace('/', '_')}.npz"
        todo = [
            (s, d) for s in p["seeds"] for d in sizes if not (folder / f"s{s}_D{d}.json").exists()
        ]
        if not todo and feats_path.exists():
            continue
        m, tok = _load_candidate(cand, p, work)
        key = "bytes" if isinstance(tok, zc.ByteTokenizer) else cand["name"]
        if key not in cache:
            cache[key] = _task_data(p, work, tok)
        data, split = cache[key]
        pool, test = data.take(split.pool), data.take(split.test)
        for seed, d in todo:
            clock.check()
            t0 = time.monotonic()
            curve = finetune.loss_curve(m.apply, m.params, pool, test, [d], config, seed=seed)
            _write_json(
                folder / f"s{seed}_D{d}.json",
                {
                    "size": d,
                    "seed": seed,
                    "loss": float(curve.losses[0]),
                    "se": float(curve.loss_se[0]) if curve.loss_se is not None else math.nan,
                    "zero_shot": curve.zero_shot,
                    "zero_shot_se": curve.zero_shot_se,
                    "steps": int(curve.num_steps[0]),
                    "status": curve.status[0],
                    "seconds": time.monotonic() - t0,
                },
            )
            log(
                f"measure {cand['name']}: seed {seed}, D = {d}: {curve.losses[0]:.4f} nats/byte "
                f"({int(curve.num_steps[0])} steps, {time.monotonic() - t0:.0f} s)"
            )
        if not feats_path.exists():
            clock.check()
            t0 = time.monotonic()
            probe = probe_batch(data.take(split.probe))
            k = ntk_step(m.apply, m.params, probe, name=cand["name"])
            h_mean, h_se = hessian_step(
                m.apply, m.params, probe, num_probes=p["hessian_probes"], seed=0, name=cand["name"]
            )
            order = np.random.default_rng(0).permutation(pool.num_examples)[: config.batch_size]
            adam = adam_scale(m.apply, m.params, pool.batch(order), config)
            _save_npz(
                feats_path,
                theta=np.asarray(k.theta, np.float64),
                residual=np.asarray(k.residual, np.float64),
                eigenvalues=np.asarray(k.features.eigenvalues, np.float64),
                projected_residual=np.asarray(k.features.projected_residual, np.float64),
                hessian=np.array([h_mean, h_se]),
                num_params=np.int64(m.num_params),
                seconds=np.float64(time.monotonic() - t0),
                **{k2: np.float64(v) for k2, v in adam.items()},
            )
            log(
                f"measure {cand['name']}: NTK λ_max {float(np.max(k.features.eigenvalues)):.4g}, "
                f"‖r‖² {float(k.residual @ k.residual):.4g}, tr H {h_mean:.4g} ± {h_se:.2g}, "
                f"η_sgd {adam['sgd_eta']:.3g}"
            )
        del m
        if len(cache) > 4:
            jax.clear_caches()


# ------------------------------------------------------------------------------- assemble


def stage_assemble(p: dict, work: Path, out: Path, info: dict) -> None:
    from lensllm_jax.data.curves import CurveTable, write_curve_table
    from lensllm_jax.data.spectra import write_spectra
    from lensllm_jax.selection.ntk_arms import kernel_summaries

    cands = zp.candidates(p)
    sizes = [*p["sizes"], p["full"]]
    seeds = p["seeds"]
    m_, s_ = len(cands), len(sizes)
    loss = np.full((m_, len(seeds), s_), np.nan)
    se = np.full_like(loss, np.nan)
    steps = np.zeros((s_,), np.int64)
    zero = np.zeros(m_)
    zero_se = np.zeros(m_)
    by_seed_rows = []
    spectra, extras, feat_rows = {}, {}, []
    pretrain = info.get("pretrain", {})
    config = _recipe(p)
    for i, c in enumerate(cands):
        folder = work / "points" / c["name"].replace("/", "_")
        for a, seed in enumerate(seeds):
            for j, d in enumerate(sizes):
                pt = json.loads((folder / f"s{seed}_D{d}.json").read_text())
                loss[i, a, j], se[i, a, j] = pt["loss"], pt["se"]
                zero[i], zero_se[i], steps[j] = pt["zero_shot"], pt["zero_shot_se"], pt["steps"]
            by_seed_rows.append([c["name"], seed, zero[i], *loss[i, a]])
        f = np.load(work / "features" / f"{c['name'].replace('/', '_')}.npz")
        spectra[c["name"]] = (f["eigenvalues"], f["projected_residual"], config.learning_rate)
        extras[c["name"]] = {"sgd_eta": float(f["sgd_eta"]), **recipe_schedule(config)}
        summ = kernel_summaries(f["eigenvalues"], f["projected_residual"])
        feat_rows.append(
            {
                "config name": c["name"],
                "family": c["family"],
                "corpus": c["corpus"],
                "pretrain_steps": c["step"],
                "width": c.get("d", 0),
                "depth": c.get("layers", 0),
                "size": int(f["num_params"]),
                "hessian_trace": float(f["hessian"][0]),
                "hessian_trace_se": float(f["hessian"][1]),
                "grad_norm": float(f["grad_norm"]),
                "adam_step_norm": float(f["adam_step_norm"]),
                "sgd_eta": float(f["sgd_eta"]),
                "pretrain_train_loss": pretrain.get(c.get("run", ""), {})
                .get("train_loss", {})
                .get(str(c["step"]), math.nan),
                **summ,
            }
        )
    # The seed mean; its standard error combines the test-set error (mean of the per-seed
    # standard errors) and the spread of the seeds (their standard error of the mean).
    mean = loss.mean(axis=1)
    spread = loss.std(axis=1, ddof=1) / math.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
    se_tot = np.sqrt((se.mean(axis=1) / math.sqrt(len(seeds))) ** 2 + spread**2)
    table = CurveTable(
        name=f"zoo-{info['preset']}",
        models=tuple(c["name"] for c in cands),
        sizes=np.asarray(sizes, np.float64),
        losses=mean,
        zero_shot=zero,
        n_params=np.asarray([r["size"] for r in feat_rows], np.float64),
        families=tuple(c["family"] for c in cands),
        loss_se=se_tot,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_curve_table(table, out / "curves.csv")
    with open(out / "curves_by_seed.csv", "w") as fh:
        fh.write(",".join(["config name", "seed", "0", *map(str, sizes)]) + "\n")
        for row in by_seed_rows:
            fh.write(",".join([row[0], str(row[1]), *(repr(float(x)) for x in row[2:])]) + "\n")
    write_spectra(out / "ntk_features.csv", spectra, extras=extras)
    keys = list(feat_rows[0])
    with open(out / "features.csv", "w") as fh:
        fh.write(",".join(keys) + "\n")
        for r in feat_rows:
            fh.write(
                ",".join(
                    str(r[k]) if isinstance(r[k], str | int) else repr(float(r[k])) for k in keys
                )
                + "\n"
            )
    info["steps_per_size"] = dict(zip(map(str, sizes), map(int, steps), strict=True))
    _write_json(out / "manifest.json", info)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(zp.PRESETS), default="smoke")
    ap.add_argument(
        "--stages", nargs="+", default=["corpus", "pretrain", "measure", "assemble", "verdict"]
    )
    ap.add_argument("--work", type=Path, default=None, help="weights and corpora (ignored)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--bootstrap", type=int, default=None, help="override the verdict's")
    args = ap.parse_args(argv)
    p = zp.PRESETS[args.preset]
    work = args.work or HERE / "work" / args.preset
    out = args.out or HERE / "results" / args.preset
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.max_seconds)
    log_file = work / "log.txt"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(log_file, "a") as fh:
            fh.write(line + "\n")

    info_path = work / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(
        preset=args.preset,
        machine={
            "host": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        candidates=[
            {k: c[k] for k in ("name", "family", "corpus", "step") if k in c}
            for c in zp.candidates(p)
        ],
        sizes=p["sizes"],
        full=p["full"],
        seeds=p["seeds"],
        recipe=p["recipe"],
        pretrain_recipe=p["pretrain"],
        task_settings=p["task"],
    )
    info.setdefault("seconds", {})
    try:
        for stage in ("corpus", "pretrain", "measure", "assemble", "verdict"):
            if stage not in args.stages:
                continue
            t0 = time.monotonic()
            log(f"stage {stage} ({args.preset}); load {os.getloadavg()[0]:.2f}")
            if stage == "corpus":
                info["corpus"] = stage_corpus(p, work, log)
            elif stage == "pretrain":
                info["pretrain"] = stage_pretrain(p, work, clock, log)
            elif stage == "measure":
                stage_measure(p, work, clock, log)
            elif stage == "assemble":
                stage_assemble(p, work, out, info)
            else:
                sys.path.insert(0, str(HERE))
                import verdict

                verdict.run(
                    out,
                    p["verdict"]["ratios"],
                    args.bootstrap or p["verdict"]["bootstrap"],
                    log=log,
                )
            # resumable stages add up over calls; assemble and verdict redo their whole work
            before = info["seconds"].get(stage, 0.0) if stage in ("pretrain", "measure") else 0.0
            info["seconds"][stage] = before + time.monotonic() - t0
            info["load_end"] = os.getloadavg()
            _write_json(info_path, info)
            if (out / "curves.csv").exists():
                _write_json(out / "manifest.json", info)
    except OutOfTime:
        _write_json(info_path, info)
        log("out of time: rerun the same command to resume")
        return INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
