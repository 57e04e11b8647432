"""`lensllm run` end to end on tiny random candidates with their own tokenizers.

Three tiny transformers checkpoints (GPT-2 with a character tokenizer, Llama and GPT-2 with
a word tokenizer) are fine-tuned on a synthetic task with a learnable pattern (shift every
letter by one). Checked: the run's curves.csv re-ranks identically under `lensllm select`;
the NTK features equal a dense jax.jacrev reference (and the residual a PyTorch one); an
interrupted run leaves only whole files and resumes to byte-identical output, skipping
finished candidates; a resume with other settings and every bad input are one line, exit
code 2, nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_fixtures import LETTERS, task_lines
from session_tools import shared_dir as _shared_dir

from lensllm_jax import cli
from lensllm_jax.data import curves
from lensllm_jax.data.curves import CurveTable
from lensllm_jax.models import lm_probe
from lensllm_jax.runner import checks, job, measure

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
N_EXAMPLES, TEST, PROBE = 120, 16, 8  # pool = 96, the default target
SIZES = ("8", "16", "32", "64")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No JAX persistent cache side effects, never the user's cache."""
    monkeypatch.setenv("LENSLLM_JIT_CACHE", "0")
    monkeypatch.setenv("LENSLLM_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- fixtures


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words = list(LETTERS + " =>") if kind == "char" else [*LETTERS, "=>"]
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if kind == "char":
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _candidate(folder: Path, arch: str, tok_kind: str, seed: int) -> Path:
    """A tiny random checkpoint saved with its tokenizer, as `save_pretrained` writes them."""
    tok = _tokenizer(tok_kind)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=1)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, **common)
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            **common,
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _task(path: Path, n: int = N_EXAMPLES, seed: int = 0) -> Path:
    """prompt "c a h b =>", completion " d b a c": every letter shifted by one
    (`hostile_fixtures.task_lines`, the task the hostile-input suite runs too)."""
    path.write_text("\n".join(task_lines(n, seed)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three candidates (two tokenizers) and the task file."""
    with _shared_dir(tmp_path_factory, "pipeline_world") as root:
        names = [("gpt2-char", "gpt2", "char"), ("llama-word", "llama", "word")]
        names.append(("gpt2-word", "gpt2", "word"))
        if not (root / "ready").exists():
            for seed, (name, arch, tok) in enumerate(names):
                _candidate(root / name, arch, tok, seed)
            _task(root / "task.jsonl")
            (root / "ready").touch()
    return {
        "root": root,
        "models": [str(root / name) for name, _, _ in names],
        "data": root / "task.jsonl",
    }


def _argv(world, out_dir, *extra):
    return [
        "run",
        "--models",
        *world["models"],
        "--data",
        str(world["data"]),
        "--sizes",
        *SIZES,
        "--test-size",
        str(TEST),
        "--probe-size",
        str(PROBE),
        "--max-length",
        "32",
        "--lr",
        "3e-3",
        "--epochs",
        "2",
        "--min-steps",
        "4",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def done(world, tmp_path_factory):
    """One complete run through the CLI (csv to --out), shared by every test and worker;
    tests copy its folder before changing anything."""
    with _shared_dir(tmp_path_factory, "pipeline_done") as root:
        out_dir, out_csv = root / "run", root / "stdout.csv"
        if not (root / "ready").exists():
            mp = pytest.MonkeyPatch()
            mp.setenv("LENSLLM_JIT_CACHE", "0")
            try:
                argv = _argv(world, out_dir, "-q", "--format", "csv", "--out", str(out_csv))
                assert cli.main(argv) == 0
            finally:
                mp.undo()
            (root / "ready").touch()
    return {"out_dir": out_dir, "out_csv": out_csv}


# ----------------------------------------------------------------------------- curves.csv


def test_curve_table_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    table = CurveTable(
        name="t",
        models=("a,b", 'q"uote', "plain/x"),
        sizes=np.array([8.0, 16.0, 32.5, 1e6]),
        losses=rng.uniform(0.1, 5.0, (3, 4)) * np.array([1, 1e-7, 1e5, 1 / 3]),
        zero_shot=np.array([3.3, 1 / 7, 2.0**-40]),
        n_params=np.array([4560.0, 2.5e9, 123456789012.0]),
        families=("gpt2", "", "llama"),
    )
    path = curves.write_curve_table(table, tmp_path / "t.csv")
    back = curves.read_curve_table(path)
    assert back.models == table.models and back.families == table.families
    for field in ("sizes", "losses", "zero_shot", "n_params"):
        np.testing.assert_array_equal(getattr(back, field), getattr(table, field))
    assert curves.curve_table_to_csv(back) == path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temp file left


@pytest.mark.parametrize(
    ("losses", "message"),
    [([[1.0, np.nan, 1.0]], "loss nan"), ([[1.0, 0.0, 1.0]], "loss 0.0")],
)
def test_curve_table_writer_refuses_what_the_reader_refuses(losses, message):
    table = CurveTable(
        "t", ("m",), np.array([1.0, 2.0, 3.0]), np.array(losses), np.ones(1), np.ones(1), ("",)
    )
    with pytest.raises(ValueError, match=message):
        curves.curve_table_to_csv(table)


# ----------------------------------------------------------------------------- end to end


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
def test_run_writes_results_that_select_reranks_identically(world, done, capsys):
    out_dir = done["out_dir"]
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [
        "candidates",
        "curves.csv",
        "manifest.json",
        "ntk_features.csv",
        "plots",
        "ranking.csv",
        "report.json",
    ]
    assert sorted(p.name for p in (out_dir / "plots").iterdir()) == [
        "curves.png",
        "ntk.png",
        "ranking.png",
    ]
    assert not list(out_dir.rglob("*.part"))
    ranking_csv = (out_dir / "ranking.csv").read_text()
    assert done["out_csv"].read_text() == ranking_csv  # --format csv is the ranking file

    table = curves.read_curve_table(out_dir / "curves.csv")
    assert table.models == ("gpt2-char", "llama-word", "gpt2-word")
    np.testing.assert_array_equal(table.sizes, [8, 16, 32, 64])
    assert table.families == ("gpt2", "llama", "gpt2")
    # Fine-tuning learned the task: the loss at 64 samples is below the zero-shot loss.
    assert np.all(table.losses[:, -1] < table.zero_shot)
    # Losses are nats per byte of target text: the word-tokenizer candidates see 2 bytes
    # per word token, the char one 1 per token, yet all land on one scale (< ln 256).
    assert np.all(table.losses < np.log(256))

    report = json.loads((out_dir / "report.json").read_text())
    assert report["target"] == 96.0  # the pool: 120 - 16 test - 8 probe
    for cand, row in zip(report["candidates"], table.losses, strict=True):
        np.testing.assert_array_equal(cand["losses"], row)
        assert cand["status"] == ["ok"] * 4
        assert cand["ntk"]["probe_examples"] == PROBE and cand["ntk"]["clipped"] < 1e-4
        assert cand["hessian_trace"] is None  # not asked for

    rows = _csv_rows(ranking_csv)
    assert [r["method"] for r in rows] == ["LensLLM"] * 3 + ["LensLLM-NTK"] * 3
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(r["model"] for r in rows[:3]) == sorted(table.models)

    # `lensllm select curves.csv` ranks the saved table exactly as the run did.
    capsys.readouterr()
    code = cli.main(["select", str(out_dir / "curves.csv"), "--target", "96", "--format", "csv"])
    assert code == 0
    selected = _csv_rows(capsys.readouterr().out)
    assert selected == [r for r in rows if r["method"] == "LensLLM"]
    # ... and with the run's NTK spectra, LensLLM-NTK too: every row the run wrote, exactly.
    for ntk_arg in (out_dir, out_dir / "ntk_features.csv"):
        argv = ["select", str(out_dir / "curves.csv"), "--target", "96", "--ntk", str(ntk_arg)]
        assert cli.main([*argv, "--format", "csv"]) == 0
        assert capsys.readouterr().out == ranking_csv


def _probe(world, folder):
    from lensllm_jax import models
    from lensllm_jax.data import text

    examples = text.read_examples(world["data"])
    split = text.split_examples(len(examples), num_test=TEST, num_probe=PROBE, seed=0)
    m = models.load(folder)
    probe = text.tokenize(examples, m.tokenizer, max_length=32).take(split.probe)
    return m, probe, lm_probe.probe_batch(probe)


@pytest.mark.slow
def test_ntk_features_equal_a_dense_reference(world, done):
    """The run's saved Θ, r and eigenvalues against Θ = J Jᵀ with J from jax.jacrev of the
    per-example losses in float64, r from PyTorch's logits, F(t) from a dense eigh."""
    import jax

    from lensllm_jax.core import ntk

    saved = sorted((done["out_dir"] / "candidates").glob("*.npz"))
    assert len(saved) == 3
    for folder, npz in zip(world["models"], saved, strict=True):
        m, probe, batch = _probe(world, folder)
        with np.load(npz) as z:
            assert str(z["path"]) == str(Path(folder).resolve())
            assert float(z["eta"]) == 3e-3  # the learning rate
            theta, residual = np.asarray(z["theta"]), np.asarray(z["residual"])
            eig, proj = np.asarray(z["eigenvalues"]), np.asarray(z["projected_residual"])

        with jax.enable_x64(True):
            params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), m.params)
            jac = jax.jit(jax.jacrev(lm_probe.probe_loss_fn(m.apply)))(params64, batch)
            flat = np.concatenate(
                [np.asarray(j).reshape(PROBE, -1) for j in jax.tree.leaves(jac)], axis=1
            )
        theta_ref = flat @ flat.T
        scale = np.abs(theta_ref).max()
        assert np.abs(theta - theta_ref).max() / scale < 1e-5

        # The residual is the loss itself (y = 0), in nats per byte: from PyTorch's logits.
        tm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = tm(
                torch.tensor(batch["tokens"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"]),
            ).logits.double()
        logp = torch.log_softmax(logits[:, :-1], -1).numpy()
        nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
        r_ref = (nll * probe.loss_mask[:, 1:]).sum(1) / probe.target_bytes
        np.testing.assert_allclose(residual, r_ref, rtol=2e-5)

        # Features: Θ's eigenvalues, and F(t) = ‖exp(−ηΘt) r‖² against the dense reference.
        lam_ref, u_ref = np.linalg.eigh(theta_ref)
        np.testing.assert_allclose(eig, np.maximum(lam_ref, 0), rtol=0, atol=1e-5 * scale)
        features = ntk.NTKFeatures(eig, proj)
        for t in (0.0, 0.3 / scale, 3.0 / scale):
            f_ref = np.sum(np.exp(-2 * lam_ref * t) * (u_ref.T @ r_ref) ** 2)
            f = float(ntk.ntk_test_loss_from_features(features, t, 1.0))
            assert abs(f - f_ref) / f_ref < 1e-4


@pytest.mark.slow
def test_hessian_trace_brackets_the_exact_trace(world):
    """`hessian_step` (16 Rademacher probes) is within 4 standard errors of tr(H) from the
    dense float64 Hessian of the mean probe loss, and its standard error is honest."""
    import jax
    from jax.flatten_util import ravel_pytree

    m, _, batch = _probe(world, world["models"][1])
    mean, stderr = measure.hessian_step(m.apply, m.params, batch, num_probes=16, seed=0, name="x")
    loss = lm_probe.probe_loss_fn(m.apply)
    with jax.enable_x64(True):
        flat, unravel = ravel_pytree(jax.tree.map(lambda x: np.asarray(x, np.float64), m.params))
        hess = jax.jit(jax.hessian(lambda v: loss(unravel(v), batch).mean()))(flat)
        exact = float(np.trace(np.asarray(hess)))
        off = np.asarray(hess) - np.diag(np.diag(hess))
    # Rademacher variance of one probe: 2 Σ_{i≠j} H_ij², so stderr ≈ sqrt(2 Σ H_ij² / 16).
    expected_se = np.sqrt(2 * np.sum(off**2) / 16)
    assert abs(mean - exact) < 4 * stderr
    assert 0.5 * expected_se < stderr < 2 * expected_se


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_bytes(world, done, tmp_path, monkeypatch, capsys):
    """Stop during candidate 2: only whole files remain. Resume: candidates 2 and 3 are
    computed (1 is read back), and ranking.csv / curves.csv equal the uninterrupted run's
    byte for byte (every candidate recomputed in this process: the run is deterministic).
    A third run loads nothing."""
    from lensllm_jax import models
    from lensllm_jax.runner import finetune

    out_dir = tmp_path / "resumed"
    calls = {"load": 0, "curve": 0}
    real_load, real_curve = models.load, finetune.loss_curve

    def load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def curve(*a, **k):
        calls["curve"] += 1
        if interrupt_at == calls["curve"]:
            raise KeyboardInterrupt
        return real_curve(*a, **k)

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(finetune, "loss_curve", curve)

    interrupt_at = 2
    assert cli.main(_argv(world, out_dir, "-q", "--format", "csv")) == 130
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*"))
    assert files == ["candidates", "candidates/000_gpt2-char.npz", "manifest.json"]

    interrupt_at = 0
    calls.update(load=0, curve=0)
    capsys.readouterr()
    assert cli.main(_argv(world, out_dir, "--format", "csv")) == 0
    assert calls == {"load": 2, "curve": 2}
    err = capsys.readouterr().err
    assert "gpt2-char: done in an earlier run" in err
    # not on a terminal: an estimate for the 2 candidates left, then lines with the time left
    assert "lensllm: estimate: 2 candidates (up to " in err and " fine-tuning steps" in err
    assert "% of steps · ≈ " in err and " left" in err
    for name in ("ranking.csv", "curves.csv"):
        assert (out_dir / name).read_bytes() == (done["out_dir"] / name).read_bytes()

    calls.update(load=0, curve=0)
    assert cli.main(_argv(world, out_dir, "-q", "--format", "json")) == 0
    assert calls == {"load": 0, "curve": 0}
    assert (out_dir / "ranking.csv").read_bytes() == (done["out_dir"] / "ranking.csv").read_bytes()


@pytest.mark.slow
def test_new_target_or_methods_rerank_without_fine_tuning(world, done, tmp_path, monkeypatch):
    """The target and the methods are not run settings: a rerun re-ranks the saved results
    (no load, no fine-tune), as `lensllm select` ranks the saved curves.csv. Another target
    never overwrites the first one's ranking: its files are named by the target."""
    from lensllm_jax import models

    out_dir = tmp_path / "rerank"
    shutil.copytree(done["out_dir"], out_dir)
    before = {n: (out_dir / n).read_bytes() for n in ("ranking.csv", "report.json")}
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model"))
    out_csv = tmp_path / "r.csv"
    extra = ["--target", "1000", "--methods", "AtS", "LensLLM", "--format", "csv"]
    assert cli.main(_argv(world, out_dir, "-q", *extra, "--out", str(out_csv))) == 0
    rows = _csv_rows(out_csv.read_text())
    assert [r["method"] for r in rows] == ["AtS"] * 3 + ["LensLLM"] * 3 + ["LensLLM-NTK"] * 3
    assert out_csv.read_text() == (out_dir / "ranking_target-1000.csv").read_text()
    assert {n: (out_dir / n).read_bytes() for n in before} == before  # target 96 untouched
    assert (out_dir / "plots_target-1000" / "curves.png").is_file()
    sel_csv = tmp_path / "s.csv"
    argv = ["select", str(out_dir / "curves.csv"), "--target", "1000", "--out", str(sel_csv)]
    assert cli.main([*argv, "--methods", "AtS", "LensLLM", "--format", "csv"]) == 0
    assert _csv_rows(sel_csv.read_text()) == rows[:6]
    assert json.loads((out_dir / "report_target-1000.json").read_text())["target"] == 1000.0
    # the first target again: its own files, rewritten in place
    assert cli.main(_argv(world, out_dir, "-q", "--format", "csv", "--out", str(out_csv))) == 0
    assert (out_dir / "ranking.csv").read_bytes() == before["ranking.csv"]
    assert out_csv.read_text() == before["ranking.csv"].decode()


@pytest.mark.slow
def test_a_diverged_candidate_ranks_last_and_stays_out_of_curves_csv(world, done, tmp_path, capsys):
    """A curve point that diverged (NaN, status "diverged") cannot enter curves.csv; the
    candidate ranks last, "failed", under every method, with a warning."""
    out_dir = tmp_path / "diverged"
    shutil.copytree(done["out_dir"], out_dir)
    npz = out_dir / "candidates" / "001_llama-word.npz"
    with np.load(npz) as z:
        saved = dict(z)
    saved["losses"][-1] = np.nan
    saved["status"] = np.array(["ok", "ok", "ok", "diverged"])
    np.savez(npz, **saved)
    assert cli.main(_argv(world, out_dir, "--format", "csv")) == 0
    captured = capsys.readouterr()
    assert "lensllm: warning: llama-word: fine-tuning diverged" in captured.err
    rows = _csv_rows(captured.out)
    for method in ("LensLLM", "LensLLM-NTK"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["rank"] for r in mine] == ["1", "2", "3"]
        assert mine[-1]["model"] == "llama-word" and mine[-1]["status"] == "failed"
        assert mine[-1]["score"] == "nan" and all(r["status"] == "ok" for r in mine[:2])
    assert curves.read_curve_table(out_dir / "curves.csv").models == ("gpt2-char", "gpt2-word")


@pytest.mark.slow
def test_resume_with_other_settings_is_one_line_error(world, done, tmp_path, capsys):
    out_dir = tmp_path / "other"
    shutil.copytree(done["out_dir"], out_dir)
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    argv = _argv(world, out_dir, "-q")
    argv[argv.index("--lr") + 1] = "1e-3"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lensllm: error:")
    assert "different settings (finetune.learning_rate: 0.003 there, 0.001 now)" in err
    assert "new --out-dir" in err
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- bad input


def _no_tokenizer(world) -> str:
    folder = world["root"] / "no-tokenizer"
    if not folder.exists():
        shutil.copytree(world["models"][0], folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
    return str(folder)


def _write(world, name: str, text: str) -> str:
    path = world["root"] / name
    path.write_text(text, encoding="utf-8")
    return str(path)


BAD = {
    "missing model": (
        lambda w, a: a.__setitem__(a.index("--models") + 1, str(w["root"] / "nope")),
        "nope: no such file or folder",
    ),
    "model without tokenizer": (
        lambda w, a: a.__setitem__(a.index("--models") + 1, _no_tokenizer(w)),
        "has no tokenizer",
    ),
    "same model twice": (
        lambda w, a: a.__setitem__(a.index("--models") + 2, w["models"][0]),
        "the same model as",
    ),
    "missing data file": (
        lambda w, a: a.__setitem__(a.index("--data") + 1, str(w["root"] / "nope.jsonl")),
        "file not found",
    ),
    "bad JSON line": (
        lambda w, a: a.__setitem__(
            a.index("--data") + 1, _write(w, "bad.jsonl", '{"text": "a b"}\n{"text": oops}\n')
        ),
        "line 2: bad JSON",
    ),
    "empty data file": (
        lambda w, a: a.__setitem__(a.index("--data") + 1, _write(w, "empty.jsonl", "\n")),
        "empty file",
    ),
    "target not beyond the largest size": (
        lambda w, a: a.extend(["--target", "64"]),
        "target 64 must be larger than the largest subset size 64",
    ),
    "size larger than the pool": (
        lambda w, a: a.__setitem__(a.index("--sizes") + 3, "200"),
        "subset size 200 is larger than the fine-tuning pool (96 of 120 examples",
    ),
    "two sizes": (
        lambda w, a: [a.remove(s) for s in ("16", "32")],
        "2 subset sizes given, need at least 3",
    ),
    "unknown method": (lambda w, a: a.extend(["--methods", "Oracle"]), "unknown method"),
    "one Hessian probe": (
        lambda w, a: a.extend(["--hessian", "1"]),
        "1 Hessian probe gives no standard error",
    ),
    "bad learning rate": (
        lambda w, a: a.__setitem__(a.index("--lr") + 1, "-1"),
        "learning_rate=-1.0 is not > 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(world, tmp_path, capsys, case):
    edit, message = BAD[case]
    out_dir = tmp_path / "out"
    argv = _argv(world, out_dir, "-q")
    edit({**world, "root": tmp_path}, argv)  # files it writes go to this test's folder
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("lensllm: error:") and message in captured.err
    assert not out_dir.exists()


def test_out_dir_that_is_not_a_run_is_refused(world, tmp_path, capsys):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    assert cli.main(_argv(world, out_dir, "-q")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no lensllm run" in err
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]


def test_bad_input_in_a_real_process(world, tmp_path):
    out_dir = tmp_path / "out"
    argv = _argv(world, out_dir)
    argv[argv.index("--models") + 1] = str(world["root"] / "nope")
    proc = subprocess.run(
        [sys.executable, "-m", "lensllm_jax.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "LENSLLM_JIT_CACHE": "0", "HOME": str(tmp_path)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lensllm: error:") and "no such file or folder" in proc.stderr
    assert not out_dir.exists()


def test_missing_tokenizer_library_is_one_line(monkeypatch, tmp_path):
    def loader():
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(
        checks, "_inspect", lambda p, max_length: (str(tmp_path), "gpt2", 10, loader, ())
    )
    from lensllm_jax.errors import LensLLMInputError

    with pytest.raises(LensLLMInputError) as info:
        checks.check_candidates([str(tmp_path)])
    msg = str(info.value)
    assert "transformers is not installed" in msg and "lensllm-jax[run]" in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_hessian_distance_step_equals_the_dense_quadratic_form(world):
    """vᵀHv at the 'fine-tuned' params θ0 + v against the dense float64 Hessian there."""
    import jax
    from jax.flatten_util import ravel_pytree

    m, _, batch = _probe(world, world["models"][0])
    rng = np.random.default_rng(0)
    moved = jax.tree.map(
        lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), m.params
    )
    got = measure.hessian_distance_step(m.apply, m.params, moved, batch, name="x")
    loss = lm_probe.probe_loss_fn(m.apply)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
        flat0, _ = ravel_pytree(to64(m.params))
        flat1, unravel = ravel_pytree(to64(moved))
        hess = jax.jit(jax.hessian(lambda v: loss(unravel(v), batch).mean()))(flat1)
        v = np.asarray(flat1 - flat0)
        exact = float(v @ np.asarray(hess) @ v)
    np.testing.assert_allclose(got, exact, rtol=2e-3)


@pytest.mark.slow
def test_hessian_by_size_measures_the_fine_tuned_params(world, tmp_path):
    """--hessian measures the trace and vᵀHv at the params fine-tuned on each size: each
    entry equals `hessian_step` / `hessian_distance_step` on an independent fine-tune of
    that size (the run is deterministic), and report.json lists them with AtS's phase."""
    from lensllm_jax import models
    from lensllm_jax.data import text
    from lensllm_jax.runner import finetune

    sizes, probes = (8, 16, 32), 4
    config = finetune.FinetuneConfig(learning_rate=3e-3, epochs=2, min_steps=4)
    res = job.run(
        [world["models"][0]],
        world["data"],
        sizes=sizes,
        out_dir=tmp_path / "run",
        config=config,
        test_size=TEST,
        probe_size=PROBE,
        max_length=32,
        methods=["AtS"],
        ntk=False,
        hessian_probes=probes,
    )
    (r,) = res.diagnostics.values()
    assert np.isfinite(r.ft_hessian_trace).all() and np.isfinite(r.ft_hessian_distance).all()
    assert (r.ft_hessian_stderr > 0).all() and (r.ft_hessian_distance != 0).all()

    examples = text.read_examples(world["data"])
    split = text.split_examples(len(examples), num_test=TEST, num_probe=PROBE, seed=0)
    m = models.load(world["models"][0])
    data = text.tokenize(examples, m.tokenizer, max_length=32)
    pool, batch = data.take(split.pool), lm_probe.probe_batch(data.take(split.probe))
    sub = text.nested_subset(np.arange(pool.num_examples), sizes[1], seed=0)
    ft = finetune.finetune(m.apply, m.params, pool.take(sub), config, seed=0).params
    tr, se = measure.hessian_step(m.apply, ft, batch, num_probes=probes, seed=0, name="x")
    dist = measure.hessian_distance_step(m.apply, m.params, ft, batch, name="x")
    np.testing.assert_allclose(
        [r.ft_hessian_trace[1], r.ft_hessian_stderr[1], r.ft_hessian_distance[1]],
        [tr, se, dist],
        rtol=1e-4,
    )
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    by_size = report["candidates"][0]["hessian_by_size"]
    assert [e["size"] for e in by_size] == list(sizes)
    assert all(isinstance(e["power_phase"], bool) for e in by_size)
    # 3 sizes: AtS fits all three and tests none, so "power" is its assumption, not a finding
    assert [e["phase_tested"] for e in by_size] == [False, False, False]
    np.testing.assert_allclose([e["distance"] for e in by_size], r.ft_hessian_distance)
