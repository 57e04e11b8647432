"""The verdict: does an arm with the NTK spectrum predict the zoo's full-size fine-tuned loss
better than the curve-only law and than its own shuffled control?

For every arm (`ARMS`) and budget (the sizes <= full/ratio are visible), on the seed-mean
curves (`curves.csv`, the last size column is the ground truth): PearCorr, Kendall τ and
RelAcc of the ranking (`benchmark.metrics`) and the log-RMSE of the predicted full-size loss,
sqrt(mean_m (log L̂_m − log L_m)²) over the arm's fitted candidates.

Intervals: a two-level bootstrap. Each replicate draws, per candidate, its seeds with
replacement (`curves_by_seed.csv`) and averages them into a new table (visible curve AND
ground truth), runs every arm on it (the shuffled controls with a fresh derangement each
time), then draws the candidates with replacement for the metrics (the arms that pool
across candidates were fitted on the replicate's whole set: the candidate draw is
conditional on the fits). Reported: the point estimate, the 2.5/97.5 % percentiles, and
paired differences against the curve-only arms and the controls (same replicates).

Decision rule (issue 9): the spectrum stays in the default ranking only if a spectrum arm
(D or F) beats both A (LensLLM and LensLLM-law) and its shuffled control E, i.e. the 95 %
interval of the paired difference lies above 0 (below for log-RMSE), on a metric at every
budget. Otherwise the default stays curve-only.

    python benchmarks/zoo/verdict.py benchmarks/zoo/results/cpu --bootstrap 200
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.benchmark import metrics
from lensllm_jax.data.curves import CurveTable, read_curve_table
from lensllm_jax.data.spectra import read_spectra, with_spectra
from lensllm_jax.selection import ntk_arms
from lensllm_jax.selection.registry import METHODS

# arm -> (registry name, group); group: A curve-only, B/C cap, D/F spectrum, E control.
ARMS: dict[str, tuple[str, str]] = {
    "ZeroShot": ("ZeroShot", "baseline"),
    "SubTuning": ("SubTuning", "baseline"),
    "AtS": ("AtS", "baseline"),
    "LensLLM": ("LensLLM", "A"),
    "LensLLM-law": ("LensLLM-law", "A"),
    "LensLLM-NTK": ("LensLLM-NTK", "B"),
    "LensLLM-cap": ("LensLLM-cap", "C"),
    "LensLLM-NTK-steps": ("LensLLM-NTK-steps", "D"),
    "LensLLM-NTK-steps-F0": ("LensLLM-NTK-steps-F0", "D"),
    "LensLLM-NTK-steps-lr": ("LensLLM-NTK-steps-lr", "D"),
    "LensLLM-NTK-steps-rate": ("LensLLM-NTK-steps-rate", "D"),
    "LensLLM-kernel": ("LensLLM-kernel", "F"),
    "LensLLM-kernel-nosize": ("", "F"),
    "LensLLM-NTK-steps-shuffled": ("LensLLM-NTK-steps-shuffled", "E"),
    "LensLLM-NTK-steps-F0-shuffled": ("LensLLM-NTK-steps-F0-shuffled", "E"),
    "LensLLM-NTK-steps-lr-shuffled": ("LensLLM-NTK-steps-lr-shuffled", "E"),
    "LensLLM-NTK-steps-rate-shuffled": ("LensLLM-NTK-steps-rate-shuffled", "E"),
    "LensLLM-kernel-shuffled": ("LensLLM-kernel-shuffled", "E"),
    "LensLLM-kernel-nosize-shuffled": ("", "E"),
}
CONTROL = {
    "LensLLM-NTK-steps": "LensLLM-NTK-steps-shuffled",
    "LensLLM-NTK-steps-F0": "LensLLM-NTK-steps-F0-shuffled",
    "LensLLM-NTK-steps-lr": "LensLLM-NTK-steps-lr-shuffled",
    "LensLLM-NTK-steps-rate": "LensLLM-NTK-steps-rate-shuffled",
    "LensLLM-kernel": "LensLLM-kernel-shuffled",
    "LensLLM-kernel-nosize": "LensLLM-kernel-nosize-shuffled",
}
CURVE_ONLY = ("LensLLM", "LensLLM-law")
METRIC_NAMES = ("PearCorr", "KendallTau", "RelAcc", "logRMSE")
HIGHER = {"PearCorr": True, "KendallTau": True, "RelAcc": True, "logRMSE": False}


def _arm_fn(arm: str, rng: np.random.Generator | None) -> Callable[..., Any]:
    """The arm's selection function; a shuffled control gets a fresh derangement from `rng`."""
    if arm == "LensLLM-law":  # arm A's law alone: not a registered method
        return ntk_arms.lensllm_law
    nosize = functools.partial(ntk_arms.kernel_trend, with_size=False)
    if arm == "LensLLM-kernel-nosize":  # F with the summaries instead of log(size)
        return nosize
    if rng is None and arm == "LensLLM-kernel-nosize-shuffled":  # the seed-0 derangement

        def fixed(table: CurveTable, budget: float, target: float):
            return nosize(table, budget, target, permutation=ntk_arms.derangement(table.num_models))

        return fixed
    if rng is None or ARMS[arm][1] != "E":
        return METHODS[ARMS[arm][0]]

    def shuffled(table: CurveTable, budget: float, target: float):
        p = ntk_arms.derangement(table.num_models, int(rng.integers(2**31)))
        if arm == "LensLLM-kernel-shuffled":
            return ntk_arms.kernel_trend(table, budget, target, permutation=p)
        if arm == "LensLLM-kernel-nosize-shuffled":
            return nosize(table, budget, target, permutation=p)
        fit_f0 = arm == "LensLLM-NTK-steps-F0-shuffled"
        fit_rate = arm == "LensLLM-NTK-steps-rate-shuffled"
        plain_lr = arm == "LensLLM-NTK-steps-lr-shuffled"
        return ntk_arms.ntk_steps(
            table,
            budget,
            target,
            fit_f0=fit_f0,
            fit_rate=fit_rate,
            plain_lr=plain_lr,
            permutation=p,
        )

    return shuffled


