"""Time `lensllm run` end to end on random candidates built offline (JSON on stdout).

Candidates (by default a GPT-2 and a Llama of the chosen shape, each saved by `transformers` with
a character-level tokenizer) and a synthetic task (shift every letter of the prompt by one)
go through `job.run`: fine-tuning on nested subsets, test losses, the NTK step, the
ranking. Reports the wall time per candidate and in all, the optimiser steps, the backend.

    python benchmarks/bench_run.py                       # tiny preset, CPU-sized
    python benchmarks/bench_run.py --preset gpt2-small --sizes 100 200 400 800

Needs torch + transformers + tokenizers (to write the checkpoints), like the tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

LETTERS = "abcdefghijklmnop"
PRESETS = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 4, 128),
    "small": (256, 4, 4, 1024),
    "gpt2-small": (768, 12, 12, 3072),
}


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in LETTERS + " =>":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _candidate(folder: Path, arch: str, preset: str, seed: int) -> str:
    import torch
    import transformers

    hidden, layers, heads, inter = PRESETS[preset]
    tok = _tokenizer()
    torch.manual_seed(seed)
    vocab = len(tok)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=inter,
            n_positions=256,
            vocab_size=vocab,
            bos_token_id=1,
            eos_token_id=1,
        )
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            vocab_size=vocab,
            bos_token_id=1,
            eos_token_id=1,
        )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def _task(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    shift = {c: LETTERS[(i + 1) % len(LETTERS)] for i, c in enumerate(LETTERS)}
    lines = []
    for _ in range(n):
        w = [rng.choice(LETTERS) for _ in range(8)]
        lines.append(
            json.dumps(
                {"prompt": " ".join(w) + " =>", "completion": " " + "".join(shift[c] for c in w)}
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--test-size", type=int, default=32)
    parser.add_argument("--probe-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-ntk", action="store_true")
    parser.add_argument(
        "--archs",
        nargs="+",
        choices=("gpt2", "llama"),
        default=["gpt2", "llama"],
        help="one candidate per entry (seeded apart); repeat one to time a shared architecture",
    )
    args = parser.parse_args()

    import jax

    from lensllm_jax.runner import finetune, job

    lines: list[str] = []
    stamps: list[float] = []

    def log(line: str) -> None:
        stamps.append(time.perf_counter())
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        models = [
            _candidate(root / f"{arch}-{args.preset}-{seed}", arch, args.preset, seed)
            for seed, arch in enumerate(args.archs)
        ]
        n = max(args.sizes) * 2 + args.test_size + args.probe_size
        data = _task(root / "task.jsonl", n, seed=0)
        build_s = time.perf_counter() - t0
        config = finetune.FinetuneConfig(
            learning_rate=args.lr, epochs=args.epochs, min_steps=args.min_steps
        )
        t1 = time.perf_counter()
        result = job.run(
            models,
            data,
            sizes=args.sizes,
            out_dir=root / "run",
            config=config,
            test_size=args.test_size,
            probe_size=args.probe_size,
            max_length=args.max_length,
            ntk=not args.no_ntk,
            log=log,
        )
        total_s = time.perf_counter() - t1
    out = {
        "what": "lensllm run end to end on random candidates, synthetic task",
        "archs": args.archs,
        "preset": args.preset,
        "shape": dict(
            zip(("hidden", "layers", "heads", "intermediate"), PRESETS[args.preset], strict=True)
        ),
        "sizes": args.sizes,
        "target": result.target,
        "probe_size": args.probe_size,
        "max_length": args.max_length,
        "ntk": not args.no_ntk,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "build_checkpoints_s": round(build_s, 2),
        "run_s": round(total_s, 2),
        "candidates": {
            name: {
                "n_params": r.n_params,
                "seconds": round(r.seconds, 2),
                "steps": [int(s) for s in r.num_steps],
                "zero_shot": round(r.zero_shot, 4),
                "losses": [round(float(v), 4) for v in r.losses],
            }
            for name, r in result.diagnostics.items()
        },
        "ranking": [r._asdict() for r in result.rows],
    }
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
