"""`lensllm run` with the one real pretrained LM reachable offline (SmolLM2-135M-Instruct,
Q4_1 GGUF) against a random-init candidate that shares its tokenizer, on real English
(Python's own `pydoc_data.topics`). The real model must win, surely, and its zero-shot loss
must equal PyTorch `transformers` running the same GGUF file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from session_tools import shared_dir

from lensllm_jax import cli
from lensllm_jax.data.text import python_doc_paragraphs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_gguf):
    """The run, once per session: a worker that gets the other test reads the same folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("LENSLLM_JIT_CACHE", "0")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, local_files_only=True
        )
        with shared_dir(tmp_path_factory, "smollm2_run") as root:
            data, out_dir = root / "python_docs.txt", root / "run"
            if not (root / "ready").exists():
                _run(smollm2_gguf, tok, root, data, out_dir)
                (root / "ready").touch()
        yield {"gguf": smollm2_gguf, "tok": tok, "data": data, "out_dir": out_dir, "root": root}
    finally:
        mp.undo()


def _run(smollm2_gguf, tok, root, data, out_dir) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    rand = root / "random-init"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(rand))
    tok.save_pretrained(str(rand))
    data.write_text("\n".join(python_doc_paragraphs(72)) + "\n", encoding="utf-8")
    argv = [
        "run", "--models", str(smollm2_gguf), str(rand), "--data", str(data),
        "--sizes", "4", "8", "16", "--test-size", "16", "--probe-size", "4",
        "--max-length", "40", "--lr", "1e-4", "--epochs", "1", "--min-steps", "2",
        "--batch-size", "4", "--out-dir", str(out_dir), "-q", "--format", "json",
        "--out", str(root / "ranking.json"),
    ]  # fmt: skip
    assert cli.main(argv) == 0


def test_the_pretrained_model_wins_surely(world):
    rows = json.loads((world["root"] / "ranking.json").read_text())
    lens = [r for r in rows if r["method"] == "LensLLM"]
    assert lens[0]["model"].endswith("SmolLM2-135M-Instruct.Q4_1") and lens[0]["p_best"] > 0.99
    ntk = [r for r in rows if r["method"] == "LensLLM-NTK"]
    assert [r["status"] for r in ntk] == ["ok", "ok"]
    report = json.loads((world["out_dir"] / "report.json").read_text())
    real, rand = report["candidates"]
    assert all(math.isfinite(v) for v in real["losses"] + rand["losses"])
    # each test loss comes with its standard error over the 16 test paragraphs
    assert all(0 < se < 0.5 * v for se, v in zip(real["loss_se"], real["losses"], strict=True))
    # English in nats per byte: the real model far below a random one (≈ ln V / bytes-per-token)
    assert real["zero_shot"] < 0.4 * rand["zero_shot"]
    assert real["ntk"]["min_eigenvalue"] > -1e-3 * real["ntk"]["max_eigenvalue"]


def test_zero_shot_loss_equals_pytorch_on_the_same_gguf(world):
    """The run's zero-shot nats/byte of SmolLM2 from an independent implementation: PyTorch
    transformers dequantising the same GGUF, the same test examples and target bytes."""
    from lensllm_jax.data import text

    examples = text.read_examples(world["data"])
    split = text.split_examples(len(examples), num_test=16, num_probe=4, seed=0)
    data = text.tokenize(examples, world["tok"], max_length=40).take(split.test)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(world["gguf"].parent),
        gguf_file=world["gguf"].name,
        local_files_only=True,
        dtype=torch.float32,
    )
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(data.tokens, dtype=torch.long),
            attention_mask=torch.tensor(data.attention_mask, dtype=torch.long),
        ).logits[:, :-1]
    logp = torch.log_softmax(logits.double(), -1)
    tgt = torch.tensor(data.tokens[:, 1:], dtype=torch.long)
    nll = -logp.gather(-1, tgt[..., None])[..., 0].numpy()
    expected = float((nll * data.loss_mask[:, 1:]).sum() / data.target_bytes.sum())
    report = json.loads((world["out_dir"] / "report.json").read_text())
    np.testing.assert_allclose(report["candidates"][0]["zero_shot"], expected, rtol=1e-5)
