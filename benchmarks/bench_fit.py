"""Speed and quality of the law fitter. Prints one JSON object.

  python benchmarks/bench_fit.py [--data DIR] [--repeats 5]

Measures, on the fine-tuning scaling benchmark (Lin et al. protocol: sizes {0 as 1e-10,
200, ..., budget} for budgets target/8 ... target/512, target 1,638,400):
  * all 2 x 7 x 30 = 420 rectified fits in one batched call: cold (compile included) and
    warm (best of `repeats`) wall time;
  * fit quality: in-sample log-space RMSE, and the gap to a brute-force reference (256
    starts, every start run to convergence);
  * the same fits through optimistix's LevenbergMarquardt, and through scipy's
    least_squares as its users run it (numpy residuals, the analytic Jacobian, MINPACK's
    Levenberg-Marquardt, one curve at a time, the same starts): interleaved rounds, the
    time ratio per round, and whether it reaches the same optima;
  * warm time for 3,000 synthetic candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from _common import interleaved, load_average

TARGET = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)


def _read(path: Path):
    from lensllm_jax.data.curves import read_curve_table

    return read_curve_table(path)


def lin_batch(tables):
    """(420, S) sizes, losses and masks: every dataset x budget x model as one row."""
    d_rows, l_rows, m_rows, tags = [], [], [], []
    for t in tables:
        d = np.concatenate([[1e-10], t.sizes])
        losses = np.column_stack([t.zero_shot, t.losses])
        for ratio in RATIOS:
            use = d <= TARGET / ratio
            for i in range(t.num_models):
                d_rows.append(d)
                l_rows.append(losses[i])
                m_rows.append(use)
                tags.append((t.name, ratio, t.models[i]))
    return np.array(d_rows), np.array(l_rows), np.array(m_rows), tags


def timed(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return out, cold, min(warm)


def _lae_sig(a, b):
    """logaddexp(a, b) and σ(a − b) = ∂/∂a logaddexp(a, b), numpy."""
    z = np.exp(-np.abs(a - b))
    return np.maximum(a, b) + np.log1p(z), np.where(a >= b, 1.0, z) / (1.0 + z)


def rectified_np(x, log_d):
    """log L̂ of the rectified law B / (F + D^β) + E in raw (log) parameters
    x = (log B, log β, log E, log F), and its analytic Jacobian (S, 4): numpy, the same
    formulas as `laws._rectified_value_and_jac`."""
    u = np.exp(x[1]) * log_d
    a, q = _lae_sig(x[3], u)  # log(F + D^β); q = ∂a/∂log F
    y, s_e = _lae_sig(x[2], x[0] - a)
    s = 1.0 - s_e
    return y, np.stack([s, -s * (1.0 - q) * u, s_e, -s * q], axis=-1)


def scipy_fit(d, l, mask, starts):
    """scipy.optimize.least_squares as its users would write it: numpy residuals, the analytic
    Jacobian, MINPACK's Levenberg-Marquardt (method="lm"); the best of `starts`."""
    from scipy.optimize import least_squares

    log_d, log_l = np.log(d[mask]), np.log(l[mask])
    best = None
    for x0 in starts:
        r = least_squares(
            lambda x: rectified_np(x, log_d)[0] - log_l,
            x0,
            # scipy is untyped: pyright takes jac's type from its default '2-point', but a
            # callable is documented and accepted.
            jac=lambda x: rectified_np(x, log_d)[1],  # pyright: ignore[reportArgumentType]
            method="lm",
        )
        if best is None or r.cost < best.cost:
            best = r
    if best is None:
        raise ValueError("scipy_fit: no starting points (--starts must be at least 1)")
    return best


