"""Fine-tuning throughput against PyTorch `transformers` on the same recipe: train-step
tokens/s, compile time, peak memory, and the wall time and compiled programs of one loss
curve (zero-shot + fine-tune/evaluate per subset size).

    python benchmarks/bench_finetune.py                                  # tiny preset, CPU
    python benchmarks/bench_finetune.py --preset gpt2-small --batch 4 --seq 128 --rounds 5

The recipe on both sides: GPT-2 of the preset's shape (no dropout), AdamW (β 0.9/0.999,
ε 1e-8, no weight decay), gradients clipped to global norm 1, lr 1e-4, a (B, T) batch of
random tokens whose second half is the target (the cost does not depend on the values).
torch runs `transformers.GPT2LMHeadModel` (its default SDPA attention) as its users run it
on a CPU: one thread per core, OMP_WAIT_POLICY=PASSIVE. Steps are timed in interleaved
rounds (one JAX step, one torch step) with the ratio torch / JAX per round. --memory runs
each side alone in a child process (model, optimizer, --steps steps) and reports its peak
RSS. Prints one JSON object (machine and load included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from _common import CompileCounter, interleaved, load_average, machine, status_gib, torch_setup

from lensllm_jax import models
from lensllm_jax.data.text import TokenData
from lensllm_jax.runner import finetune as ft

PRESETS = {
    "tiny": {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 1024},
    "gpt2-small": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
                   "n_head": 12, "n_positions": 1024},
}  # fmt: skip


def random_data(n: int, seq: int, vocab: int, seed: int) -> TokenData:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, seq)).astype(np.int32)
    loss_mask = np.zeros((n, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    return TokenData(
        tokens, loss_mask, np.ones((n, seq), np.int32), np.full(n, 4 * (seq - seq // 2))
    )


def jax_step(preset: str, batch: int, seq: int):
    """A compiled JAX train step closed over its state: step() -> loss (blocks)."""
    m = models.from_config(PRESETS[preset], 0)
    cfg = ft.FinetuneConfig(batch_size=batch)
    _, step = ft.make_train_step(m.apply, cfg)
    state = list(ft._start(ft._transform_spec(cfg), m.params))
    data = random_data(batch, seq, m.config.vocab_size, 0).batch()

    def run() -> float:
        state[0], state[1], loss = step(state[0], state[1], data, 1e-4)
        return float(jax.block_until_ready(loss))

    return run, models.count_params(m.params)


def torch_step(preset: str, batch: int, seq: int):
    """transformers' GPT-2 with the same recipe: step() -> loss."""
    import torch
    import transformers

    c = PRESETS[preset]
    cfg = transformers.GPT2Config(
        vocab_size=c["vocab_size"], n_embd=c["n_embd"], n_layer=c["n_layer"],
        n_head=c["n_head"], n_positions=c["n_positions"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)  # fmt: skip
    data = random_data(batch, seq, c["vocab_size"], 0).batch()
    tokens = torch.tensor(data["tokens"], dtype=torch.long)
    labels = tokens.masked_fill(torch.tensor(data["loss_mask"]) == 0, -100)

    def run() -> float:
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    ours, n_params = jax_step(args.preset, args.batch, args.seq)
    ours()
    first = time.perf_counter() - t0
    fns = {"jax": ours}
    out: dict[str, Any] = {"batch": args.batch, "seq": args.seq, "n_params": n_params,
                           "jax_first_step_s": round(first, 3)}  # fmt: skip
    if not args.no_torch:
        out["torch"] = torch_setup()
        theirs = torch_step(args.preset, args.batch, args.seq)
        theirs()
        fns["torch"] = theirs
    rounds = interleaved(fns, args.rounds, reference="jax")
    tokens = args.batch * args.seq
    for r in rounds.values():
        r["tokens_per_s"] = round(tokens / r["median_s"], 1)
    out["rounds"] = rounds
    if "torch" in rounds:
        out["jax_speedup_over_torch_median"] = rounds["torch"]["over_jax_median"]
    return out


def child(args: argparse.Namespace) -> None:
    """One side alone: build, --steps steps, peak RSS (VmHWM; JSON on stdout)."""
    rss0 = status_gib("VmRSS")
    run = jax_step(args.preset, args.batch, args.seq)[0] if args.child == "jax" else None
    if args.child == "torch":
        torch_setup()
        run = torch_step(args.preset, args.batch, args.seq)
    assert run is not None
    for _ in range(args.steps):
        run()
    peak = status_gib("VmHWM")
    if peak is None or rss0 is None:
        raise SystemExit("bench_finetune: --child needs /proc/self/status (Linux) for its RSS")
    print(json.dumps({"peak_rss_gib": round(peak, 3),
                      "rss_before_model_gib": round(rss0, 3)}))  # fmt: skip


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--child", side, "--preset", args.preset, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        out[side] = json.loads(lines[-1]) if proc.returncode == 0 and lines else proc.stderr[-400:]
    return out


def bench_curve(args: argparse.Namespace) -> dict:
    m = models.from_config(PRESETS["tiny"], 0)
    v = m.config.vocab_size
    pool = random_data(max(args.curve_sizes), args.curve_seq, v, 1)
    test = random_data(64, args.curve_seq, v, 2)
    cfg = ft.FinetuneConfig()
    out: dict[str, Any] = {"preset": "tiny", "sizes": args.curve_sizes, "seq": args.curve_seq,
                           "test": 64}  # fmt: skip
    for label in ("first_s", "cached_s"):  # the first run includes compiling step + eval
        with CompileCounter() as counter:
            t0 = time.perf_counter()
            curve = ft.loss_curve(m.apply, m.params, pool, test, args.curve_sizes, cfg, seed=0)
            out[label] = round(time.perf_counter() - t0, 3)
        out[f"compiled_{label[:-2]}"] = counter.as_dict()
    out["num_steps"] = curve.num_steps.tolist()
    out["status"] = list(curve.status)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed steps per side")
    p.add_argument("--steps", type=int, default=3, help="steps of each --memory child")
    p.add_argument("--memory", action="store_true", help="peak RSS of each side, alone")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--curve-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--curve-seq", type=int, default=64)
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    result: dict[str, Any] = {"preset": args.preset, "load_average_start": load_average()}
    result["train_step"] = bench_steps(args)
    if args.memory:
        result["peak_memory"] = bench_memory(args)
    if not args.no_curve:
        result["loss_curve"] = bench_curve(args)
    result["load_average_end"] = load_average()
    print(json.dumps({"benchmark": "bench_finetune", "machine": machine(), "results": result},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
