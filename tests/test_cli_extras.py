"""The command line's extras: select --plot, lensllm env, --help epilogs, the progress
display and the up-front estimate of `lensllm run`, a mistyped .gguf path."""

from __future__ import annotations

import io
import math

import pytest

from lensllm_jax import cli
from lensllm_jax.benchmark.download import embedded_dir
from lensllm_jax.data.curves import read_curve_table, write_curve_table
from lensllm_jax.runner import finetune
from lensllm_jax.runner.progress import LineProgress, RichProgress, estimate, format_seconds


@pytest.fixture
def small_table(tmp_path):
    """FLAN cut at D <= 6,400: a user's curves.csv."""
    path = tmp_path / "curves.csv"
    write_curve_table(read_curve_table(embedded_dir() / "flan.csv").up_to(6400), path)
    return path


@pytest.mark.slow
def test_select_plot_writes_the_picture_and_the_same_ranking(small_table, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    argv = ["select", str(small_table), "--target", "1638400", "--format", "csv"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    for suffix in ("png", "svg"):
        out = tmp_path / f"ranking.{suffix}"
        assert cli.main([*argv, "--plot", str(out)]) == 0
        assert capsys.readouterr().out == plain  # the plot changes nothing else
        assert out.stat().st_size > 50_000
    with Image.open(tmp_path / "ranking.png") as im:
        assert im.format == "PNG" and im.size[0] > 2000 and im.size[1] > 2000  # 30 panels


@pytest.mark.parametrize(
    ("name", "message"),
    [("ranking.jpg", "cannot tell the plot format"), ("missing/r.png", "does not exist")],
)
def test_a_bad_plot_name_is_one_line_before_any_work(small_table, tmp_path, capsys, name, message):
    argv = ["select", str(small_table), "--target", "1638400", "--plot", str(tmp_path / name)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv"]


def test_plot_without_matplotlib_is_one_line(small_table, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["select", str(small_table), "--target", "1638400", "--plot", str(tmp_path / "r.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lensllm-jax[plot]'" in err


def test_env_prints_the_backend_and_devices(capsys, monkeypatch, tmp_path):
    import jax

    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("LENSLLM_DATA", raising=False)
    assert cli.main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    devices = jax.devices()
    assert f"backend {jax.default_backend()}" in lines[0]
    assert f"jax {jax.__version__}" in lines[0]
    assert f"{len(devices)} device" in lines[0] and f"{devices[0].platform}:0" in lines[0]
    by_name = {ln.split()[0]: ln for ln in lines[2:]}
    assert str(tmp_path / "c") in by_name["LENSLLM_CACHE"]
    assert "(unset: the shipped tables)" in by_name["LENSLLM_DATA"]
    assert set(by_name) == {
        "LENSLLM_DATA",
        "LENSLLM_CACHE",
        "LENSLLM_JIT_CACHE",
        "LENSLLM_NTK_MEMORY",
    }


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        ([], ("LENSLLM_DATA", "LENSLLM_CACHE", "LENSLLM_JIT_CACHE", "LENSLLM_NTK_MEMORY")),
        (["reproduce"], ("LENSLLM_DATA", "LENSLLM_CACHE", "LENSLLM_JIT_CACHE")),
        (["select"], ("LENSLLM_CACHE", "LENSLLM_JIT_CACHE")),
        (["run"], ("LENSLLM_CACHE", "LENSLLM_JIT_CACHE", "LENSLLM_NTK_MEMORY")),
    ],
)
def test_help_has_examples_exit_codes_and_environment(capsys, command, variables):
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes:" in text and "  2    bad input" in text
    assert all(v in text for v in variables)
    assert max(len(line) for line in text.splitlines()) <= 100


def test_line_progress_appends_the_share_done_and_time_left():
    now = [0.0]
    lines: list[str] = []
    progress = LineProgress(lines.append, clock=lambda: now[0])
    progress.start(100)
    progress.log("loading")
    progress.advance(10)  # the first batch carries the compile: the clock starts after it
    now[0] = 30.0
    progress.advance(10)  # 10 steps in 30 s: 3 s a step, 80 steps left
    progress.log("D = 8")
    progress.advance(80)
    progress.log("done")
    assert lines == ["loading", "D = 8 · 20 % of steps · ≈ 4 min left", "done"]
    assert [format_seconds(s) for s in (42, 600, 3 * 3600, 5 * 86400)] == [
        "42 s",
        "10 min",
        "3.0 h",
        "5.0 days",
    ]


def test_rich_progress_draws_a_bar_and_prints_the_lines_above_it():
    from rich.console import Console

    buf = io.StringIO()
    progress = RichProgress("lensllm", console=Console(file=buf, force_terminal=True, width=100))
    progress.start(40)
    progress.log("[1/1] model: loaded")
    progress.advance(40)
    progress.close()
    text = buf.getvalue()
    assert "lensllm: [1/1] model: loaded" in text and "40/40" in text and "left" in text


def test_estimate_counts_the_recipes_steps_and_their_flops():
    cfg = finetune.FinetuneConfig()  # batch 8, 3 epochs, at least 50 steps
    est = estimate(
        [1_000, 3_000],
        [10, 20],
        [200, 400],
        cfg,
        test_size=0,
        probe_size=0,
        ntk=False,
        hessian_probes=0,
        flops_per_second=1e9,
    )
    steps = 3 * math.ceil(200 / 8) + 3 * math.ceil(400 / 8)  # 75 + 150, both above 50
    assert est.steps == 2 * steps
    assert est.flops == 6 * 8 * steps * (1_000 * 10 + 3_000 * 20)
    assert est.seconds == est.flops / 1e9
    line = est.line(2, [200, 400])
    assert line.startswith("estimate: 2 candidates (up to 3,000 parameters) x 2 sizes: 450 ")


@pytest.mark.slow
def test_param_count_from_the_config_equals_the_loaded_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lensllm_jax import models
    from lensllm_jax.runner.progress import param_count

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(tmp_path / "m"))
    expected = sum(p.numel() for p in model.parameters())
    assert param_count(str(tmp_path / "m")) == expected == models.load(tmp_path / "m").num_params


def test_a_mistyped_gguf_path_is_a_missing_file_not_a_repo_id(tmp_path, capsys):
    from lensllm_jax import models
    from lensllm_jax.errors import ModelLoadError

    for name in ("SmolLM2.gguf", "model.safetensors"):
        with pytest.raises(ModelLoadError, match="no such file or folder"):
            models.inspect(name)
    data = tmp_path / "t.txt"
    data.write_text("\n".join(f"line {i}" for i in range(40)) + "\n")
    argv = ["run", "--models", "SmolLM2.gguf", "--data", str(data), "--sizes", "2", "4", "8"]
    assert cli.main([*argv, "--test-size", "4", "--probe-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lensllm: error: SmolLM2.gguf: no such file or folder")
    assert "Hugging Face cache" not in err


def test_one_or_many_in_words():
    """'1 candidate' / '2 candidates'; one credible candidate 'is the best', several 'hold'."""
    from lensllm_jax.runner.job import _plural
    from lensllm_jax.selection.ranking import RankRow, credible_set_text

    assert [_plural(n, "candidate") for n in (1, 2)] == ["1 candidate", "2 candidates"]
    one = [RankRow("LensLLM", 1, "a", 1.0, "ok", 0.95), RankRow("LensLLM", 2, "b", 1.1, "ok", 0.05)]
    assert credible_set_text(one) == "a is the best with probability >= 0.9"
    p_best = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    three = [
        RankRow("LensLLM", k + 1, n, 1.0 + k, "ok", p) for k, (n, p) in enumerate(p_best.items())
    ]
    assert credible_set_text(three) == "a, b and c hold the best with probability >= 0.9"