def scipy_all(d, l, mask, starts):
    """Every fit with scipy, one curve at a time: (mean squared log residual per fit)."""
    out = np.empty(len(d))
    for i in range(len(d)):
        r = scipy_fit(d[i], l[i], mask[i], starts[i])
        out[i] = 2.0 * r.cost / mask[i].sum()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    default = os.environ.get("LENSLLM_DATA", str(Path(__file__).parents[2] / "shared/data/fts"))
    ap.add_argument("--data", default=default)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--starts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds ours / scipy")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from lensllm_jax.benchmark import ablations
    from lensllm_jax.core import fit

    tables = [_read(Path(args.data) / f"{n}.csv") for n in ("flan", "gigaword")]
    d, l, mask, tags = lin_batch(tables)
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "load_average_start": load_average(),
        "num_fits": len(tags),
        "num_starts": args.starts,
    }

    res, cold, warm = timed(
        lambda: fit.fit_law("rectified", d, l, mask=mask, num_starts=args.starts), args.repeats
    )
    status = np.bincount(res.status).tolist()
    out["rectified_420"] = {"cold_s": cold, "warm_s": warm, "status": status}
    for name in ("flan", "gigaword"):
        sel = np.array([t[0] == name for t in tags])
        out["rectified_420"][f"rmse_mean_{name}"] = float(np.nanmean(res.rmse[sel]))

    ref = ablations.fit_law_ablation(
        "rectified", d, l, mask, num_starts=256, explore_steps=400, max_steps=400
    )
    gap = (res.loss - ref.loss) / ref.loss
    out["quality_vs_256_starts"] = {
        "frac_within_1e-6": float(np.mean(gap <= 1e-6)),
        "worst_relative_gap": float(np.max(gap)),
        "frac_better_than_reference": float(np.mean(gap < -1e-9)),
    }

    resx, coldx, warmx = timed(
        lambda: ablations.fit_law_ablation(
            "rectified", d, l, mask, num_starts=args.starts, solver="optimistix"
        ),
        max(1, args.repeats // 2),
    )
    out["optimistix_420"] = {
        "cold_s": coldx,
        "warm_s": warmx,
        "frac_within_1e-6_of_ours": float(np.mean((resx.loss - res.loss) / res.loss <= 1e-6)),
    }

    # scipy least_squares (analytic Jacobian, MINPACK lm), one curve at a time from the same
    # starting points as ours, on all 420 fits; interleaved rounds, a ratio per round.
    with jax.enable_x64(True):
        starts = np.asarray(
            fit.initial_starts(
                "rectified",
                jnp.asarray(np.log(np.where(mask, d, 1.0))),
                jnp.asarray(np.log(np.where(mask, l, 1.0))),
                jnp.asarray(mask),
                jax.random.PRNGKey(0),
                args.starts,
            )
        )
    ours_msr = res.rmse**2
    scipy_msr = scipy_all(d, l, mask, starts)  # warm-up, and the optima to compare
    gap = (scipy_msr - ours_msr) / ours_msr
    rounds = interleaved(
        {
            "ours": lambda: fit.fit_law("rectified", d, l, mask=mask, num_starts=args.starts),
            "scipy_lm_analytic_jac": lambda: scipy_all(d, l, mask, starts),
        },
        args.rounds,
        reference="ours",
    )
    out["scipy_least_squares_lm"] = {
        "what": "scipy least_squares(method='lm', analytic Jacobian), same starts, all fits",
        "starts": args.starts,
        "rounds": rounds,
        "frac_scipy_within_1e-6_of_ours": float(np.mean(gap <= 1e-6)),
        "frac_ours_within_1e-6_of_scipy": float(np.mean(-gap <= 1e-6)),
        "worst_relative_gap_scipy_minus_ours": float(np.max(gap)),
    }

    # 3,000 synthetic candidates drawn around the benchmark's own fits.
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(tags), 3000)
    d_syn, m_syn = d[pick], mask[pick]
    l_syn = l[pick] * np.exp(rng.normal(0, 0.005, l[pick].shape))
    _, cold3, warm3 = timed(
        lambda: fit.fit_law("rectified", d_syn, l_syn, mask=m_syn, num_starts=args.starts),
        max(1, args.repeats // 2),
    )
    out["synthetic_3000"] = {"cold_s": cold3, "warm_s": warm3}
    out["load_average_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
