"""The plotting module draws exactly the data it is given, into files of the right kind.

Each figure is built from tiny hand-made inputs (a curve table, ranking rows with fitted
parameters, NTK spectra, Hessian measurements), saved, and checked twice: the file (format,
pixel size, a size that is not empty) and the artists read back from the figure (measured
points and error bars, each law's curve and score, the band, the target, P(best) bars, the
NTK's F(Θ, t) against scipy's matrix exponential, the Hessian's traces and AtS boundary).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import expm

pytest.importorskip("matplotlib")
from PIL import Image  # matplotlib's own dependency

from lensllm_jax import plots
from lensllm_jax.data.curves import CurveTable
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.plots.curves import band_sigma, curve_from_details
from lensllm_jax.runner.result import CandidateResult, RunResult
from lensllm_jax.selection.baselines import ats_first_point
from lensllm_jax.selection.confidence import assess
from lensllm_jax.selection.ranking import RankRow

SIZES = np.array([200.0, 400.0, 800.0, 1600.0, 3200.0])
TARGET = 51_200.0
Z90 = 1.6448536269514722
LAW = {"B": [30.0, 25.0, 40.0], "beta": [0.40, 0.35, 0.45], "E": [0.8, 1.0, 0.6]}
F = [12.0, 8.0, 20.0]
NAMES = ("org/alpha", "beta-model", "gamma")


def _table() -> CurveTable:
    b, beta, e, f = (np.array(v)[:, None] for v in (*LAW.values(), F))
    losses = b / (f + SIZES**beta) + e
    return CurveTable(
        name="toy",
        models=NAMES,
        sizes=SIZES,
        losses=losses,
        zero_shot=(b / f + e)[:, 0],
        n_params=np.array([1e8, 3e8, 7e8]),
        families=("a", "b", "c"),
        loss_se=0.01 * losses,
    )


def _rows(table: CurveTable) -> list[RankRow]:
    """LensLLM rows whose details redraw a given extrapolation, and VanillaFit rows."""
    level = np.log(table.losses[:, -1])
    slope = np.array([-0.05, -0.03, -0.08])
    score = np.exp(level + slope * (np.log(TARGET) - np.log(SIZES[-1])))
    p_best = np.array([0.2, 0.05, 0.75])
    order = np.argsort(score)
    rows = []
    for place, i in enumerate(order, start=1):
        details = {k: v[i] for k, v in LAW.items()} | {"F": F[i], "d_top": SIZES[-1]}
        details |= {"level": level[i], "slope": slope[i], "slope_var": 1e-4}
        details |= {"pooled_slope": slope[i], "per_doubling": 0.02, "sigma": 0.1 + 0.01 * i}
        details |= {"var_level": 1e-4, "cov_level_slope": -2e-5, "var_pooled_slope": 3e-5}
        rows.append(RankRow("LensLLM", place, NAMES[i], score[i], "ok", p_best[i], details))
    vanilla = {"B": 9.0, "beta": 0.3, "E": 0.9}
    v_score = 9.0 / TARGET**0.3 + 0.9
    rows += [RankRow("VanillaFit", k + 1, n, v_score, "ok", math.nan, vanilla)
             for k, n in enumerate(NAMES)]  # fmt: skip
    return rows


def _by_gid(fig, gid: str) -> list:
    return fig.findobj(lambda a: a.get_gid() == gid)


def _panel(fig, name: str):
    short = name.split("/")[-1]
    (ax,) = [a for a in fig.get_axes() if a.get_title().split(" · ")[0].endswith(short)]
    return ax


def _of(ax, gid: str) -> list:
    return ax.findobj(lambda a: a.get_gid() == gid)


def _png_ok(path, fig) -> None:
    w, h = fig.get_size_inches() * fig.dpi
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert abs(im.size[0] - round(w)) <= 2 and abs(im.size[1] - round(h)) <= 2
    assert path.stat().st_size > 10_000


def test_curves_draw_the_measured_points_laws_band_and_target(tmp_path):
    table = _table()
    rows = _rows(table)
    fig = plots.selection_figure(table, rows, TARGET)
    fig.set_dpi(72)  # a quicker render; the file follows the figure's dpi
    path = plots.save(fig, tmp_path / "sel.png")
    _png_ok(path, fig)

    for i, name in enumerate(NAMES):
        ax = _panel(fig, name)
        (pts,) = _of(ax, "measured")
        np.testing.assert_array_equal(pts.get_xdata(), SIZES)
        np.testing.assert_array_equal(pts.get_ydata(), table.losses[i])
        # error bars: the segments span loss ± se
        (cont,) = [c for c in ax.containers if c.lines[0] is pts]
        segs = np.array(cont.lines[2][0].get_segments())
        np.testing.assert_allclose(segs[:, 1, 1] - segs[:, 0, 1], 2 * table.loss_se[i])
        (zero,) = _of(ax, "zero-shot")
        assert zero.get_ydata()[0] == table.zero_shot[i]
        (vline,) = _of(ax, "target")
        assert vline.get_xdata()[0] == TARGET
        row = next(r for r in rows if r.method == "LensLLM" and r.model == name)
        # the LensLLM curve ends at the score at the target; its band is the calibrated σ
        (curve,) = _of(ax, "LensLLM:curve")
        assert curve.get_xdata()[0] == SIZES[-1] and curve.get_xdata()[-1] == TARGET
        np.testing.assert_allclose(curve.get_ydata()[-1], row.score, rtol=1e-12)
        (law,) = _of(ax, "LensLLM:law")
        b, beta, e = (LAW[k][i] for k in ("B", "beta", "E"))
        np.testing.assert_allclose(law.get_ydata(), b / (F[i] + law.get_xdata() ** beta) + e)
        (score,) = _of(ax, "LensLLM:score")
        assert score.get_xdata()[0] == TARGET and score.get_ydata()[0] == row.score
        (cont,) = [c for c in ax.containers if c.lines[0] is score]  # the P(best) interval
        seg = cont.lines[2][0].get_segments()[0]
        np.testing.assert_allclose(
            [seg[0][1], seg[1][1]],
            row.score * np.exp(np.array([-Z90, Z90]) * row.details["sigma"]),
            rtol=1e-12,
        )
        # the band: σ² = (c·k)² + var_level + 2·dx·cov + dx²·var_slope + (se/L)² on log L
        (band,) = _of(ax, "LensLLM:band")
        verts = band.get_paths()[0].vertices
        for d in (SIZES[-1] * 4, TARGET):
            dx = math.log(d / SIZES[-1])
            sigma = math.sqrt((0.02 * dx / math.log(2)) ** 2 + 1e-4 - 4e-5 * dx
                              + 3e-5 * dx**2 + 0.01**2)  # fmt: skip
            centre = row.score * math.exp(-row.details["pooled_slope"] * math.log(TARGET / d))
            at = verts[np.isclose(verts[:, 0], d, rtol=1e-12), 1]
            if at.size:  # the grid holds D_top·4 only by chance; the target always
                np.testing.assert_allclose(
                    [at.min(), at.max()],
                    [centre * math.exp(-Z90 * sigma), centre * math.exp(Z90 * sigma)],
                    rtol=1e-9,
                )
            else:
                assert d != TARGET
        (vf,) = _of(ax, "VanillaFit:curve")
        np.testing.assert_allclose(vf.get_ydata(), 9.0 / vf.get_xdata() ** 0.3 + 0.9)

    # the ranking: intervals around each score, P(best) bars, rank 1 on top
    lens = [r for r in rows if r.method == "LensLLM"]
    (interval,) = _by_gid(fig, "interval")
    np.testing.assert_array_equal(interval.get_xdata(), [r.score for r in lens])
    errorbars = [c for a in fig.get_axes() for c in a.containers if hasattr(c, "lines")]
    (cont,) = [c for c in errorbars if c.lines[0] is interval]
    segs = np.array(cont.lines[2][0].get_segments())
    sig = np.array([r.details["sigma"] for r in lens])
    np.testing.assert_allclose(segs[:, 0, 0], [r.score for r in lens] * np.exp(-Z90 * sig))
    bars = _by_gid(fig, "p_best")
    np.testing.assert_allclose([b.get_width() for b in bars], [r.p_best for r in lens])
    # the credible set (0.75 + 0.2 >= 0.9) is filled, the rest is not
    filled = [b.get_facecolor()[3] > 0 and b.get_facecolor()[:3] != (1, 1, 1) for b in bars]
    assert filled == [True, True, False]


def test_formats_sizes_and_bad_names(tmp_path):
    table = _table()
    fig = plots.ranking_figure(_rows(table), TARGET)
    fig.set_dpi(72)
    svg = plots.save(fig, tmp_path / "r.svg").read_bytes()
    pdf = plots.save(fig, tmp_path / "r.pdf").read_bytes()
    assert b"<svg" in svg[:500] and len(svg) > 10_000
    assert pdf.startswith(b"%PDF-") and len(pdf) > 5_000
    # byte-stable: no dates or versions in the file, so the same figure gives the same bytes
    figs = [plots.ranking_figure(_rows(table), TARGET) for _ in range(2)]
    for f in figs:
        f.set_dpi(72)
    png = plots.save(figs[0], tmp_path / "r.png")
    _png_ok(png, figs[0])
    assert plots.save(figs[1], tmp_path / "again.png").read_bytes() == png.read_bytes()
    for bad, message in [("r.jpg", "plot format"), ("no/such/dir/r.png", "does not exist")]:
        with pytest.raises(LensLLMInputError, match=message):
            plots.save(fig, tmp_path / bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "r.pdf", "r.png", "r.svg"]


def _spectrum(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 3 * n)) / np.sqrt(3 * n)
    theta = a @ a.T * (10.0**seed)
    r = rng.uniform(0.5, 2.0, n)
    lam, u = np.linalg.eigh(theta)
    return theta, r, (lam, u.T @ r, 1e-3)


def test_ntk_figure_draws_the_spectrum_and_f_of_t(tmp_path):
    kernels = {f"m{k}": _spectrum(k) for k in range(2)}
    spectra = {k: v[2] for k, v in kernels.items()}
    fig = plots.ntk_figure(spectra, {"m0": 50.0, "m1": 1e-30})
    _png_ok(plots.save(fig, tmp_path / "ntk.png"), fig)
    for name, (theta, r, (lam, _, eta)) in kernels.items():
        (spec,) = _by_gid(fig, f"spectrum:{name}")
        np.testing.assert_allclose(spec.get_ydata(), np.sort(lam)[::-1])
        (f_line,) = _by_gid(fig, f"F:{name}")
        t = f_line.get_xdata()
        for j in (0, len(t) // 3, len(t) // 2):  # scipy's expm, not our eigh
            ref = np.sum((expm(-eta * theta * t[j]) @ r) ** 2)
            np.testing.assert_allclose(f_line.get_ydata()[j], ref, rtol=1e-8)
    (fit0,) = _by_gid(fig, "t_fit:m0")
    theta, r, (_, _, eta) = kernels["m0"]
    assert fit0.get_xdata()[0] == 50.0
    np.testing.assert_allclose(fit0.get_ydata()[0], np.sum((expm(-eta * theta * 50) @ r) ** 2))
    (fit1,) = _by_gid(fig, "t_fit:m1")  # t -> 0: drawn at the left edge, F = ‖r‖²
    assert fit1.get_marker() == "<"
    np.testing.assert_allclose(fit1.get_ydata()[0], np.sum(kernels["m1"][1] ** 2))


def test_linearised_figure(tmp_path):
    theta, r, spec = _spectrum(0)
    steps = np.arange(0, 40, 5)
    measured = np.linspace(3, 1, steps.size)
    fig = plots.linearised_figure(steps, measured, spec)
    _png_ok(plots.save(fig, tmp_path / "lin.png"), fig)
    (ms,) = _by_gid(fig, "measured")
    np.testing.assert_array_equal(ms.get_ydata(), measured)
    (disc,) = _by_gid(fig, "F:discrete")
    step = np.eye(r.size) - spec[2] * theta
    ref = [np.sum((np.linalg.matrix_power(step, int(t)) @ r) ** 2) for t in steps]
    np.testing.assert_allclose(disc.get_ydata(), ref, rtol=1e-10)


def _result(name: str, sizes, losses, seed: int = 0, hessian: bool = True) -> CandidateResult:
    rng = np.random.default_rng(seed)
    s = len(sizes)
    _, r, (lam, c, eta) = _spectrum(seed)
    extra = {}
    if hessian:
        extra = dict(
            hessian_trace=50.0,
            hessian_stderr=5.0,
            ft_hessian_trace=rng.uniform(40, 60, s),
            ft_hessian_stderr=rng.uniform(1, 3, s),
            ft_hessian_distance=np.linspace(-0.02, 0.1, s),
        )
    return CandidateResult(
        name=name, path=name, family="llama", n_params=1000, sizes=np.asarray(sizes, float),
        losses=np.asarray(losses, float), zero_shot=3.0, num_steps=np.full(s, 10),
        status=("ok",) * s, loss_se=0.01 * np.asarray(losses, float), eta=eta, seconds=1.0,
        theta=np.zeros((r.size, r.size)), residual=r, eigenvalues=lam, projected_residual=c,
        **extra,
    )  # fmt: skip


def test_hessian_figure_draws_traces_vhv_and_the_boundary(tmp_path):
    sizes = [8, 16, 32, 64, 128, 256]
    flat_then_power = [2.0, 1.99, 1.985, 1.6, 1.28, 1.024]  # a pre-power plateau, then a line
    long = _result("long", sizes, flat_then_power)
    short = _result("short", sizes[:3], [2.0, 1.8, 1.62], seed=1)
    fig = plots.hessian_figure([long, short])
    _png_ok(plots.save(fig, tmp_path / "h.png"), fig)
    traces = _by_gid(fig, "trace")
    np.testing.assert_array_equal(traces[0].get_ydata(), long.ft_hessian_trace)
    np.testing.assert_array_equal(traces[0].get_xdata(), sizes)
    (cont,) = [c for ax in fig.get_axes() for c in ax.containers if c.lines[0] is traces[0]]
    segs = np.array(cont.lines[2][0].get_segments())
    np.testing.assert_allclose(segs[:, 1, 1] - segs[:, 0, 1], 2 * long.ft_hessian_stderr)
    vhv = _by_gid(fig, "vHv")
    np.testing.assert_array_equal(vhv[0].get_ydata(), long.ft_hessian_distance)  # < 0 kept
    first = ats_first_point(np.log(sizes), np.log(flat_then_power))
    assert first == 3  # the plateau 8-32 is pre-power
    edge = math.sqrt(sizes[first - 1] * sizes[first])
    boundaries = _by_gid(fig, "boundary")
    assert len(boundaries) == 2  # trace and vᵀHv panels of "long"; "short" has none
    assert all(b.get_xdata()[0] == pytest.approx(edge) for b in boundaries)
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert any("too few sizes for AtS" in t for t in titles)


def test_write_run_plots_writes_every_picture(tmp_path):
    a = _result("a", [8, 16, 32, 64], [2.0, 1.8, 1.6, 1.45])
    b = _result("b", [8, 16, 32, 64], [2.2, 1.9, 1.7, 1.5], seed=1, hessian=False)
    table = CurveTable("t", ("a", "b"), a.sizes, np.stack([a.losses, b.losses]),
                       np.array([3.0, 3.0]), np.array([1e3, 1e3]), ("x", "x"))  # fmt: skip
    rows = [RankRow("LensLLM", 1, "a", 1.3, "ok", 0.8), RankRow("LensLLM", 2, "b", 1.4, "ok", 0.2)]
    result = RunResult(table, {}, rows, {"a": a, "b": b}, 500.0, tmp_path, ())
    written = plots.write_run_plots(result, tmp_path / "plots")
    assert [p.name for p in written] == ["curves.png", "ranking.png", "ntk.png", "hessian.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 300


@pytest.mark.slow
def test_every_methods_details_redraw_its_score():
    """report.json / --format json carry what made each score: the curve redrawn from a
    row's details, at the target, is the score (FLAN cut at 6,400; every law method)."""
    import lensllm_jax as ll
    from lensllm_jax.benchmark.download import embedded_dir
    from lensllm_jax.data.spectra import with_spectra

    table = ll.read_curve_table(embedded_dir() / "flan.csv").up_to(6400)
    spectra = {m: _spectrum(k % 2)[2] for k, m in enumerate(table.models)}
    table = with_spectra(table, spectra)
    methods = ["LensLLM", "LensLLM-NTK", "AtS", "VanillaFit", "RectifiedFit"]
    rows = ll.rank(table, 1_638_400, methods)
    checked = {m: 0 for m in methods}
    for r in rows:
        if r.status != "ok":
            continue
        y = curve_from_details(r.method, r.details, [1_638_400.0])
        assert y is not None, r
        np.testing.assert_allclose(y[0], r.score, rtol=1e-9, err_msg=str(r))
        checked[r.method] += 1
    assert min(checked.values()) >= 25, checked
    # LensLLM's law is not its score: the fused, pooled extrapolation is (README explains)
    lens = [r for r in rows if r.method == "LensLLM"]
    # the σ behind P(best) is confidence.assess's, and the band reaches it at the target
    order = [table.models.index(r.model) for r in lens]
    scores = np.full(table.num_models, np.nan)
    scores[order] = [r.score for r in lens]
    sigmas = assess(table, 1_638_400, scores).sigmas[order]
    np.testing.assert_allclose([r.details["sigma"] for r in lens], sigmas, rtol=1e-12)
    rel = table.loss_se[order, -1] / table.losses[order, -1] if table.loss_se is not None else 0
    band = [band_sigma(r.details, [1_638_400.0], float(np.broadcast_to(rel, len(lens))[k]))[0]
            for k, r in enumerate(lens)]  # fmt: skip
    np.testing.assert_allclose(band, sigmas, rtol=1e-9)
    law = [curve_from_details("LensLLM", r.details, [1_638_400.0], part="law")[0] for r in lens]
    assert max(abs(a / r.score - 1) for a, r in zip(law, lens, strict=True)) > 0.01


def test_missing_matplotlib_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LensLLMInputError, match=r"pip install 'lensllm-jax\[plot\]'"):
        plots.require_matplotlib()