def metric_values(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PearCorr, Kendall τ, RelAcc (percent) and log-RMSE of the predicted losses."""
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s) & (s > 0)
    with np.errstate(all="ignore"):
        rmse = (
            float(np.sqrt(np.mean((np.log(s[ok]) - np.log(truth[ok])) ** 2)))
            if ok.any()
            else np.nan
        )
    return {
        "PearCorr": metrics.pearson_percent(s, truth),
        "KendallTau": metrics.kendall_tau_percent(s, truth),
        "RelAcc": metrics.relacc_percent(s, truth),
        "logRMSE": rmse,
    }


def _by_seed(path: Path, table: CurveTable) -> np.ndarray:
    """(M, K, S + 1) per-seed losses: the zero-shot column, then every size column."""
    rows: dict[str, list[list[float]]] = {}
    with open(path) as fh:
        reader = csv.reader(fh)
        next(reader)
        for r in reader:
            rows.setdefault(r[0], []).append([float(x) for x in r[2:]])
    return np.asarray([rows[m] for m in table.models], np.float64)


def _table_from(base: CurveTable, losses: np.ndarray) -> CurveTable:
    import dataclasses

    return dataclasses.replace(base, zero_shot=losses[:, 0], losses=losses[:, 1:], loss_se=None)


def evaluate_arms(
    table: CurveTable, ratios: list[int], arms: list[str], rng: np.random.Generator | None
) -> dict[str, dict[int, np.ndarray]]:
    """arm -> ratio -> (M,) predicted full-size losses (NaN where the fit failed)."""
    full = float(table.sizes[-1])
    visible = table.up_to(float(table.sizes[-2]))
    out: dict[str, dict[int, np.ndarray]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arm in arms:
            fn = _arm_fn(arm, rng)
            out[arm] = {}
            for r in ratios:
                sel = fn(visible, full / r, full)
                out[arm][r] = np.asarray(sel.scores, np.float64)
    return out


def run(
    folder: Path,
    ratios: list[int],
    n_boot: int,
    *,
    arms: list[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write folder/verdict.json and return it (see the module docstring)."""
    folder = Path(folder)
    arms = list(arms or ARMS)
    base = read_curve_table(folder / "curves.csv")
    base = with_spectra(base, read_spectra(folder / "ntk_features.csv"))
    seeds = _by_seed(folder / "curves_by_seed.csv", base)  # (M, K, S + 1)
    full = float(base.sizes[-1])
    t0 = time.monotonic()
    point = evaluate_arms(base, ratios, arms, None)
    truth = base.losses[:, -1]
    m, k = seeds.shape[:2]
    rng = np.random.default_rng(seed)
    boot: dict[str, dict[int, list[dict[str, float]]]] = {a: {r: [] for r in ratios} for a in arms}
    for b in range(n_boot):
        pick = rng.integers(0, k, size=(m, k))
        losses = np.take_along_axis(seeds, pick[:, :, None], axis=1).mean(axis=1)
        tb = _table_from(base, losses)
        preds = evaluate_arms(tb, ratios, arms, rng)
        idx = rng.integers(0, m, size=m)
        for a in arms:
            for r in ratios:
                boot[a][r].append(metric_values(preds[a][r][idx], tb.losses[idx, -1]))
        if (b + 1) % 10 == 0:
            log(f"verdict: bootstrap {b + 1}/{n_boot} ({time.monotonic() - t0:.0f} s)")
    result: dict[str, Any] = {
        "target": full,
        "budgets": {str(r): full / r for r in ratios},
        "bootstrap": n_boot,
        "interval": [2.5, 97.5],
        "models": list(base.models),
        "truth": truth.tolist(),
        "arms": {},
        "differences": {},
        "predictions": {a: {str(r): point[a][r].tolist() for r in ratios} for a in arms},
    }
    for a in arms:
        result["arms"][a] = {"group": ARMS[a][1]}
        for r in ratios:
            pt = metric_values(point[a][r], truth)
            cell: dict[str, Any] = {"failed": int(np.sum(~np.isfinite(point[a][r])))}
            for name in METRIC_NAMES:
                vals = np.array([x[name] for x in boot[a][r]])
                vals = vals[np.isfinite(vals)]
                lo, hi = np.percentile(vals, [2.5, 97.5]) if vals.size else (np.nan, np.nan)
                cell[name] = {"value": pt[name], "lo": float(lo), "hi": float(hi)}
            result["arms"][a][str(r)] = cell
    pairs = [(a, b) for a in CONTROL for b in (*CURVE_ONLY, CONTROL[a])]
    pairs += [("LensLLM-NTK", "LensLLM-cap"), ("LensLLM-NTK", "LensLLM-law")]
    for a, b in pairs:
        if a not in arms or b not in arms:
            continue
        key = f"{a} - {b}"
        result["differences"][key] = {}
        for r in ratios:
            cell = {}
            for name in METRIC_NAMES:
                d = np.array(
                    [x[name] - y[name] for x, y in zip(boot[a][r], boot[b][r], strict=True)]
                )
                d = d[np.isfinite(d)]
                pt = (
                    metric_values(point[a][r], truth)[name]
                    - metric_values(point[b][r], truth)[name]
                )
                lo, hi = np.percentile(d, [2.5, 97.5]) if d.size else (np.nan, np.nan)
                better = (lo > 0) if HIGHER[name] else (hi < 0)
                worse = (hi < 0) if HIGHER[name] else (lo > 0)
                cell[name] = {
                    "value": pt,
                    "lo": float(lo),
                    "hi": float(hi),
                    "better": bool(better),
                    "worse": bool(worse),
                }
            result["differences"][key][str(r)] = cell
    result["decision"] = decide(result, ratios)
    result["seconds"] = time.monotonic() - t0
    result["load"] = os.getloadavg()
    tmp = folder / "verdict.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / "verdict.json")
    log(f"verdict: {result['decision']['summary']}")
    return result


def decide(result: dict[str, Any], ratios: list[int]) -> dict[str, Any]:
    """Which spectrum arm (if any) beats both curve-only arms and its control on a metric
    at every budget (paired 95 % intervals)."""
    winners = []
    for arm, control in CONTROL.items():
        for name in METRIC_NAMES:
            ok = True
            for other in (*CURVE_ONLY, control):
                cells = result["differences"].get(f"{arm} - {other}")
                if cells is None or not all(cells[str(r)][name]["better"] for r in ratios):
                    ok = False
            if ok:
                winners.append({"arm": arm, "metric": name})
    if winners:
        summary = "the spectrum earns its place: " + ", ".join(
            f"{w['arm']} on {w['metric']}" for w in winners
        )
        default = winners[0]["arm"]
    else:
        summary = (
            "no spectrum arm beats both the curve-only law and its shuffled control outside "
            "the intervals at every budget: the default stays curve-only (LensLLM)"
        )
        default = "LensLLM"
    return {"winners": winners, "default": default, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--ratios", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--arms", nargs="+", default=None)
    args = ap.parse_args(argv)
    run(
        args.folder,
        args.ratios,
        args.bootstrap,
        arms=args.arms,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
