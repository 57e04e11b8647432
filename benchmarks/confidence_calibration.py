"""How well calibrated LensLLM's "how sure" is on the fine-tuning scaling benchmark.

For every dataset, pseudo-target (1,638,400 / 819,200 / 409,600 / 204,800) and budget ratio
(8..512, budget >= 800) LensLLM ranks the 30 models; `confidence` turns each ranking into
P(best) and P(i beats j) with σ = c · log₂(target / budget). Printed as JSON:

- the per-doubling scale c that minimises the pairwise log loss per dataset and pooled;
- leave-one-dataset-out: c fitted on one dataset, log loss on the other, next to the
  other's own optimum and to the shipped constant;
- pairwise reliability (stated confidence vs how often the favoured model won) per dataset;
- the top pick's mean P(best) vs its hit rate, and how often the 90 % credible set holds the
  truly best model.

    python benchmarks/confidence_calibration.py [--data DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
import warnings

import numpy as np

from lensllm_jax.benchmark import calibration
from lensllm_jax.benchmark.download import resolve_data
from lensllm_jax.data.curves import read_curve_tables
from lensllm_jax.selection import confidence

BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0 + 1e-9)


def _cols(rankings):
    return (
        [r.log_pred for r in rankings],
        [r.log_true for r in rankings],
        [r.doublings for r in rankings],
    )


def _reliability(rankings, c):
    conf, won = [], []
    for r in rankings:
        ok = np.isfinite(r.log_pred) & np.isfinite(r.log_true)
        mu, truth = r.log_pred[ok], r.log_true[ok]
        p = confidence.prob_beats(mu, c * r.doublings)
        i, j = np.triu_indices(mu.size, 1)
        p_ij, y = p[i, j], truth[i] < truth[j]
        fav = p_ij >= 0.5
        conf.append(np.where(fav, p_ij, 1 - p_ij))
        won.append(np.where(fav, y, ~y))
    conf, won = np.concatenate(conf), np.concatenate(won)
    rows = []
    for lo, hi in itertools.pairwise(BINS):
        m = (conf >= lo) & (conf < hi)
        if m.any():
            rows.append(
                {
                    "bin": [lo, round(min(hi, 1.0), 2)],
                    "pairs": int(m.sum()),
                    "stated": round(float(conf[m].mean()), 4),
                    "observed": round(float(won[m].mean()), 4),
                }
            )
    return rows


def _top_pick(rankings, c):
    p_top, hit, covered, set_size, realised = [], [], [], [], []
    for r in rankings:
        ok = np.isfinite(r.log_pred) & np.isfinite(r.log_true)
        mu, truth = r.log_pred[ok], r.log_true[ok]
        conf = confidence.confidence(np.exp(mu), r.budget, r.target, per_doubling=c)
        pick, best = int(np.argmin(mu)), int(np.argmin(truth))
        p_top.append(conf.p_best[pick])
        hit.append(pick == best)
        covered.append(bool(conf.in_credible_set[best]))
        set_size.append(int(conf.in_credible_set.sum()))
        realised.append(truth[pick] - truth[best])
    return {
        "rankings": len(rankings),
        "top_pick_mean_p_best": round(float(np.mean(p_top)), 4),
        "top_pick_hit_rate": round(float(np.mean(hit)), 4),
        "credible_set_90_covers_best": round(float(np.mean(covered)), 4),
        "credible_set_90_mean_size": round(float(np.mean(set_size)), 2),
        "top_pick_mean_realised_regret_log_loss": round(float(np.mean(realised)), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", help="FTS csv or directory")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    tables = [
        t for t in read_curve_tables(resolve_data(args.data)) if t.name in ("flan", "gigaword")
    ]
    by_ds = {t.name: calibration.calibration_rankings(t) for t in tables}
    pooled = [r for rs in by_ds.values() for r in rs]
    c_shipped = confidence.ERROR_PER_DOUBLING
    out = {
        "what": "LensLLM ranking confidence calibration on the FTS benchmark",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "c_shipped": c_shipped,
        "c_optimal": {
            **{
                ds: round(calibration.calibrate_per_doubling(*_cols(rs)), 5)
                for ds, rs in by_ds.items()
            },
            "pooled": round(calibration.calibrate_per_doubling(*_cols(pooled)), 5),
        },
        "leave_one_dataset_out": {},
        "per_dataset": {},
    }
    for ds, rs in by_ds.items():
        others = [r for o, ors in by_ds.items() if o != ds for r in ors]
        if others:
            c_other = calibration.calibrate_per_doubling(*_cols(others))
            out["leave_one_dataset_out"][ds] = {
                "c_from_others": round(c_other, 5),
                "log_loss_with_c_from_others": round(
                    calibration.pairwise_log_loss(*_cols(rs), c_other), 4
                ),
                "log_loss_with_own_optimum": round(
                    calibration.pairwise_log_loss(*_cols(rs), out["c_optimal"][ds]), 4
                ),
                "log_loss_with_shipped_c": round(
                    calibration.pairwise_log_loss(*_cols(rs), c_shipped), 4
                ),
                "log_loss_coin_flip": round(math.log(2), 4),
            }
        out["per_dataset"][ds] = {
            "reliability_shipped_c": _reliability(rs, c_shipped),
            **_top_pick(rs, c_shipped),
        }
    out["pooled"] = _top_pick(pooled, c_shipped)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
