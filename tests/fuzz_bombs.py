"""Memory bombs, run as a script by test_fuzz_checkpoints.py under an address-space limit:

    python tests/fuzz_bombs.py FOLDER LIMIT_BYTES

Each case builds a small hostile file in FOLDER and hands it to the reader that meets it
first; one JSON line per case: what happened, the seconds taken and the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the address-space limit, before jax maps anything
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))

import hostile_fixtures as H

from lensllm_jax import models
from lensllm_jax.data import text
from lensllm_jax.errors import LensLLMInputError

GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not `getrusage().ru_maxrss`: Linux
    carries that over from the parent across fork and exec, so a child of a large pytest
    worker would report the worker's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def main(d: Path) -> None:
    def folder(name: str, cfg_text: str, st: bytes = b"\0" * 16) -> Path:
        f = d / name
        f.mkdir()
        (f / "config.json").write_text(cfg_text)
        (f / "model.safetensors").write_bytes(st)
        return f

    def gguf(name: str, edit) -> Path:
        spec = H.tiny_gguf(tokenizer=False)
        edit(spec)
        (d / name).write_bytes(spec.to_bytes())
        return d / name

    def zero() -> Path:
        (d / "z.txt").symlink_to("/dev/zero")
        return d / "z.txt"

    deep = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cases = {
        "config n_layer 1e9": lambda: folder("a", json.dumps({**GPT2, "n_layer": 10**9})),
        "config nested 100,000 deep": lambda: folder("b", deep),
        "config 5000-digit integer": lambda: folder("c", '{"n_layer": ' + "9" * 5000 + "}"),
        "safetensors header 2^60": lambda: folder(
            "e", json.dumps(GPT2), struct.pack("<Q", 2**60) + b"{}"
        ),
        "gguf array of 2^62": lambda: gguf(
            "f.gguf", lambda s: s.set("x", H.ARR, H.Arr(H.U8, [], count=2**62))
        ),
        "gguf strings array of 2^62": lambda: gguf(
            "g.gguf", lambda s: s.set("x", H.ARR, H.Arr(H.STR, [], count=2**62))
        ),
        "gguf arrays nested 50,000 deep": lambda: gguf(
            "h.gguf", lambda s: s.set("x", H.ARR, H.nested_array(50_000))
        ),
        "gguf tensor count 2^62": lambda: gguf(
            "i.gguf", lambda s: setattr(s, "tensor_count", 2**62)
        ),
        "gguf block_count 1e9": lambda: gguf(
            "j.gguf", lambda s: s.set("llama.block_count", H.U32, 10**9)
        ),
    }
    for name, make in [*cases.items(), ("data file /dev/zero", zero)]:
        t = time.perf_counter()
        try:
            path = make()
            (text.read_examples if path.suffix == ".txt" else models.inspect)(path)
            out = "ACCEPTED"
        except LensLLMInputError as err:
            out = "REFUSED " + str(err).replace("\n", " ")
        rss = peak_rss_mib()
        print(json.dumps({"case": name, "out": out, "s": time.perf_counter() - t, "rss_mib": rss}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
