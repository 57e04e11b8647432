"""The reliability report of LensLLM's "how sure", and the robustness of its selection.

For every dataset (FLAN, Gigaword), pseudo-target (1,638,400 / 819,200 / 409,600 /
204,800) and budget ratio (8..512, budget >= 800) LensLLM ranks the 30 models and
`confidence.assess` states P(best), P(i beats j) and the 90 % credible set. Printed as JSON
(`--out` also writes it):

- `error_model`: the pairwise-optimal scale c per dataset (with the candidates' own
  variances), the shipped prior c₀ (their maximum) and the in-data ĉ per budget;
- `before`: the previously shipped model (c = 0.0145 for all, no in-data scale, no
  per-candidate variance), in-sample;
- `in_sample`: the shipped model, prior from both datasets;
- `leave_one_dataset_out`: the prior calibrated on the other dataset only, with and
  without the in-data scale (`prior_only`): coverage and size of the 90 % set per
  pseudo-target and budget, pairwise reliability diagram and its worst bin, P(best)
  reliability, the top pick's P(best) against its hit rate;
- `family_correlation`: the within-family correlation of the errors, and what modelling it
  (a one-factor-per-family Gaussian, Monte Carlo) changes;
- `stress`: "unseen-like" tasks made from each dataset, prior from the other: random
  20-of-30 model subsets, 0.3 % and 1 % multiplicative noise on every loss, and a harder
  task L -> L^2.4 (every log-loss error x ~2.4, the scale ratio the issue measured on a
  task never seen here), with and without the in-data scale;
- `robustness`: LensLLM against AtS at the official target (7-budget means of PearCorr,
  RelAcc, Kendall τ): win, tie and loss rates and the mean difference over replicates under
  0.3 % and 1 % noise and over random 20-of-30 subsets; `robustness_before`: the same for
  LensLLM as shipped before the shared residual and the between-method variance
  (`fused_fit(common_passes=0, heterogeneity=False)`), same replicates.

    python benchmarks/confidence_calibration.py [--data DIR] [--reps N] [--quick]
        [--robustness-only] [--out F]

`--quick` skips `stress` and `robustness` (the notebook's figure needs neither);
`--robustness-only` runs only `robustness` and `robustness_before` (~3 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
import types
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax.benchmark import calibration, metrics
from lensllm_jax.benchmark.download import resolve_data
from lensllm_jax.data.curves import CurveTable, read_curve_tables
from lensllm_jax.selection import _fusion, baselines, confidence, lensllm

DATASETS = ("flan", "gigaword")
BEFORE_C = 0.0145  # the scale shipped before this report (one σ for all, no in-data term)
HARDER_POWER = 2.4


def _tables(data) -> dict[str, CurveTable]:
    return {t.name: t for t in read_curve_tables(resolve_data(data)) if t.name in DATASETS}


def _short(rep: dict) -> dict:
    """The headline numbers of a `calibration.reliability_report`."""
    keys = (
        "rankings",
        "mean_per_doubling_used",
        "pairwise_log_loss",
        "credible_set_coverage",
        "credible_set_mean_size",
        "top_pick_mean_p_best",
        "top_pick_hit_rate",
        "pairwise_worst_bin",
    )
    out = {k: rep[k] for k in keys}
    out["by_target"] = rep["by_target"]
    return out


def _before(rankings) -> dict:
    """The previous model: σ = 0.0145·k for every candidate."""
    plain = [r._replace(log_var=np.zeros_like(r.log_var), in_data=math.nan) for r in rankings]
    return _short(calibration.reliability_report(plain, BEFORE_C, in_data=False))


# --------------------------------------------------------------------------- correlations


def _family_correlation(rankings, prior: float, draws: int = 20_000) -> dict:
    """Within-family correlation of the standardised, centred errors, and the coverage,
    set size and pairwise log loss when P(best) models it (ε_m = σ_m(√ρ u_f + √(1−ρ) z_m))
    next to the independent model (same Monte Carlo draws)."""
    num, den_same, prods_same, prods_other = 0.0, 0, [], []
    for r in rankings:
        conf = calibration.ranking_confidence(r, prior)
        z = (r.log_true - r.log_pred) / conf.sigmas
        z = z - z.mean()
        fam = np.asarray(r.families)
        i, j = np.triu_indices(z.size, 1)
        same = fam[i] == fam[j]
        prods_same.append(z[i][same] * z[j][same])
        prods_other.append(z[i][~same] * z[j][~same])
        num += float(np.sum(z * z))
        den_same += z.size
    var = num / den_same
    rho = float(np.mean(np.concatenate(prods_same)) - np.mean(np.concatenate(prods_other))) / var
    rho = min(max(rho, 0.0), 0.95)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"within_family_error_correlation": round(rho, 3)}
    for tag, rr in (("independent", 0.0), ("family_factor", rho)):
        covered, size, loss, pairs = [], [], 0.0, 0
        for r in rankings:
            conf = calibration.ranking_confidence(r, prior)
            fam = np.unique(np.asarray(r.families), return_inverse=True)[1]
            eps = conf.sigmas * (
                math.sqrt(rr) * rng.standard_normal((draws, fam.max() + 1))[:, fam]
                + math.sqrt(1 - rr) * rng.standard_normal((draws, fam.size))
            )
            p = np.bincount(np.argmin(r.log_pred + eps, axis=1), minlength=fam.size) / draws
            keep = confidence.credible_set(p)
            covered.append(bool(keep[np.argmin(r.log_true)]))
            size.append(int(keep.sum()))
            i, j = np.triu_indices(fam.size, 1)
            s2 = conf.sigmas**2
            cov = np.where(fam[i] == fam[j], rr, 0.0) * conf.sigmas[i] * conf.sigmas[j]
            from scipy.special import log_ndtr

            zz = (r.log_pred[j] - r.log_pred[i]) / np.sqrt(s2[i] + s2[j] - 2 * cov)
            y = r.log_true[i] < r.log_true[j]
            loss -= float(np.sum(np.where(y, log_ndtr(zz), log_ndtr(-zz))))
            pairs += i.size
        out[tag] = {
            "credible_set_coverage": round(float(np.mean(covered)), 4),
            "credible_set_mean_size": round(float(np.mean(size)), 2),
            "pairwise_log_loss": round(loss / pairs, 4),
        }
    return out


# --------------------------------------------------------------------------- perturbations


def subset(table: CurveTable, idx: np.ndarray) -> CurveTable:
    """The table restricted to the models `idx`."""
    idx = np.sort(np.asarray(idx))
    return dataclasses.replace(
        table,
        models=tuple(table.models[i] for i in idx),
        losses=table.losses[idx],
        zero_shot=table.zero_shot[idx],
        n_params=np.asarray(table.n_params)[idx],
        families=tuple(table.families[i] for i in idx),
        loss_se=None if table.loss_se is None else table.loss_se[idx],
        ntk=None,
    )


def noisy(table: CurveTable, rel: float, rng: np.random.Generator) -> CurveTable:
    """Every loss (zero-shot and target columns included) times exp(rel · N(0, 1))."""
    return dataclasses.replace(
        table,
        losses=table.losses * np.exp(rel * rng.standard_normal(table.losses.shape)),
        zero_shot=table.zero_shot * np.exp(rel * rng.standard_normal(table.zero_shot.shape)),
    )


def powered(table: CurveTable, gamma: float) -> CurveTable:
    """L -> L^γ: the same rankings with every log-loss difference and error scaled by γ."""
    return dataclasses.replace(table, losses=table.losses**gamma, zero_shot=table.zero_shot**gamma)


def _variants(table: CurveTable, reps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield "subset_20_of_30", subset(table, rng.choice(table.num_models, 20, replace=False))
    for rel in (0.003, 0.01):
        for _ in range(reps):
            yield f"noise_{rel:g}", noisy(table, rel, rng)
    yield f"harder_power_{HARDER_POWER:g}", powered(table, HARDER_POWER)


def stress(tables, priors, reps: int) -> dict:
    out: dict = {}
    for name, table in tables.items():
        groups: dict[str, list] = {}
        for tag, t in _variants(table, reps, seed=1):
            groups.setdefault(tag, []).extend(calibration.calibration_rankings(t))
        out[name] = {}
        for tag, rs in groups.items():
            cell = {}
            for mode, use in (("with_in_data", True), ("prior_only", False)):
                rep = calibration.reliability_report(rs, priors[name], in_data=use)
                cell[mode] = {
                    "rankings": rep["rankings"],
                    "credible_set_coverage": rep["credible_set_coverage"],
                    "credible_set_mean_size": rep["credible_set_mean_size"],
                    "min_coverage_over_targets": min(
                        v["coverage"] for v in rep["by_target"].values()
                    ),
                    "coverage_by_target": {k: v["coverage"] for k, v in rep["by_target"].items()},
                    "pairwise_log_loss": rep["pairwise_log_loss"],
                    "top_pick_mean_p_best": rep["top_pick_mean_p_best"],
                    "top_pick_hit_rate": rep["top_pick_hit_rate"],
                    "mean_per_doubling_used": rep["mean_per_doubling_used"],
                }
            out[name][tag] = cell
    return out


# --------------------------------------------------------------------------- robustness

TARGET = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)
METRIC_NAMES = ("PearCorr", "RelAcc", "KendallTau")


def _per_budget(table: CurveTable, method) -> tuple[np.ndarray, np.ndarray]:
    """((len(RATIOS), 3) PearCorr, RelAcc, Kendall τ at each budget T/r, (len(RATIOS), M)
    log predicted losses) of `method` towards the official target."""
    truth = table.column(TARGET)
    vals, logs = [], []
    for r in RATIOS:
        s = np.asarray(method(table, TARGET / r, TARGET).scores, np.float64)
        vals.append(
            (
                metrics.pearson_percent(s, truth),
                metrics.relacc_percent(s, truth),
                metrics.kendall_tau_percent(s, truth),
            )
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            logs.append(np.log(s))
    return np.array(vals), np.array(logs)


def _verdict(mean: float, se: float) -> str:
    """'win' / 'loss' when the mean difference is more than 2 standard errors from 0, else
    'tie' (the replicates cannot tell the two methods apart)."""
    if mean > 2 * se:
        return "win"
    if mean < -2 * se:
        return "loss"
    return "tie"


def lensllm_before(table: CurveTable, budget: float, target: float) -> types.SimpleNamespace:
    """LensLLM as shipped before issue 11's robustness pass: no shared residual removed, no
    between-method variance (`_fusion.fused_fit(common_passes=0, heterogeneity=False)`)."""
    pred, _, _ = _fusion.fused_predict(table, budget, target, common_passes=0, heterogeneity=False)
    return types.SimpleNamespace(scores=pred)


def robustness(tables, reps: int, method=lensllm.lensllm) -> dict:
    """LensLLM − AtS on the 7-budget means, per replicate: win rate (difference > 0), tie
    and loss rates (|difference| <= 1e-9, < 0), mean difference (± its standard error) and
    its `verdict` (`_verdict`), for each perturbation and dataset; `by_budget`: the mean
    difference at each budget ratio (where a 7-budget difference comes from); for the noise
    perturbations `prediction_spread`: per budget, the standard deviation over replicates
    of each model's log predicted loss, averaged over models, for both methods (how far the
    same noise moves each method's predictions), and `noisy_minus_unperturbed`: each
    method's 7-budget mean over the noisy copies minus its score on the data as they are.
    The replicates depend only on the seed, not on `method`, so two methods' tables are
    paired."""
    out: dict = {}
    for name, table in tables.items():
        clean = _diff(table, method)
        out[name] = {"unperturbed": dict(zip(METRIC_NAMES, clean.mean_diff(), strict=True))}
        rng = np.random.default_rng(2)
        conds = {
            "noise_0.003": lambda t, rng=rng: noisy(t, 0.003, rng),
            "noise_0.01": lambda t, rng=rng: noisy(t, 0.01, rng),
            "subset_20_of_30": lambda t, rng=rng: subset(
                t, rng.choice(t.num_models, 20, replace=False)
            ),
        }
        for tag, make in conds.items():
            runs = [_diff(make(table), method) for _ in range(reps)]
            per_budget = np.array([r.per_budget for r in runs])  # (reps, R, 3)
            d = per_budget.mean(axis=1)
            cell: dict = {}
            for k, m in enumerate(METRIC_NAMES):
                mean, se = float(d[:, k].mean()), float(d[:, k].std(ddof=1) / math.sqrt(reps))
                cell[m] = {
                    "win_rate": round(float(np.mean(d[:, k] > 1e-9)), 3),
                    "tie_rate": round(float(np.mean(np.abs(d[:, k]) <= 1e-9)), 3),
                    "loss_rate": round(float(np.mean(d[:, k] < -1e-9)), 3),
                    "mean_diff": round(mean, 2),
                    "se": round(se, 2),
                    "verdict": _verdict(mean, se),
                    "by_budget": {
                        f"T/{r}": round(float(v), 2)
                        for r, v in zip(RATIOS, per_budget[:, :, k].mean(axis=0), strict=True)
                    },
                }
            if tag.startswith("noise"):
                spread = {}
                for j, who in enumerate(("LensLLM", "AtS")):
                    logs = np.array([r.logs[j] for r in runs])  # (reps, R, M)
                    sd = np.nanmean(logs.std(axis=0, ddof=1), axis=1)
                    spread[who] = {
                        f"T/{r}": round(float(v), 5) for r, v in zip(RATIOS, sd, strict=True)
                    }
                cell["prediction_spread"] = spread
                # each method's mean over the noisy copies minus its score on the data as
                # they are: a method chosen on the unperturbed data loses its luck here
                cell["noisy_minus_unperturbed"] = {
                    who: dict(
                        zip(
                            METRIC_NAMES,
                            np.round(
                                np.mean([getattr(r, side).mean(axis=0) for r in runs], axis=0)
                                - getattr(clean, side).mean(axis=0),
                                2,
                            ).tolist(),
                            strict=True,
                        )
                    )
                    for who, side in (("LensLLM", "ours"), ("AtS", "theirs"))
                }
            out[name][tag] = cell
    return out


class _Paired(NamedTuple):
    """`method` against AtS on one table: their metrics at each budget and log predictions."""

    ours: np.ndarray  # (R, 3) PearCorr, RelAcc, Kendall τ at each budget
    theirs: np.ndarray
    logs: tuple[np.ndarray, np.ndarray]  # (method's, AtS's) (R, M) log predicted losses

    @property
    def per_budget(self) -> np.ndarray:  # (R, 3) method − AtS
        return self.ours - self.theirs

    def mean_diff(self) -> list[float]:  # the 7-budget mean differences, rounded
        return [round(float(v), 3) for v in self.per_budget.mean(axis=0)]


def _diff(table: CurveTable, method) -> _Paired:
    ours, our_logs = _per_budget(table, method)
    theirs, their_logs = _per_budget(table, baselines.ats)
    return _Paired(ours, theirs, (our_logs, their_logs))


# --------------------------------------------------------------------------- main


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def robustness_report(data=None, *, robust_reps: int = 100) -> dict:
    """`robustness` of LensLLM as shipped and as shipped before (`lensllm_before`)."""
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    tables = _tables(data)
    return {
        "machine": _machine(),
        "robustness": robustness(tables, robust_reps),
        "robustness_before": robustness(tables, robust_reps, method=lensllm_before),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def report(data=None, *, reps: int = 20, robust_reps: int = 100, quick: bool = False) -> dict:
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    tables = _tables(data)
    by_ds = {n: calibration.calibration_rankings(t) for n, t in tables.items()}
    optimum = {
        n: calibration.calibrate_per_doubling(
            [r.log_pred for r in rs],
            [r.log_true for r in rs],
            [r.doublings for r in rs],
            [r.log_var for r in rs],
        )
        for n, rs in by_ds.items()
    }
    c0 = calibration.benchmark_per_doubling(by_ds)
    other = {n: max(optimum[o] for o in by_ds if o != n) for n in by_ds if len(by_ds) > 1}
    out: dict = {
        "what": "LensLLM ranking confidence: reliability report on the FTS benchmark",
        "machine": _machine(),
        "error_model": {
            "pairwise_optimal_per_doubling": {n: round(c, 5) for n, c in optimum.items()},
            "prior_per_doubling_c0": round(c0, 5),
            "shipped_per_doubling": confidence.ERROR_PER_DOUBLING,
            "prior_dof": confidence.PRIOR_DOF,
            "in_data_per_doubling_by_budget": {
                n: {f"{r.budget:.0f}": round(r.in_data, 5) for r in rs if math.isfinite(r.in_data)}
                for n, rs in by_ds.items()
            },
        },
        "before": {n: _before(rs) for n, rs in by_ds.items()},
        "in_sample": {
            n: calibration.reliability_report(rs, confidence.ERROR_PER_DOUBLING)
            for n, rs in by_ds.items()
        },
        "leave_one_dataset_out": {},
    }
    for n, rs in by_ds.items():
        if n not in other:
            continue
        out["leave_one_dataset_out"][n] = {
            "prior_from_other": round(other[n], 5),
            "with_in_data": calibration.reliability_report(rs, other[n]),
            "prior_only": _short(calibration.reliability_report(rs, other[n], in_data=False)),
        }
    out["family_correlation"] = {
        n: _family_correlation(rs, confidence.ERROR_PER_DOUBLING) for n, rs in by_ds.items()
    }
    if not quick and other:
        out["stress"] = stress(tables, other, reps)
        out["robustness"] = robustness(tables, robust_reps)
        out["robustness_before"] = robustness(tables, robust_reps, method=lensllm_before)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data", action="append", help="FTS csv or directory")
    parser.add_argument("--reps", type=int, default=20, help="stress replicates per kind")
    parser.add_argument("--robust-reps", type=int, default=100, help="robustness replicates")
    parser.add_argument("--quick", action="store_true", help="skip stress and robustness")
    parser.add_argument(
        "--robustness-only", action="store_true", help="only LensLLM vs AtS robustness"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.robustness_only:
        out = robustness_report(args.data, robust_reps=args.robust_reps)
    else:
        out = report(args.data, reps=args.reps, robust_reps=args.robust_reps, quick=args.quick)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
